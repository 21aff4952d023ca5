#!/usr/bin/env bash
# Speculative decoding against plain decoding on Gemma 3 270M Q4_K_M: decode
# tok/s, acceptance rate and (greedy) whether the tokens equal plain decoding's,
# for a prompt whose continuation echoes it (greedy) and prose whose
# continuation does not (sampled: temperature 0.8, top-k 40, top-p 0.95,
# min-p 0.05, seed 7; greedy decoding of the base model loops on most prompts),
# with `--draft ngram` and with a draft model, on candle's quantized kernels and
# on the batched 8-bit kernel (`--batched-kernel`).
#
#   scripts/bench/speculative.sh [DRAFT.gguf] [N_TOKENS] [THREADS]
#
# DRAFT.gguf: a draft model sharing the tokenizer, e.g. the copy with a Q4_0
# embedding/output projection written by scripts/bench/make_draft_gguf.py.
# Uses target/release/attn (cargo build --release -p attn-cli).
set -euo pipefail
ATTN=${ATTN:-${CARGO_TARGET_DIR:-target}/release/attn}
DRAFT=${1:-}
N=${2:-128}
T=${3:-2}
REPETITIVE='Copy the list exactly, twice.
List: apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, lemon, mango, nectarine, orange, papaya, quince, raspberry, strawberry, tangerine.
Copy 1: apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, lemon, mango, nectarine, orange, papaya, quince, raspberry, strawberry, tangerine.
Copy 2:'
OTHER='In the spring of 1887, the small fishing village of'

run() { # prompt-name prompt kernel-flag label [flags...]
  local name=$1 prompt=$2 kflag=$3 mode=$4; shift 4
  local temp=(--temperature 0)
  if [ "$name" = other ]; then temp=(--temperature 0.8 --seed 7); fi
  "$ATTN" generate "$prompt" -n "$N" -t "$T" "${temp[@]}" --json $kflag "$@" >/tmp/spec_bench_$$.json
  python3 - "$name" "${kflag:-candle}" "$mode" /tmp/spec_bench_$$.json /tmp/spec_bench_plain_$$_"${name}_${kflag:-candle}".json <<'PY'
import json, sys, os, shutil
name, kernel, mode, path, plain_path = sys.argv[1:]
v = json.load(open(path))
if mode == "plain":
    shutil.copy(path, plain_path)
p = json.load(open(plain_path))
s = v.get("speculative")
acc = f'{s["accepted"]}/{s["proposed"]} ({100*s["acceptance_rate"]:.0f}%)' if s else "-"
calls = s["target_calls"] if s else v["completion_tokens"] - 1
same = ("yes" if v["completion_ids"] == p["completion_ids"] else "NO") if name != "other" else "(sampled)"
speed = v["decode_tokens_per_s"] / p["decode_tokens_per_s"]
print(f'| {name} | {kernel} | {mode} | {v["completion_tokens"]} | {calls} | {acc} | {v["decode_tokens_per_s"]:.1f} | {speed:.2f}x | {same} |')
PY
}

echo "| prompt | kernel | drafter | tokens | target calls | accepted | decode tok/s | vs plain | same tokens |"
echo "|---|---|---|---|---|---|---|---|---|"
for kflag in "" "--batched-kernel"; do
  for p in repetitive other; do
    if [ $p = repetitive ]; then prompt=$REPETITIVE; else prompt=$OTHER; fi
    run $p "$prompt" "$kflag" plain
    run $p "$prompt" "$kflag" "ngram k4" --draft ngram --draft-k 4
    if [ -n "$DRAFT" ]; then
      run $p "$prompt" "$kflag" "$(basename "$DRAFT") k4" --draft "$DRAFT" --draft-k 4
    fi
  done
done
rm -f /tmp/spec_bench_$$.json /tmp/spec_bench_plain_$$_*.json
