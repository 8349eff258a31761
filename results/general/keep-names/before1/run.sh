#!/usr/bin/env bash
# keep=names with keep_before=1 (the word before each run of kept words raw too: "extension 8850", "from 48 ...
# to 221 ...", "cousin Aoife") against the shipped keep=names (../initial/rows.jsonl): the same sets and examples.
# Measured 2026-12-04 with the option patched into ccm-concat; it lost (README) and was dropped, so this script no
# longer runs as is. Stopped after the seventh file.
set -euo pipefail
out=results/general/keep-names/before1/rows.jsonl
for data in benchmarks/data/heldout-qa benchmarks/data/heldout-qa2; do
  for path in "$data"/*.jsonl; do
    file="$(basename "$path" .jsonl)"
    ccmem eval dialogs --path "$path" --n 100 --methods ccm-concat -O keep=names -O keep_before=1 --label "$file keep=names+before1" -o $out
  done
done
ccmem eval dialogs --n 100 --turns 10 --methods ccm-concat -O keep=names -O keep_before=1 --label "dialogs-10 keep=names+before1" -o $out
ccmem eval persona --n 100 --methods ccm-concat -O keep=names -O keep_before=1 --label "persona keep=names+before1" -o $out
ccmem eval dialogs --n 100 --turns 20 --templates wide --methods ccm-concat -O keep=names -O keep_before=1 --label "wide-20 keep=names+before1" -o $out
for t in 20 5 15; do
  ccmem eval dialogs --n 100 --turns $t --methods ccm-concat -O keep=names -O keep_before=1 --label "dialogs-$t keep=names+before1" -o $out
done
