#!/usr/bin/env bash
# Builds fusellm with candle's CUDA kernels for H100/H200 (sm_90a) on a machine without a GPU.
#   scripts/cuda-build.sh check    type-check the `cuda` feature (needs only nvcc)
#   scripts/cuda-build.sh build    release build (also needs a libcuda.so to link against)
# The CUDA 13.0 toolkit comes from NVIDIA's PyPI wheels (../shared/cuda/setup-cuda13.sh) into
# ~/.cache/fusellm-cuda13 (about 1.2 GB); compiling candle's kernels takes about 6 minutes on
# 2 cores. For `build`, libcuda.so comes from Debian's libcuda1 (non-free); see the header of
# setup-cuda13.sh. The binary records only the soname: the GPU machine's driver provides it.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-check}
toolkit="${FUSELLM_CUDA_DIR:-$HOME/.cache/fusellm-cuda13}"
# The toolkit's variables are captured first, so that a failed setup stops the script.
env=$(bash ../shared/cuda/setup-cuda13.sh "$toolkit")
eval "$env"
case "$mode" in
  check) cargo check --release --features cuda ;;
  build) cargo build --release --features cuda ;;
  *) echo "usage: $0 [check|build]" >&2; exit 2 ;;
esac
