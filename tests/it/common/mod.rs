//! Paths of the plugin artifacts that scripts/build-plugins.sh builds before the tests
//! (cargo does not build a workspace's cdylibs for `cargo test`), and of the shared fixtures.

#![allow(dead_code)]

pub mod alloc;
pub mod fixtures;

use std::path::PathBuf;

use fusellm_core::plugins::{Registry, Tier, WasmLimits};

/// The cargo target folder, found from the test executable (target/<profile>/deps/...).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.ancestors().nth(3).expect("target folder above target/<profile>/deps").to_path_buf()
}

fn must_exist(path: PathBuf) -> PathBuf {
    assert!(path.exists(), "{} is missing: run `bash scripts/build-plugins.sh` before the tests", path.display());
    path
}

/// A plugin crate built as a dylib, in the profile of this test build.
pub fn dylib(crate_name: &str) -> PathBuf {
    let profile_dir = std::env::current_exe().unwrap().ancestors().nth(2).unwrap().to_path_buf();
    must_exist(profile_dir.join(format!("lib{crate_name}.so")))
}

/// A plugin crate built as a WASM component.
pub fn wasm(crate_name: &str) -> PathBuf {
    must_exist(target_dir().join("wasm32-wasip2/plugin-wasm").join(format!("{crate_name}.wasm")))
}

/// The test plugins built against a changed copy of the SDK (scripts/sdk_fixture.py):
/// `skewed_sdk` (the next major version) or `drifted_layout` (a changed interface layout).
pub fn incompatible_dylib(variant: &str) -> PathBuf {
    must_exist(target_dir().join(format!("plugin-fixtures/lib{variant}_plugin.so")))
}

/// A registry holding only the plugins of one file.
pub fn registry_of(tier: Tier, path: &std::path::Path, limits: WasmLimits) -> Registry {
    let mut registry = Registry::empty();
    registry.set_wasm_limits(limits);
    registry.load_file(tier, path).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
    registry
}

/// Sandbox limits small enough to hit quickly, with no on-disk cache.
pub fn tight_limits() -> WasmLimits {
    WasmLimits { deadline: std::time::Duration::from_secs(1), memory_bytes: 64 << 20, cache_dir: None }
}

/// Runs the `fusellm` binary in `dir` with `args`.
pub fn fusellm_in(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_fusellm")).current_dir(dir).args(args).output().expect("run fusellm")
}

/// The cache folder of stage `stage` (`fuse`, `split`, ...) of the run of `dir`'s run.toml.
pub fn stage_dir(dir: &std::path::Path, stage: &str) -> PathBuf {
    std::fs::read_dir(dir.join("out/cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("{stage}-")))
        .unwrap_or_else(|| panic!("no {stage} stage in {}", dir.join("out/cache").display()))
}

/// An experiment in `dir`: a corpus of 24 GSM8K problems, an evaluation set of 8, and
/// run.toml fusing the `models` (its `[target]` and `[[sources]]` tables) with MinCE at
/// 128 tokens, then `steps` training steps and evaluation.
pub fn write_experiment(dir: &std::path::Path, models: &str, steps: usize) {
    let lines: Vec<String> = std::fs::read_to_string(fixtures::root().join("corpora/math/gsm8k.valid.jsonl"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    std::fs::write(dir.join("train.jsonl"), lines[..24].join("\n")).unwrap();
    std::fs::write(dir.join("eval.jsonl"), lines[24..32].join("\n")).unwrap();
    let config = format!(
        r#"[run]
dir = "out"
[data]
corpus = ["train.jsonl"]
text_fields = ["question", "answer"]
max_len = 128
margin = 8
{models}[precompute]
docs_per_shard = 16
[fusion]
plugin = "min_ce"
[train]
steps = {steps}
batch_size = 4
seq_len = 128
lr = 1e-3
warmup_steps = 1
checkpoint_every = 2
[eval]
window = 128
[eval.sets]
math = "eval.jsonl"
"#
    );
    std::fs::write(dir.join("run.toml"), config).unwrap();
}
