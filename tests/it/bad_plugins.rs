//! Every bad plugin input gets a clear error, and the host keeps running.

use std::path::{Path, PathBuf};

use crate::common::{dylib, incompatible_dylib, registry_of, tight_limits, wasm};
use fusellm_core::plugins::conformance::{synthetic_input, Shape};
use fusellm_core::plugins::{Registry, Tier, WasmLimits};
use fusellm_sdk::PluginKind;

const SHAPE: Shape = Shape { positions: 16, candidates: 3, top_k: 4, vocab: 1000, unaligned: 0.0 };

fn load_error(tier: Tier, path: &Path) -> String {
    let mut registry = Registry::empty();
    registry.set_wasm_limits(tight_limits());
    match registry.load_file(tier, path) {
        Ok(names) => panic!("{} loaded ({names:?}) but should not", path.display()),
        Err(e) => e.message,
    }
}

/// Calls plugin `name` of a registry and returns its error message.
fn call_error(registry: &Registry, name: &str) -> String {
    let entry = registry.get(PluginKind::Fusion, name).unwrap();
    let params = entry.resolve_params(&Default::default()).unwrap();
    match entry.fuse(&params, &synthetic_input(9, SHAPE).view()) {
        Ok(_) => panic!("{name} succeeded but should fail"),
        Err(e) => e.message,
    }
}

/// After a failure the same registry still serves a good call.
fn still_works(registry: &Registry) {
    let entry = registry.get(PluginKind::Fusion, "negative_probs").unwrap();
    let input = synthetic_input(1, Shape { positions: 0, ..SHAPE });
    let params = entry.resolve_params(&Default::default()).unwrap();
    assert!(entry.fuse(&params, &input.view()).is_ok(), "an empty document has no bad probability to return");
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fusellm-bad-plugins-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn assert_contains(message: &str, needle: &str) {
    assert!(message.contains(needle), "expected {needle:?} in:\n{message}");
}

#[test]
fn a_missing_plugin_file_is_named() {
    for (tier, file) in [(Tier::Dylib, "libnowhere.so"), (Tier::Wasm, "nowhere.wasm")] {
        let e = load_error(tier, Path::new(file));
        assert_contains(&e, &format!("plugin file {file} not found"));
    }
}

#[test]
fn an_unreadable_plugin_file_is_named() {
    let dir = scratch("folder.wasm");
    std::fs::create_dir_all(&dir).unwrap();
    let e = load_error(Tier::Wasm, &dir);
    assert_contains(&e, "cannot be read");
}

#[test]
fn a_dylib_built_against_another_sdk_version_is_refused_in_three_lines() {
    let e = load_error(Tier::Dylib, &incompatible_dylib("skewed_sdk"));
    assert_contains(&e, "was built against fusellm-sdk 1.0.0, but this fusellm uses fusellm-sdk 0.2.0");
    assert_contains(&e, "rebuild the plugin against fusellm-sdk 0.2");
    assert!(e.lines().count() <= 3, "{e}");
}

#[test]
fn a_dylib_with_another_interface_layout_is_refused_in_three_lines() {
    let e = load_error(Tier::Dylib, &incompatible_dylib("drifted_layout"));
    assert_contains(&e, "the layout of the plugin interface does not match this fusellm");
    assert_contains(&e, "mismatched type at `fuse.param_2.text_bytes` of AbiFusionInput<'a>: expected u32, found u64");
    assert!(e.lines().count() <= 3, "{e}");
}

#[test]
fn a_shared_library_that_is_not_a_plugin_is_refused() {
    // A real shared library without the root module: the C math library.
    let libm = ["/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib/x86_64-linux-gnu/libm.so.6", "/lib64/libm.so.6"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("a libm.so.6 on this machine");
    let link = scratch("libm_copy.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(libm, &link).unwrap();
    let e = load_error(Tier::Dylib, &link);
    assert_contains(&e, "is not a fusellm plugin: it exports no fusellm root module");
    assert!(e.lines().count() <= 3, "{e}");

    let garbage = scratch("libgarbage.so");
    std::fs::write(&garbage, b"not an ELF file").unwrap();
    assert_contains(&load_error(Tier::Dylib, &garbage), "cannot be loaded as a shared library");
}

#[test]
fn a_file_that_is_not_a_component_is_refused() {
    let garbage = scratch("garbage.wasm");
    std::fs::write(&garbage, b"\0asm garbage").unwrap();
    assert_contains(&load_error(Tier::Wasm, &garbage), "is not a valid WebAssembly component");
}

#[test]
fn a_panicking_plugin_is_an_error_in_every_tier() {
    let dylib = registry_of(Tier::Dylib, &dylib("fusellm_test_plugins"), WasmLimits::default());
    assert_contains(&call_error(&dylib, "panics"), "plugin panicked: this plugin panics on purpose");
    still_works(&dylib);

    let wasm = registry_of(Tier::Wasm, &wasm("fusellm_test_plugins"), tight_limits());
    let e = call_error(&wasm, "panics");
    assert_contains(&e, "plugin panicked: this plugin panics on purpose (at tests/plugins/misbehaving/src/lib.rs");
    still_works(&wasm);
}

#[test]
fn a_wasm_plugin_that_loops_forever_hits_the_deadline() {
    let wasm = registry_of(Tier::Wasm, &wasm("fusellm_test_plugins"), tight_limits());
    assert_contains(&call_error(&wasm, "loops_forever"), "exceeded the deadline of 1s per call");
    still_works(&wasm);
}

#[test]
fn a_wasm_plugin_that_allocates_without_bound_hits_the_memory_cap() {
    let wasm = registry_of(Tier::Wasm, &wasm("fusellm_test_plugins"), tight_limits());
    assert_contains(&call_error(&wasm, "hogs_memory"), "exceeded the memory cap of 64 MiB");
    still_works(&wasm);
}

#[test]
fn a_trapping_wasm_plugin_is_an_error() {
    let wasm = registry_of(Tier::Wasm, &wasm("fusellm_test_plugins"), tight_limits());
    assert_contains(&call_error(&wasm, "traps"), "wasm trap: wasm `unreachable` instruction executed");
    still_works(&wasm);
}

#[test]
fn bad_outputs_are_refused_in_every_tier() {
    let registries = [
        registry_of(Tier::Dylib, &dylib("fusellm_test_plugins"), WasmLimits::default()),
        registry_of(Tier::Wasm, &wasm("fusellm_test_plugins"), tight_limits()),
    ];
    for registry in &registries {
        assert_contains(
            &call_error(registry, "ragged"),
            "returned a bad target: fused target: 16 offsets for 16 positions",
        );
        assert_contains(
            &call_error(registry, "nan_probs"),
            "returned a bad target: fused target: probability NaN at position 0",
        );
        assert_contains(
            &call_error(registry, "negative_probs"),
            "returned a bad target: fused target: probability -0.5 at position 0",
        );
    }
}

#[test]
fn two_plugins_registering_one_name_are_refused() {
    let mut registry = Registry::with_builtins().unwrap();
    let e = registry.load_file(Tier::Dylib, &dylib("fusellm_ce_fusion")).unwrap_err().message;
    assert_contains(
        &e,
        "two plugins register the name `min_ce`: `min_ce` (builtin, fusellm-ce-fusion) and `min_ce` (dylib,",
    );
    // The built-ins are untouched.
    assert!(registry.get(PluginKind::Fusion, "min_ce").is_ok());
}

/// The conformance check catches an aligner, a vocabulary mapper and an adapter that
/// answer wrongly, in both tiers, and says where.
#[test]
fn the_conformance_check_fails_wrong_plugins_of_every_kind() {
    let registries = [
        registry_of(Tier::Dylib, &dylib("fusellm_test_plugins"), WasmLimits::default()),
        registry_of(Tier::Wasm, &wasm("fusellm_test_plugins"), tight_limits()),
    ];
    for registry in &registries {
        for (name, says) in [
            ("to_first", "a tokenization with itself: aligned a tokenization with itself as"),
            ("all_to_zero", "a vocabulary onto itself: source token 1 mapped to Some(0) at distance 0"),
            ("panicking_adapter", "plugin panicked: this adapter panics on purpose"),
        ] {
            let entry = registry.find(name).unwrap();
            let failed: Vec<String> = fusellm_core::plugins::conformance::check(entry)
                .into_iter()
                .filter_map(|r| r.outcome.err().map(|e| format!("{}: {e}", r.name)))
                .collect();
            assert!(failed.iter().any(|f| f.contains(says)), "{}: expected {says:?} in {failed:?}", entry.label());
        }
    }
}
