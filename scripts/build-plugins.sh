#!/usr/bin/env bash
# Builds the plugin artifacts that the tests and benchmarks load (cargo does not build a
# workspace's cdylibs for `cargo test`):
#   target/<profile>/lib*.so                   the plugin crates as dylibs
#   target/wasm32-wasip2/plugin-wasm/*.wasm     the same crates as WASM components
#   target/plugin-fixtures/libskewed_sdk_plugin.so
#                                               a dylib claiming another SDK version
# Usage: scripts/build-plugins.sh [--release]
set -euo pipefail
cd "$(dirname "$0")/.."
profile=debug
flags=()
if [ "${1:-}" = "--release" ]; then profile=release; flags=(--release); fi
target="${CARGO_TARGET_DIR:-target}"
plugins=(-p fusellm-ce-fusion -p entropy-fusion -p fusellm-test-plugins)

rustup target add wasm32-wasip2 >/dev/null 2>&1 || rustup target list --installed | grep -q wasm32-wasip2

# The version-skew fixture first: the same test plugins, built claiming SDK 1.0.0.
cargo build "${flags[@]}" -p fusellm-test-plugins --features fusellm-sdk/simulate-next-major
mkdir -p "$target/plugin-fixtures"
cp "$target/$profile/libfusellm_test_plugins.so" "$target/plugin-fixtures/libskewed_sdk_plugin.so"

cargo build "${flags[@]}" "${plugins[@]}"
cargo build --profile plugin-wasm --target wasm32-wasip2 "${plugins[@]}"
