#!/usr/bin/env bash
# Dialogs written by hand, unlike every generator in ccmem (other wordings and fact kinds, values that must come
# back exactly, corrections, several people, 24-34 turns, CRLF and BOM files): how far the shipped adapters
# generalise. The files (benchmarks/data/heldout-qa/, README there) are never trained on.
#   bash benchmarks/heldout.sh [OUT_DIR] [CANDIDATE_CONCAT] [N] [DATA_DIR]
# DATA_DIR: benchmarks/data/heldout-qa (default) or the second set, benchmarks/data/heldout-qa2 (other writers'
# habits: dates and numbers, 3-5 people, 36-50 turns, facts changed twice or only considered).
# Runs full, none and the shipped ccm-concat and ccm-merge on each file (--label names the file), and, given
# CANDIDATE_CONCAT, that concat adapter too (its rows carry its own adapter hash); then `ccmem report`.
# N caps the examples per file (default 100: more than any file holds, so all). OUT_DIR defaults to
# results/general/<DATA_DIR's name>. Run nothing else meanwhile: two torch processes on 2 cores slow each other 3-5x.
set -euo pipefail
data="${4:-$(dirname "$0")/data/heldout-qa}"
out="${1:-results/general/$(basename "$data")}"  # each set's rows and report in a folder of their own
candidate="${2:-}"
n="${3:-100}"
shopt -s nullglob
files=("$data"/*.jsonl)
if [ ${#files[@]} -eq 0 ]; then
  echo "heldout.sh: no .jsonl file in $data (DATA_DIR, the 4th argument)" >&2
  exit 2
fi
mkdir -p "$out"
for path in "${files[@]}"; do
  file="$(basename "$path" .jsonl)"
  ccmem eval dialogs --path "$data/$file.jsonl" --n "$n" --methods full,none,ccm-concat,ccm-merge \
    --label "$file" -o "$out/rows.jsonl"
  if [ -n "$candidate" ]; then
    ccmem eval dialogs --path "$data/$file.jsonl" --n "$n" --methods ccm-concat \
      --adapter "ccm-concat=$candidate" --label "$file" -o "$out/rows.jsonl"
  fi
done
ccmem report "$out/rows.jsonl" -o "$out"
