#!/usr/bin/env bash
# The test command: builds the plugin artifacts the tests load, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v mpirun >/dev/null; then
  echo "error: the data-parallel tests need OpenMPI: apt-get install libopenmpi-dev openmpi-bin libclang-dev" >&2
  exit 1
fi
bash scripts/build-plugins.sh
cargo test --workspace --features fusellm/mpi
