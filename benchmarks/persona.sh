#!/usr/bin/env bash
# The persona-fact benchmark behind the README and the adapter model card (SmolLM2-135M, 2-core CPU).
#   bash benchmarks/persona.sh [OUT_DIR] [STAGE1_RUN]
# Test dialogs ask about values never seen in training (persona-v3), with answer options of the same kind.
# 1. long dialogs (3 facts + 5 small-talk turns): every method, option scoring and free generation;
#    and the same dialogs with length-normalised option scoring (--score mean);
# 2. dialogs like the training ones (3 facts + 2 small-talk turns), option scoring;
# 3. 1, 3 and 5 facts without small talk: how memory grows per method (ccm-merge stays constant);
# 4. with STAGE1_RUN (a finished `ccmem train persona-full`): `full` on the stage-1 finetuned model;
# 5. cross-dataset: the persona-trained adapters on generated in-context classification (8 demonstrations);
# 6. training throughput, parallel vs recurrent; 7. the reports (tables + quality-vs-memory plots).
# Run nothing else meanwhile: two torch processes on 2 cores slow each other 3-5x and spoil the tokens/s.
set -euo pipefail
out="${1:-results/persona}"
stage1="${2:-}"
mkdir -p "$out"
ccmem eval persona --n 100 --k 3 --small-talk 5 --generate --max-new-tokens 16 --label "3 facts + 5 chat" \
  --methods full,none,ccm-concat,ccm-merge --out "$out/eval.jsonl"
if [ -n "$stage1" ]; then
  ccmem eval persona --n 100 --k 3 --small-talk 5 --generate --max-new-tokens 16 --label "3 facts + 5 chat, stage 1" \
    --methods full --stage1 "$stage1" --out "$out/eval.jsonl"
fi
ccmem eval persona --n 100 --k 3 --small-talk 5 --score mean --label "3 facts + 5 chat, mean score" \
  --methods full,none,ccm-concat,ccm-merge --out "$out/score-mean.jsonl"
ccmem eval persona --n 100 --k 3 --small-talk 2 --label "3 facts + 2 chat" --seed 2 \
  --methods full,none,ccm-concat,ccm-merge --out "$out/short.jsonl"
for k in 1 3 5; do
  ccmem eval persona --n 30 --k "$k" --small-talk 0 --label "$k facts" --seed 1 \
    --methods full,ccm-concat,ccm-merge --out "$out/turns.jsonl"
done
ccmem eval icl --n 100 --k 8 --label "cross-dataset: icl, 8 demos" \
  --methods full,none,ccm-concat,ccm-merge --out "$out/cross.jsonl"
python benchmarks/train_throughput.py --out "$out/throughput.jsonl"
ccmem report "$out/eval.jsonl" --out-dir "$out/report"
ccmem report "$out/short.jsonl" --out-dir "$out/report-short"
ccmem report "$out/turns.jsonl" --out-dir "$out/report-turns"
ccmem report "$out/cross.jsonl" --out-dir "$out/report-cross"
