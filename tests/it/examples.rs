//! The examples stay true: the README shows the example plugin's real source, and every
//! example config parses.

use fusellm_core::config::Config;

#[test]
fn the_examples_readme_shows_the_example_plugin_verbatim() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/examples/README.md")).unwrap();
    let source = std::fs::read_to_string(format!("{root}/examples/entropy-fusion/src/lib.rs")).unwrap();
    assert!(
        readme.contains(&format!("```rust\n{source}```")),
        "examples/README.md is out of date with entropy-fusion/src/lib.rs"
    );
    let rust_lines = source.lines().filter(|l| !l.trim().is_empty()).count();
    assert!(rust_lines <= 30, "the example is {rust_lines} lines of Rust; the README promises under 30");
}

#[test]
fn every_example_config_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(config.fusion.is_some(), "{}", path.display());
        seen += 1;
    }
    assert_eq!(seen, 4);
}

#[test]
fn the_fixture_experiment_validates() {
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/configs/fuse-fixtures.toml");
    let out = crate::common::fusellm_in(std::path::Path::new("."), &["validate", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("fusion `min_ce`"));
}
