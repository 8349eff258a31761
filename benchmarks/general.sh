#!/usr/bin/env bash
# Does a compression adapter work on what it was not trained for? One `ccmem compare` grid across task families
# (SmolLM2-135M, 2-core CPU), the model card's and README's "General adapters" table.
#   bash benchmarks/general.sh [OUT_DIR] [NEW_CONCAT] [NEW_MERGE] [N] [OLD_CONCAT]
# NEW_CONCAT / NEW_MERGE: adapters to judge as ccm-concat@unified / ccm-merge@unified (default:
# runs/unified-ccm-{concat,merge}/adapter.safetensors, when present; "none" skips one), run beside the shipped
# adapters. OLD_CONCAT: another concat adapter shown as ccm-concat@persona, e.g. the persona-only one that
# shipped before the general one: git show 630a6cb^:src/ccmem/adapters/smollm2-135m/ccm-concat.safetensors > old.st
# (results/general/ was made before the general concat adapter shipped: there ccm-concat is the persona one).
# Families, all test splits:
#   persona    persona-v3 dialogs, 3 facts among 5 small-talk turns (the old adapters' own task)
#   dialogs-N  varied fact dialogs of exactly N turns (5, 10, 20), 3-5 facts, wordings and 5 fact kinds never
#              seen in training, corrections; accuracy by turns between the fact and the question
#   passages   QA over 3 Wikipedia passages shared in a chat
#   icl        in-context classification, 8 demonstrations
#   text       Shakespeare continuation perplexity after ~1,200 characters
# expected-attention (the strongest training-free peer in earlier grids) runs at 1/8 and 1/16 of the context.
# Run nothing else meanwhile: two torch processes on 2 cores slow each other 3-5x.
set -euo pipefail
out="${1:-results/general}"
concat="${2:-runs/unified-ccm-concat/adapter.safetensors}"
merge="${3:-runs/unified-ccm-merge/adapter.safetensors}"
n="${4:-40}"
old="${5:-}"
methods="full,none,ccm-concat,ccm-merge,expected-attention"
adapters=()
if [ -f "$concat" ]; then methods+=",ccm-concat@unified"; adapters+=(--adapter "ccm-concat@unified=$concat"); fi
if [ -f "$merge" ]; then methods+=",ccm-merge@unified"; adapters+=(--adapter "ccm-merge@unified=$merge"); fi
if [ -n "$old" ]; then methods+=",ccm-concat@persona"; adapters+=(--adapter "ccm-concat@persona=$old"); fi
ccmem compare --tasks persona,dialogs-5,dialogs-10,dialogs-20,passages,icl,text --n "$n" \
  --methods "$methods" "${adapters[@]}" --budgets 1/8,1/16 --no-decode --out-dir "$out"
