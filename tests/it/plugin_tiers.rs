//! The same fusion functions as builtin, dylib and WASM plugins give bit-identical outputs.

use crate::common::{dylib, registry_of, wasm};
use fusellm_core::plugins::conformance::{check, synthetic_input, Shape};
use fusellm_core::plugins::{Registry, Tier, WasmLimits};
use fusellm_sdk::{ParamValue, PluginKind};

fn tiers() -> [Registry; 3] {
    [
        Registry::with_builtins().unwrap(),
        registry_of(Tier::Dylib, &dylib("fusellm_ce_fusion"), WasmLimits::default()),
        registry_of(Tier::Wasm, &wasm("fusellm_ce_fusion"), WasmLimits::default()),
    ]
}

#[test]
fn min_ce_and_avg_ce_are_bit_identical_in_every_tier() {
    let tiers = tiers();
    let shape = Shape { positions: 300, candidates: 3, top_k: 10, vocab: 32000, unaligned: 0.2 };
    let settings: [&[(&str, ParamValue)]; 4] = [
        &[],
        &[("granularity", ParamValue::Str("token".into()))],
        &[("weights", ParamValue::Str("softmax".into())), ("tau", ParamValue::Float(0.7))],
        // A float whose shortest decimal form does not parse back exactly without care.
        &[("include_target", ParamValue::Bool(false)), ("temperature", ParamValue::Float(0.9452706955539223))],
    ];
    for name in ["min_ce", "avg_ce"] {
        for setting in settings {
            if name == "min_ce" && setting.iter().any(|(k, _)| *k == "weights") {
                continue;
            }
            let given = setting.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
            for seed in 0..3 {
                let input = synthetic_input(seed, shape);
                let outputs: Vec<_> = tiers
                    .iter()
                    .map(|r| {
                        let entry = r.get(PluginKind::Fusion, name).unwrap();
                        let params = entry.resolve_params(&given).unwrap();
                        entry.fuse(&params, &input.view()).unwrap()
                    })
                    .collect();
                assert!(!outputs[0].ids.is_empty());
                assert!(outputs[0].bit_identical(&outputs[1]), "{name} {setting:?}: builtin != dylib");
                assert!(outputs[0].bit_identical(&outputs[2]), "{name} {setting:?}: builtin != wasm");
            }
        }
    }
}

#[test]
fn every_tier_reports_the_same_manifest() {
    let tiers = tiers();
    for name in ["min_ce", "avg_ce"] {
        let infos: Vec<_> = tiers.iter().map(|r| r.get(PluginKind::Fusion, name).unwrap().info.clone()).collect();
        assert_eq!(infos[0], infos[1]);
        assert_eq!(infos[0], infos[2]);
    }
}

#[test]
fn built_in_fusion_plugins_pass_the_conformance_check_in_every_tier() {
    for registry in tiers() {
        for name in ["min_ce", "avg_ce"] {
            let entry = registry.get(PluginKind::Fusion, name).unwrap();
            let results = check(entry);
            assert!(results.len() >= 7);
            for r in results {
                assert!(r.outcome.is_ok(), "{}: {}: {:?}", entry.label(), r.name, r.outcome);
            }
        }
    }
}

#[test]
fn the_example_plugin_passes_the_conformance_check_in_both_forms() {
    for (tier, path) in [(Tier::Dylib, dylib("entropy_fusion")), (Tier::Wasm, wasm("entropy_fusion"))] {
        let registry = registry_of(tier, &path, WasmLimits::default());
        let entry = registry.get(PluginKind::Fusion, "entropy_weighted").unwrap();
        for r in check(entry) {
            assert!(r.outcome.is_ok(), "{}: {}: {:?}", entry.label(), r.name, r.outcome);
        }
    }
}

#[test]
fn compiled_components_are_cached_on_disk_and_a_bad_cache_file_is_recompiled() {
    let cache = std::env::temp_dir().join(format!("fusellm-wasm-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let limits = WasmLimits { cache_dir: Some(cache.clone()), ..WasmLimits::default() };
    let cached_files = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(cache.join("wasm")).unwrap().map(|e| e.unwrap().path()).collect()
    };
    let component = wasm("fusellm_ce_fusion");
    registry_of(Tier::Wasm, &component, limits.clone());
    let files = cached_files();
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(files[0].extension().unwrap(), "cwasm");
    let compiled_size = std::fs::metadata(&files[0]).unwrap().len();

    std::fs::write(&files[0], b"corrupted").unwrap();
    let registry = registry_of(Tier::Wasm, &component, limits);
    assert!(registry.get(PluginKind::Fusion, "min_ce").is_ok());
    assert_eq!(std::fs::metadata(&files[0]).unwrap().len(), compiled_size, "the bad cache file is replaced");
}

/// The aligners, vocabulary mappers and adapters pass their kinds' conformance checks: as
/// built-ins, and the aligners also from their dylib and WASM builds.
#[test]
fn every_built_in_plugin_passes_its_kinds_conformance_check() {
    let builtins = Registry::with_builtins().unwrap();
    let align = [Tier::Dylib, Tier::Wasm].map(|tier| {
        let file = if tier == Tier::Dylib { dylib("fusellm_align") } else { wasm("fusellm_align") };
        registry_of(tier, &file, WasmLimits::default())
    });
    let mut kinds = std::collections::BTreeSet::new();
    for registry in std::iter::once(&builtins).chain(&align) {
        for entry in registry.entries().iter().filter(|e| e.info.kind != PluginKind::Fusion) {
            let results = check(entry);
            assert!(results.len() >= 2, "{}", entry.label());
            for r in results {
                assert!(r.outcome.is_ok(), "{}: {}: {:?}", entry.label(), r.name, r.outcome);
            }
            kinds.insert(entry.info.kind.as_str());
        }
    }
    assert_eq!(kinds.len(), 3, "{kinds:?}");
}
