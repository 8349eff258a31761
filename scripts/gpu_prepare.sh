#!/usr/bin/env bash
# Prepare .gpu/ (ignored by git) for benchmarks/gpu.sh, the GPU figures in one run on a machine the device tool
# lends. Run here, once per checkout, before the tool's `run`:
#
#     bash scripts/gpu_prepare.sh
#     run(command="bash benchmarks/gpu.sh", carry=[".gpu"], timeout_s=540)   # the device tool
#
# The device image has PyTorch, peft, accelerate, typer, rich, safetensors ... but transformers 5.17, and ccmem
# needs 5.24 (the `cache=` forward argument); its 13.5 MB wheel would not fit beside the tracked tree in the 64 MiB
# that travels. So .gpu/ holds transformers 5.24 slimmed to the model families the benchmarks load (llama, plus
# auto and encoder_decoder, which transformers imports itself): about 2.3 MB zipped. It also holds SmolLM2-135M's
# config and tokenizer (0.6 MB gzipped) and chatterbot-corpus's English files (45 KB), which the dialog generator
# reads. The model's weights stay behind, and benchmarks/gpu.sh makes random ones of that shape: throughput and
# speed ratios depend on shapes, not on trained values.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(python -c "import transformers; print(transformers.__version__)")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m pip download -q --no-deps --only-binary=:all: "transformers==$version" -d "$work/wheel"
python -m zipfile -e "$work"/wheel/transformers-*.whl "$work/site"
find "$work/site/transformers/models" -mindepth 1 -maxdepth 1 -type d \
    ! -name auto ! -name llama ! -name encoder_decoder -exec rm -rf {} +
find "$work/site" -name __pycache__ -prune -exec rm -rf {} +
rm -rf .gpu && mkdir -p .gpu/smollm2
(cd "$work/site" && python -m zipfile -c "$OLDPWD/.gpu/transformers.zip" transformers transformers-*.dist-info)
# serve_decode's chat histories draw small talk from chatterbot-corpus's English files, which the image lacks
python -m pip download -q --no-deps --only-binary=:all: chatterbot-corpus==1.3.3 -d "$work/corpus"
python -m zipfile -e "$work"/corpus/chatterbot_corpus-*.whl "$work/corpus/site"
find "$work/corpus/site/chatterbot_corpus/data" -mindepth 1 -maxdepth 1 ! -name english -exec rm -rf {} +
(cd "$work/corpus/site" && python -m zipfile -c "$OLDPWD/.gpu/chatterbot_corpus.zip" chatterbot_corpus)
model=$(python -c "from ccmem.loading import _checkpoint_folder; print(_checkpoint_folder('smollm2-135m'))")
for f in config.json generation_config.json tokenizer_config.json chat_template.jinja; do
    [ -f "$model/$f" ] && cp "$model/$f" .gpu/smollm2/
done
gzip -9 -c "$model/tokenizer.json" > .gpu/smollm2/tokenizer.json.gz
du -sh .gpu
total=$(( $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) + $(du -sb .gpu | cut -f1) ))
echo "tracked tree + .gpu: $((total / 1048576)) MiB of the 64 MiB the device tool carries"
