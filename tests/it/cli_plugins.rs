//! The `fusellm plugins` commands as scripts use them.

fn fusellm(args: &[&str]) -> std::process::Output {
    crate::common::fusellm_in(std::path::Path::new("."), args)
}

#[test]
fn plugins_list_json_includes_builtins_and_config_plugins() {
    let wasm = crate::common::wasm("entropy_fusion");
    let dir = std::env::temp_dir().join(format!("fusellm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("exp.toml");
    std::fs::write(&config, format!("[fusion]\nplugin = {{ wasm = \"{}\" }}\n", wasm.display())).unwrap();

    let out = fusellm(&["plugins", "list", "--json", "--config", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    let find = |name: &str| list.as_array().unwrap().iter().find(|p| p["name"] == name).cloned();
    let min_ce = find("min_ce").expect("min_ce listed");
    assert_eq!((min_ce["kind"].as_str(), min_ce["tier"].as_str()), (Some("fusion"), Some("builtin")));
    assert_eq!(min_ce["version"], env!("CARGO_PKG_VERSION"));
    assert!(find("avg_ce").is_some());
    let entropy = find("entropy_weighted").expect("the config's plugin listed");
    assert_eq!((entropy["kind"].as_str(), entropy["tier"].as_str()), (Some("fusion"), Some("wasm")));
}

/// Four kinds: the two kinds of aligner apart, `aligner` as a filter for both.
#[test]
fn plugins_list_shows_four_kinds_and_filters_by_kind() {
    let list = |extra: &[&str]| -> Vec<(String, String)> {
        let out = fusellm(&[&["plugins", "list", "--json"], extra].concat());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
        let entries = list.as_array().unwrap().iter();
        entries.map(|p| (p["name"].as_str().unwrap().into(), p["kind"].as_str().unwrap().into())).collect()
    };
    let all = list(&[]);
    let kind_of = |name: &str| all.iter().find(|(n, _)| n == name).map(|(_, k)| k.as_str()).unwrap();
    assert_eq!([kind_of("dtw"), kind_of("offsets")], ["sequence-aligner"; 2]);
    assert_eq!([kind_of("mined"), kind_of("em")], ["vocab-mapper"; 2]);
    assert_eq!([kind_of("llama"), kind_of("min_ce")], ["adapter", "fusion"]);
    let mappers: Vec<String> = list(&["--kind", "vocab-mapper"]).into_iter().map(|(n, _)| n).collect();
    assert_eq!(mappers, ["em", "mined", "ms"]);
    let aligners = list(&["--kind", "aligner"]);
    assert_eq!(aligners.len(), 5, "{aligners:?}");
    assert!(aligners.iter().all(|(_, k)| k == "sequence-aligner" || k == "vocab-mapper"));
    let out = fusellm(&["plugins", "list", "--kind", "mapper"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--kind mapper: not a plugin kind"));
}

#[test]
fn plugins_test_passes_a_good_plugin_and_fails_a_bad_one() {
    let out = fusellm(&["plugins", "test", "min_ce"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("ok    an empty document [granularity = \"token\"]"), "{text}");
    assert!(text.contains("all checks passed"), "{text}");

    let bad = crate::common::dylib("fusellm_test_plugins");
    let out = fusellm(&["plugins", "test", bad.to_str().unwrap(), "--name", "nan_probs"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("FAIL  a 64-token document, 3 candidates, top-10: fusion plugin `nan_probs`"), "{text}");
}

#[test]
fn an_unknown_plugin_is_a_clear_error() {
    let out = fusellm(&["plugins", "test", "avg_cee"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    // Any kind can be tested, so the name is looked up among all plugins.
    assert!(err.contains("unknown plugin `avg_cee`; did you mean `avg_ce`?"), "{err}");
}
