#!/usr/bin/env bash
# The GPU figures in one run, on a machine the device tool lends (prepare .gpu/ first: scripts/gpu_prepare.sh):
#
#     run(command="bash benchmarks/gpu.sh", carry=[".gpu"], timeout_s=540)
#
# 1. Parallel vs recurrent CCM training (benchmarks/train_throughput.py), ccm-concat and ccm-merge.
# 2. Serving decode speed (benchmarks/serve_decode.py): a compressed ~2k-token history against an empty and a
#    full one, and 8 sessions batched against one at a time.
# Both on a SmolLM2-135M-shaped model with random weights, in bfloat16 on the GPU: the timings depend on shapes,
# and the adapters are not loaded (a random model is not the one they were trained on). Rows go to $OUT (the
# device tool brings them back; results/gpu/ when run elsewhere). DEVICE=cpu QUICK=1 runs it here, small, as a
# check of the script itself.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-results/gpu}
device=${DEVICE:-cuda}
dtype=$([ "$device" = cuda ] && echo bfloat16 || echo float32)
[ -f .gpu/transformers.zip ] || { echo "no .gpu/: run scripts/gpu_prepare.sh here first" >&2; exit 2; }
site=$(mktemp -d)
python3 -m zipfile -e .gpu/transformers.zip "$site"
python3 -m zipfile -e .gpu/chatterbot_corpus.zip "$site"  # the small talk of serve_decode's chat histories
export PYTHONPATH="$site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
model=$(mktemp -d)/smollm2-random
mkdir -p "$model" "$out"
cp .gpu/smollm2/*.json .gpu/smollm2/*.jinja "$model"/ 2>/dev/null || true
gunzip -c .gpu/smollm2/tokenizer.json.gz > "$model/tokenizer.json"
python3 - "$model" <<'PY'
import sys, torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM
print("torch", torch.__version__, "transformers", transformers.__version__, "from", transformers.__file__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1])).save_pretrained(sys.argv[1])
PY
if [ "${QUICK:-0}" = 1 ]; then
    train=(--samples 4 --batch-size 2)
    serve=(--history-tokens 200 --new-tokens 4 --sessions 2 --repeats 1)
else
    train=(--samples 32)
    serve=()
fi
for method in ccm-concat ccm-merge; do
    python3 benchmarks/train_throughput.py --model "$model" --method "$method" --device "$device" --dtype "$dtype" \
        "${train[@]}" --out "$out/train_throughput.jsonl"
done
python3 benchmarks/serve_decode.py --model "$model" --device "$device" --dtype "$dtype" "${serve[@]}" \
    --out "$out/serve_decode.jsonl"
