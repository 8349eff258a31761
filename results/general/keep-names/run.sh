#!/usr/bin/env bash
# keep=values (the shipped default until 2026-12-03) against keep=names (the default since), ccm-concat, same examples
set -euo pipefail
out=runs/keepnames/rows.jsonl
for data in benchmarks/data/heldout-qa benchmarks/data/heldout-qa2; do
  for path in "$data"/*.jsonl; do
    file="$(basename "$path" .jsonl)"
    for keep in values names; do
      ccmem eval dialogs --path "$path" --n 100 --methods ccm-concat -O keep=$keep --label "$file keep=$keep" -o $out
    done
  done
done
for keep in values names; do
  ccmem eval dialogs --n 100 --turns 10 --methods ccm-concat -O keep=$keep --label "dialogs-10 keep=$keep" -o $out
  ccmem eval persona --n 100 --methods ccm-concat -O keep=$keep --label "persona keep=$keep" -o $out
done
# second batch (2026-12-03 night), the same rows.jsonl: the wide bank at 20 turns, generated dialogs of 5/15/20 turns
for keep in values names; do
  ccmem eval dialogs --n 100 --turns 20 --templates wide --methods ccm-concat -O keep=$keep --label "wide-20 keep=$keep" -o $out
  for t in 5 15 20; do
    ccmem eval dialogs --n 100 --turns $t --methods ccm-concat -O keep=$keep --label "dialogs-$t keep=$keep" -o $out
  done
done
echo DONE
