#!/usr/bin/env bash
# The GPU check of the training-speed issue, in two halves.
#   scripts/gpu-check.sh build   here, without a GPU: the CUDA build of the fusellm binary and of
#                                the integration tests (scripts/cuda-build.sh), stripped and
#                                compressed into gpu-check/ (gitignored; must stay within 64 MiB)
#   scripts/gpu-check.sh run     on the GPU machine, from the repository root with gpu-check/
#                                carried over: the device tests (tests/it/device.rs), then the
#                                training benchmark in bf16 (tokens/s, MFU), fused and composed,
#                                and a bf16 step of a 1.1B Llama with checkpointed activations
#                                and its gradients all-reduced over NCCL at world size 1;
#                                about 5 minutes; every step runs even if one fails
# The GPU machine has driver 580; the CUDA 13 libraries (cuBLAS, cuRAND, NVRTC, NCCL) come from
# its PyTorch install, found under python's site-packages.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: $0 build|run}
dir=gpu-check
case "$mode" in
  build)
    bash scripts/cuda-build.sh build
    tests=$(bash scripts/cuda-build.sh tests | tail -1)
    rm -rf "$dir" && mkdir -p "$dir"
    strip -o "$dir/fusellm" target/release/fusellm
    strip -o "$dir/it" "$tests"
    xz -T2 -6 "$dir/fusellm" "$dir/it"
    du -ch "$dir"/* | tail -1
    size=$(du -cb "$dir"/* | tail -1 | cut -f1)
    [ "$size" -le $((64 * 1024 * 1024)) ] || { echo "gpu-check/ is $size bytes, over 64 MiB" >&2; exit 1; }
    ;;
  run)
    [ -e "$dir/fusellm.xz" ] || { echo "no $dir/fusellm.xz: run '$0 build' first and carry $dir" >&2; exit 1; }
    site=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))')
    libs=$(find $site -name 'libcublas.so.13*' -o -name 'libcurand.so.10*' -o -name 'libnvrtc.so.13*' -o -name 'libnccl.so.2*' 2>/dev/null |
      xargs -r -n1 dirname | sort -u | tr '\n' ':')
    [ -n "$libs" ] || { echo "no libcublas.so.13 under $site (PyTorch with CUDA 13?)" >&2; exit 1; }
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:-}"
    work=$(mktemp -d)
    xz -dc "$dir/fusellm.xz" >"$work/fusellm" && xz -dc "$dir/it.xz" >"$work/it"
    chmod +x "$work/fusellm" "$work/it"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
    # Every step runs even when one before it fails; the exit status says whether all passed.
    # The logs also go to $OUT when the device tool sets it.
    logs=${OUT:-$work}
    status=0
    timeout 150 "$work/it" --ignored --test-threads 1 --nocapture device:: 2>&1 | tee "$logs/device-tests.log" || status=1
    # A Llama of about 0.5B parameters, in bf16 with f32 master weights; 989 TFLOP/s is the
    # dense bf16 peak of an H100 or H200 (SXM). The composed run measures what our layer
    # kernels bring over candle's compositions (both use the in-place AdamW). The timeouts
    # add up to 570 s, within the device tool's 600 s per command.
    cat >"$work/llama.json" <<'JSON'
{"model_type": "llama", "vocab_size": 32000, "hidden_size": 1536, "intermediate_size": 4096,
 "num_hidden_layers": 16, "num_attention_heads": 12, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5}
JSON
    llama=(bench train --device cuda --dtype bf16 --config "$work/llama.json" --batch 8 --seq 1024 --iters 10 --peak-tflops 989)
    for args in "--only fused" "--only fused --fusion" "--only composed"; do
      # shellcheck disable=SC2086 # the arguments split on purpose
      timeout 100 "$work/fusellm" "${llama[@]}" $args 2>&1 | tee -a "$logs/bench.log" || status=1
    done
    timeout 40 "$work/fusellm" bench train --device cuda --vocab 32000 --iters 20 --only fused 2>&1 |
      tee -a "$logs/bench.log" || status=1
    # TinyLlama-1.1B's shape; a torchrun-style world of one, so that the step goes through
    # the NCCL communicator (rendezvous on MASTER_PORT + 1).
    cat >"$work/llama1b.json" <<'JSON'
{"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
 "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
 "max_position_embeddings": 2048, "rms_norm_eps": 1e-5}
JSON
    RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29400 timeout 80 "$work/fusellm" bench train \
      --device cuda --dtype bf16 --config "$work/llama1b.json" --batch 4 --seq 1024 --iters 3 --only fused \
      --checkpoint-activations --peak-tflops 989 2>&1 | tee -a "$logs/bench.log" || status=1
    exit $status
    ;;
  *) echo "usage: $0 build|run" >&2; exit 2 ;;
esac
