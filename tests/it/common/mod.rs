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

/// The test plugins built with a simulated SDK change: `skewed_sdk` (the next major
/// version) or `drifted_layout` (a changed interface layout).
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
