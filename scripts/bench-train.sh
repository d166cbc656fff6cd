#!/usr/bin/env bash
# The training-step benchmark of the README, fusellm beside PyTorch in one run: for vocab
# 32000 and 1000, the CLM step and the FuseLLM step (CLM + sparse fusion), each framework
# in its own process (peak RSS is per process), the two alternating `ROUNDS` times so that
# a busy moment of the machine hits both. Prints a markdown table of the medians.
#
#   scripts/bench-train.sh [ROUNDS=3] [STEPS=20]
# Needs: a release build (cargo build --release), python3 with torch and transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
steps=${2:-20}
bin=./target/release/fusellm
torch=../shared/bench/torch_step.py
[ -x "$bin" ] || { echo "no $bin: run cargo build --release first" >&2; exit 1; }
python3 -c 'import torch, transformers' 2>/dev/null || {
    echo "PyTorch is missing: pip install torch transformers" >&2
    exit 1
}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for round in $(seq "$rounds"); do
    for vocab in 32000 1000; do
        for fusion in "" --fusion; do
            line=$("$bin" bench train --vocab "$vocab" $fusion --only fused --iters "$steps")
            ms=$(grep -o 'median [0-9.]* ms' <<<"$line" | grep -o '[0-9.]*')
            rss=$(grep -o 'RSS of this process: [0-9]* kB' <<<"$line" | grep -o '[0-9]*')
            echo "fusellm $vocab ${fusion:-clm} $ms $((rss / 1024))" >>"$out"
            python3 "$torch" --vocab "$vocab" $fusion --steps "$steps" --json |
                python3 -c "import json,sys; r=json.load(sys.stdin); print('pytorch', $vocab, '${fusion:-clm}', r['median_step_ms'], round(r['peak_rss_mb']))" >>"$out"
        done
    done
    echo "round $round of $rounds done" >&2
done
python3 - "$out" <<'EOF'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    who, vocab, step, ms, rss = line.split()
    runs[(who, int(vocab), step)].append((float(ms), int(rss)))
print("| step | vocab | fusellm | PyTorch | fusellm / PyTorch | peak RSS fusellm / PyTorch |")
print("|---|---|---|---|---|---|")
for vocab in (32000, 1000):
    for step, name in (("clm", "CLM"), ("--fusion", "FuseLLM (CLM + fusion, top-10)")):
        ours, theirs = runs[("fusellm", vocab, step)], runs[("pytorch", vocab, step)]
        a, b = statistics.median(m for m, _ in ours), statistics.median(m for m, _ in theirs)
        print(f"| {name} | {vocab} | {a:.1f} ms | {b:.1f} ms | {a / b:.2f}x | {max(r for _, r in ours)} / {max(r for _, r in theirs)} MB |")
EOF
