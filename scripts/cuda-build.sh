#!/usr/bin/env bash
# Builds fusellm with candle's CUDA kernels for H100/H200 (sm_90a) on a machine without a GPU.
#   scripts/cuda-build.sh check    type-check the `cuda` feature, and compile fusellm's own
#                                  CUDA kernels with NVRTC (a unit test that needs no GPU)
#   scripts/cuda-build.sh build    release build of the fusellm binary
#   scripts/cuda-build.sh tests    release build of the integration tests (prints the binary)
# The CUDA 13.0 toolkit comes from NVIDIA's PyPI wheels (../shared/cuda/setup-cuda13.sh) into
# ~/.cache/fusellm-cuda13 (about 1.2 GB); compiling candle's kernels takes about 6 minutes on
# 2 cores. Linking needs a libcuda.so, which the wheels lack: `build` and `tests` take the one
# of Debian's libcuda1 package (non-free), unpacked beside the toolkit without installing it,
# and a libnccl.so for the NCCL backend, from NVIDIA's nvidia-nccl-cu13 wheel.
# The binary records only the soname libcuda.so.1; the GPU machine's driver provides it.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-check}
toolkit="${FUSELLM_CUDA_DIR:-$HOME/.cache/fusellm-cuda13}"
# The toolkit's variables are captured first, so that a failed setup stops the script.
env=$(bash ../shared/cuda/setup-cuda13.sh "$toolkit")
eval "$env"

# A libcuda.so to link against: the system's, or Debian's libcuda1 unpacked.
link_libcuda() {
  if ldconfig -p | grep -q 'libcuda.so '; then return; fi
  local dir="$toolkit/libcuda"
  if [ ! -e "$dir/libcuda.so" ]; then
    local deb
    deb=$(mktemp -d)
    if ! grep -rqs 'non-free' /etc/apt/sources.list /etc/apt/sources.list.d/; then
      printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: non-free\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        >/etc/apt/sources.list.d/fusellm-nonfree.sources
      apt-get update -qq >&2
    fi
    (cd "$deb" && apt-get download -qq libcuda1 >&2 && dpkg-deb -x libcuda1_*.deb x)
    mkdir -p "$dir"
    cp -P "$deb"/x/usr/lib/x86_64-linux-gnu/nvidia/current/libcuda.so* "$dir/"
    rm -rf "$deb"
  fi
  export LIBRARY_PATH="$dir:${LIBRARY_PATH:-}" LD_LIBRARY_PATH="$dir:${LD_LIBRARY_PATH:-}"
}

# A libnccl.so to link the NCCL backend against: NVIDIA's wheel, unpacked beside the
# toolkit. The binary records the soname libnccl.so.2; on the GPU machine PyTorch's copy
# provides it (scripts/gpu-check.sh).
link_nccl() {
  local lib="$toolkit/nvidia/nccl/lib"
  if [ ! -e "$lib/libnccl.so" ]; then
    python3 -m pip download -q --no-deps -d "$toolkit/whl-nccl" nvidia-nccl-cu13==2.32.6 >&2
    unzip -qo "$toolkit"/whl-nccl/nvidia_nccl_cu13-*.whl 'nvidia/nccl/lib/*' -d "$toolkit" >&2
    ln -sf libnccl.so.2 "$lib/libnccl.so"
  fi
  export LIBRARY_PATH="$lib:${LIBRARY_PATH:-}" LD_LIBRARY_PATH="$lib:${LD_LIBRARY_PATH:-}"
}

case "$mode" in
  check)
    cargo check --release --features cuda
    link_libcuda
    link_nccl
    cargo test --release --features cuda -p fusellm-blocks --lib cuda
    ;;
  build) link_libcuda; link_nccl; cargo build --release --features cuda ;;
  tests)
    link_libcuda
    link_nccl
    cargo test --release --features cuda --test it --no-run --message-format json |
      python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "it":
        print(m["executable"])'
    ;;
  *) echo "usage: $0 [check|build|tests]" >&2; exit 2 ;;
esac
