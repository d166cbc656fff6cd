#!/usr/bin/env bash
# Builds the plugin artifacts that the tests and benchmarks load (cargo does not build a
# workspace's cdylibs for `cargo test`):
#   target/<profile>/lib*.so                   the plugin crates as dylibs
#   target/wasm32-wasip2/plugin-wasm/*.wasm     the same crates as WASM components
#   target/plugin-fixtures/libskewed_sdk_plugin.so
#                                               a dylib claiming another SDK version
#   target/plugin-fixtures/libdrifted_layout_plugin.so
#                                               a dylib whose interface layout differs
# Plugin cdylibs are built in cargo invocations of their own: built together with the
# fusellm binary, they would get the SDK's `builtin` feature and export nothing.
# Usage: scripts/build-plugins.sh [--release]
set -euo pipefail
cd "$(dirname "$0")/.."
profile=debug
flags=()
if [ "${1:-}" = "--release" ]; then profile=release; flags=(--release); fi
target="${CARGO_TARGET_DIR:-target}"
plugins=(-p fusellm-ce-fusion -p fusellm-llama -p fusellm-mpt -p entropy-fusion -p gpt-neox-adapter -p fusellm-test-plugins)

rustup target add wasm32-wasip2 >/dev/null 2>&1 || rustup target list --installed | grep -q wasm32-wasip2

# The incompatible fixtures first: the test plugins built with a simulated SDK change.
mkdir -p "$target/plugin-fixtures"
for variant in next-major:skewed_sdk layout-drift:drifted_layout; do
  cargo build "${flags[@]}" -p fusellm-test-plugins --features "fusellm-sdk/simulate-${variant%%:*}"
  cp "$target/$profile/libfusellm_test_plugins.so" "$target/plugin-fixtures/lib${variant##*:}_plugin.so"
done

cargo build "${flags[@]}" "${plugins[@]}"
cargo build --profile plugin-wasm --target wasm32-wasip2 "${plugins[@]}"
