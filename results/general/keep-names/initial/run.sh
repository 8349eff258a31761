#!/usr/bin/env bash
# keep=names with a sentence's first word kept too where it is no common word (ccmem.methods.ccm.CommonWords),
# against the rows of keep=names without it (../rows.jsonl): the same sets and examples. Measured 2026-12-04
# with that rule patched into the method before it became part of `names`; with ccmem since, plain
# `-O keep=names` (the default) runs it.
set -euo pipefail
out=results/general/keep-names/initial/rows.jsonl
for data in benchmarks/data/heldout-qa benchmarks/data/heldout-qa2; do
  for path in "$data"/*.jsonl; do
    file="$(basename "$path" .jsonl)"
    ccmem eval dialogs --path "$path" --n 100 --methods ccm-concat -O keep=names --label "$file keep=names+initial" -o $out
  done
done
ccmem eval dialogs --n 100 --turns 10 --methods ccm-concat -O keep=names --label "dialogs-10 keep=names+initial" -o $out
ccmem eval persona --n 100 --methods ccm-concat -O keep=names --label "persona keep=names+initial" -o $out
ccmem eval dialogs --n 100 --turns 20 --templates wide --methods ccm-concat -O keep=names --label "wide-20 keep=names+initial" -o $out
for t in 20 5 15; do
  ccmem eval dialogs --n 100 --turns $t --methods ccm-concat -O keep=names --label "dialogs-$t keep=names+initial" -o $out
done
