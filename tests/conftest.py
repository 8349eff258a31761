"""Tiny randomly initialised models of several families, built from configs in code (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    Gemma3TextConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    T5Config,
)

from ccmem.loading import LoadedModel

VOCAB = 97

COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=256)

CONFIGS = {
    "llama-gqa": lambda: LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2),
    "mistral": lambda: MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, sliding_window=None),
    # A window shorter than the test sequences, so that it really cuts (every layer slides).
    "mistral-window": lambda: MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, sliding_window=5),
    "qwen2": lambda: Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2),
    "gpt-neox": lambda: GPTNeoXConfig(**COMMON, num_attention_heads=4),
    "gemma3": lambda: Gemma3TextConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=512
    ),
    # Encoder-decoder (relative position bias in layer 0, shared by every layer); 8 buckets: distances really bucket.
    "t5": lambda: T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    ),
}


class TinyTokenizer:
    """Just enough tokenizer for tests: characters -> ids (mod vocab), no chat template."""

    chat_template = None
    eos_token_id = 1
    pad_token_id = 0
    bos_token_id = None
    eos_token = "</s>"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [3 + (ord(c) % (VOCAB - 3)) for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + (int(i) % 26)) for i in ids if int(i) > 2)

    def convert_tokens_to_ids(self, token):
        return None

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        """The character each id encodes (``encode``'s inverse for ASCII: ids 51-60 are the digits 0-9)."""
        return [chr(int(i) - 3) if 2 < int(i) < VOCAB else None for i in ids]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)


def tiny_model(family: str = "llama-gqa", attn: str = "sdpa", seed: int = 0, positions: int = 256) -> LoadedModel:
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    config.max_position_embeddings = positions
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation=attn, dtype=torch.float32)
    model.eval()
    return LoadedModel(model=model, tokenizer=TinyTokenizer(), name=f"tiny-{family}")


@pytest.fixture
def tiny_llama() -> LoadedModel:
    return tiny_model("llama-gqa")


def lora_pairs(method, lm):
    """The LoRA pairs of ``method``'s trainable state for ``lm`` (CCM/gist: ``state.lora``; full: the state)."""
    state = method.module_for(lm)
    lora = getattr(state, "lora", state)
    return [lora.pair(p) for p in lora.paths]


def randomize_lora(method, lm, scale: float = 0.1, seed: int = 0) -> None:
    """Give every LoRA B matrix non-zero weights, so a wrong gate or mask shows in the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pair in lora_pairs(method, lm):
            pair.B.copy_(torch.randn(pair.B.shape, generator=generator) * scale)


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny LLaMA saved as a Hugging Face folder, with a word-level tokenizer (``w0`` .. ``w49``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "tiny-model"
    tiny_model().model.save_pretrained(folder)
    vocab = {"[UNK]": 0, "</s>": 1} | {f"w{i}": i + 2 for i in range(50)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>").save_pretrained(folder)
    return folder
