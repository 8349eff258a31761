#!/usr/bin/env bash
# keep=values (shipped default) against keep=names, ccm-concat, same examples
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
echo DONE
