#!/usr/bin/env bash
# The test command: builds the plugin artifacts the tests load, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build-plugins.sh
cargo test --workspace
