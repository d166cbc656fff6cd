#!/usr/bin/env bash
# The cost of data parallelism on CPU: one global batch trained by one process (all
# threads) and by two ranks under mpirun (half the threads each, half the batch each), on
# the fused store of the fixture experiment, in one run of this script. Prints each run's
# throughput over its steps after the first, and the ratio.
# Usage: scripts/bench-dp.sh [STEPS] [GLOBAL_BATCH]   (needs OpenMPI; builds --features mpi)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-20}
batch=${2:-8}
threads=$(nproc)
cargo build --release --features mpi -q
bin=$PWD/target/release/fusellm
config=examples/configs/fuse-fixtures.toml
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The fused store: the experiment's stages up to fuse (training and evaluation are short).
"$bin" run "$config" --set "run.dir=$work/run" --set train.steps=1 >/dev/null 2>&1
fused=$(ls -d "$work"/run/cache/fuse-*)
train=(train --config "$config" --fused "$fused" --set "train.steps=$steps" --set train.checkpoint_every=1000000)

RAYON_NUM_THREADS=$threads "$bin" "${train[@]}" --out "$work/one" --set "train.batch_size=$batch" >/dev/null 2>&1
RAYON_NUM_THREADS=$((threads / 2)) mpirun -np 2 --allow-run-as-root --oversubscribe \
  --mca btl_vader_single_copy_mechanism none -x RAYON_NUM_THREADS \
  "$bin" "${train[@]}" --out "$work/two" --set "train.batch_size=$((batch / 2))" >/dev/null 2>&1

python3 - "$work" "$steps" "$batch" <<'EOF'
import json, sys
work, steps, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def rate(run):
    rows = [json.loads(l) for l in open(f"{work}/{run}/metrics.jsonl")]
    # Steps after the first (which pays for warming up), from the cumulative counters.
    first, last = rows[0], rows[-1]
    return (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"])
one, two = rate("one"), rate("two")
print(f"global batch {batch} x 512, {steps} steps, tiny-llama2 target, f32 CPU")
print(f"1 process:  {one:,.0f} tokens/s")
print(f"2 ranks:    {two:,.0f} tokens/s ({two / one:.2f}x the single process)")
EOF
