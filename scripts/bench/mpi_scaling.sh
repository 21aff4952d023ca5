#!/usr/bin/env bash
# Tokens/s of 1 and 2 MPI ranks (one thread each) against one process with
# one and two threads, for data-parallel training and for tensor- and
# pipeline-parallel inference, on this machine. Rounds alternate so that a
# slow spell of a shared machine hits every configuration alike.
#
# Needs a release build with MPI: cargo build --release -p attn-cli --features mpi
# Usage: scripts/bench/mpi_scaling.sh [ROUNDS]   (prints a Markdown table)
set -euo pipefail
cd "$(dirname "$0")/../.."
ATTN=${ATTN:-target/release/attn}
ROUNDS=${1:-3}
MODEL=${MODEL:-qwen2.5-coder-0.5b-instruct}
MPI=(mpirun --allow-run-as-root --oversubscribe -np 2)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# The char GPT of configs/shakespeare-char.toml (d 256, 4 layers, 16 windows
# of 128 characters per step) on the committed sample texts, 30 steps.
sed -e "s|../data/shakespeare|$PWD/fixtures/corpora/shakespeare|" \
    -e 's/^max_steps = .*/max_steps = 30/' -e 's/^max_minutes = .*//' \
    -e 's/^eval_every = .*/eval_every = 1000/' -e 's/^checkpoint_every = .*/checkpoint_every = 1000/' \
    -e 's/^valid_fraction = .*/valid_fraction = 0.1/' -e 's/^test_fraction = .*/test_fraction = 0.1/' \
    configs/shakespeare-char.toml > "$TMP/gpt.toml"

train() { # label, threads, launcher...
  local label=$1 threads=$2; shift 2
  rm -rf "$TMP/run"
  "$@" "$ATTN" train "$TMP/gpt.toml" -o "$TMP/run" --json -t "$threads" 2>/dev/null | tail -1 |
    python3 -c "import json,sys; print('$label', json.load(sys.stdin)['tokens_per_s'])"
}
generate() { # label, threads, extra flag, launcher...
  local label=$1 threads=$2 flag=$3; shift 3
  "$@" "$ATTN" generate -m "$MODEL" -n 128 --temperature 0 --json -t "$threads" $flag \
    "$(head -c 2000 fixtures/perplexity.txt | tr '\n' ' ')" 2>/dev/null |
    python3 -c "import json,sys; d=json.load(sys.stdin); print('$label', d['prefill_tokens_per_s'], d['decode_tokens_per_s'])"
}

for r in $(seq "$ROUNDS"); do
  train train_1_process_1_thread 1
  train train_1_process_2_threads 2
  train train_2_ranks_1_thread_each 1 "${MPI[@]}"
  generate infer_1_process_1_thread 1 ""
  generate infer_1_process_2_threads 2 ""
  generate infer_2_ranks_tensor_parallel 1 --tensor-parallel "${MPI[@]}"
  generate infer_2_ranks_pipeline_parallel 1 --pipeline-parallel "${MPI[@]}"
done > "$TMP/raw"
cat "$TMP/raw" >&2
python3 - "$TMP/raw" <<'PY'
import sys, statistics as st
rows = {}
for line in open(sys.argv[1]):
    label, *vals = line.split()
    rows.setdefault(label, []).append([float(v) for v in vals])
print("| configuration | tokens/s (median of rounds) |")
print("|---|---|")
for k, v in rows.items():
    name = k.replace("_", " ")
    if len(v[0]) == 1:
        print(f"| {name} | {st.median(x[0] for x in v):.0f} (training) |")
    else:
        print(f"| {name} | prefill {st.median(x[0] for x in v):.1f}, decode {st.median(x[1] for x in v):.1f} |")
PY
