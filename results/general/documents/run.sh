#!/usr/bin/env bash
# The shipped ccm-concat (keep=names) on PwC-style documents: 100 held-out questions, option scoring, with the
# adapter's training system prompt (the default) at three chunk sizes, and with none (as the IC-Former table).
set -euo pipefail
out=results/general/documents/pwc-rows.jsonl
for c in 512 48 24; do
  ccmem eval pwc --n 100 --methods ccm-concat -O max_chunk_tokens=$c --label "pwc chunk=$c" -o $out
done
ccmem eval pwc --n 100 --methods full,none --label "pwc ref" -o $out
ccmem eval pwc --n 100 --system "" --methods ccm-concat --label "pwc system='' keep=names" -o $out
