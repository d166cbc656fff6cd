#!/usr/bin/env bash
# Builds the plugin artifacts that the tests and benchmarks load (cargo does not build a
# workspace's cdylibs for `cargo test`), under cargo's target folder:
#   <profile>/lib*.so                         the plugin crates as dylibs
#   wasm32-wasip2/plugin-wasm/*.wasm          the same crates as WASM components
#   plugin-fixtures/libskewed_sdk_plugin.so   a dylib claiming another SDK version
#   plugin-fixtures/libdrifted_layout_plugin.so
#                                             a dylib whose interface layout differs
#                                             (both built against a changed copy of the
#                                             SDK that scripts/sdk_fixture.py makes)
# Plugin cdylibs are built in cargo invocations of their own: built together with the
# fusellm binary, they would get the SDK's `builtin` feature and export nothing.
# Usage: scripts/build-plugins.sh [--release]
set -euo pipefail
cd "$(dirname "$0")/.."
profile=debug
flags=(--profile dev)
if [ "${1:-}" = "--release" ]; then profile=release; flags=(--release); fi
target=$(cargo metadata --no-deps --format-version 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
plugins=(-p fusellm-ce-fusion -p fusellm-align -p fusellm-llama -p fusellm-mpt -p fusellm-gpt-neox -p fusellm-gemma -p fusellm-phi3 -p entropy-fusion -p gpt-neox-adapter -p fusellm-test-plugins)

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
  rustup target add wasm32-wasip2 || { echo "error: the wasm32-wasip2 target is missing and could not be installed (offline?)" >&2; exit 1; }
fi

# The incompatible fixtures: the test plugins built against a changed copy of the SDK, in
# a target folder of their own (cargo names a workspace's crates by their path inside it,
# so the copy's artifacts would replace the real SDK's in this one).
fixtures="$target/plugin-fixtures"
for fixture in skewed_sdk drifted_layout; do
  python3 scripts/sdk_fixture.py "$fixture" "$fixtures/$fixture"
  (cd "$fixtures/$fixture" && CARGO_TARGET_DIR="$fixtures/target" cargo build "${flags[@]}" -p fusellm-test-plugins)
  cp "$fixtures/target/$profile/libfusellm_test_plugins.so" "$fixtures/lib${fixture}_plugin.so"
done

cargo build "${flags[@]}" "${plugins[@]}"
cargo build --profile plugin-wasm --target wasm32-wasip2 "${plugins[@]}"
