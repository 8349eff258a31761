#!/usr/bin/env bash
# The persona-fact benchmark behind the README and the adapter model card (SmolLM2-135M, 2-core CPU).
#   bash benchmarks/persona.sh [OUT_DIR]
# 1. held-out dialogs (3 facts + 2 small-talk turns, values never seen in training): every method side by side,
#    option scoring and free generation;
# 2. the same with 1..5 facts (no small talk) to show memory growth per method (ccm-merge stays constant);
# 3. training throughput, parallel vs recurrent; 4. the report (tables + quality-vs-memory plot).
set -euo pipefail
out="${1:-results/persona}"
mkdir -p "$out"
ccmem eval persona --n 100 --k 3 --small-talk 2 --generate --max-new-tokens 16 --label "3 facts + 2 chat" \
  --methods full,none,ccm-concat,ccm-merge --out "$out/eval.jsonl"
for k in 1 3 5; do
  ccmem eval persona --n 50 --k "$k" --small-talk 0 --label "$k facts" --seed 1 \
    --methods full,ccm-concat,ccm-merge --out "$out/turns.jsonl"
done
python benchmarks/train_throughput.py --out "$out/throughput.jsonl"
ccmem report "$out/eval.jsonl" --out-dir "$out/report"
ccmem report "$out/turns.jsonl" --out-dir "$out/report-turns"
