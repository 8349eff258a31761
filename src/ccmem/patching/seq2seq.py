"""What ccmem needs to know about encoder-decoder models (T5 and its relatives), in one place.

An encoder-decoder model is compressed in its encoder (:mod:`ccmem.methods.ccm_seq2seq`). Two things there
depend on transformers' T5 code and live here:

* the encoder and decoder stacks, the decoder's start token and its cache;
* T5's relative position bias. T5 computes it once, in the first layer, from *contiguous* positions
  (``0..q-1`` against ``0..k-1``) and hands it down the stack; each attention layer passes it to the attention
  function as ``position_bias``. A compressed encoder reads keys that are not contiguous (a memory of <COMP>
  slots, then a new chunk), so :func:`relative_bias` builds the bias from the *true* positions of queries and
  keys with the model's own bucketing and embedding, and ccmem's attention function
  (:mod:`ccmem.patching.attention`) uses it in place of the model's.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache, PreTrainedModel

from ccmem.memory import KVShape


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` reads its input with an encoder and writes with a decoder (T5, BART, ...)."""
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_encoder_decoder", False))


def encoder_of(model: PreTrainedModel) -> nn.Module:
    """The encoder stack."""
    return cast(nn.Module, model.get_encoder())


def decoder_of(model: PreTrainedModel) -> nn.Module:
    """The decoder stack (without the LM head)."""
    return cast(nn.Module, model.get_decoder())


def encoder_kv_shape(model: PreTrainedModel, dtype: torch.dtype) -> KVShape:
    """Layers, heads and head size of the encoder's self-attention (what a compressed memory holds per layer)."""
    config = model.config
    try:
        return KVShape(int(config.num_layers), int(config.num_heads), int(config.d_kv), dtype)
    except AttributeError:
        raise ValueError(
            f"ccmem compresses encoder-decoder models of the T5 family (num_layers, num_heads, d_kv in the config); "
            f"{config.model_type} is not one"
        ) from None


def decoder_start(model: PreTrainedModel) -> int:
    """The token the decoder starts from."""
    start = model.config.decoder_start_token_id
    if start is None:
        raise ValueError("this encoder-decoder model has no decoder_start_token_id in its config")
    return int(start)


def shift_right(model: PreTrainedModel, labels: torch.Tensor) -> torch.Tensor:
    """Decoder inputs for teacher forcing: the start token, then ``labels`` but the last (-100 read as padding)."""
    shifted = labels.new_full(labels.shape, decoder_start(model))
    shifted[:, 1:] = labels[:, :-1]
    pad = model.config.pad_token_id
    return shifted.masked_fill(shifted == -100, int(pad) if pad is not None else 0)


def teacher_forced(model: PreTrainedModel, encoder_hidden: torch.Tensor, labels: torch.Tensor, **kwargs: Any) -> Any:
    """The decoder's output (``last_hidden_state`` ``[B, A, d]``) reading ``labels`` (``[B, A]``, -100 = padding)
    after its start token, cross-attending to ``encoder_hidden``: what training and option scoring both read."""
    labels = labels.to(encoder_hidden.device)
    return decoder_of(model)(input_ids=shift_right(model, labels), encoder_hidden_states=encoder_hidden, **kwargs)


def decoder_cache() -> EncoderDecoderCache:
    """An empty cache for the decoder's self-attention and its cross-attention keys/values."""
    return EncoderDecoderCache(DynamicCache(), DynamicCache())


def cache_bytes(cache: Any) -> int:
    """Bytes of keys/values a decoder cache holds (self- and cross-attention)."""
    parts = (
        [cache.self_attention_cache, cache.cross_attention_cache] if isinstance(cache, EncoderDecoderCache) else [cache]
    )
    total = 0
    for part in parts:
        for layer in part.layers:
            keys = getattr(layer, "keys", None)
            if isinstance(keys, torch.Tensor):
                total += keys.numel() * keys.element_size() * 2
    return total


def _bias_module(encoder: nn.Module) -> nn.Module:
    """The attention module whose ``relative_attention_bias`` every encoder layer shares (T5: layer 0's)."""
    found = [m for m in encoder.modules() if getattr(m, "has_relative_attention_bias", False)]
    if not found or not hasattr(found[0], "relative_attention_bias"):
        raise ValueError(
            "this encoder has no relative position bias to rebuild; ccmem compresses T5-family encoder-decoder models"
        )
    if len(found) > 1:
        raise ValueError(
            "this encoder learns a relative position bias in every layer (UMT5-style); ccmem supports T5-style "
            "models, where the first layer's bias serves every layer"
        )
    return found[0]


def relative_bias(model: PreTrainedModel, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """The encoder's ``[batch, heads, queries, keys]`` relative position bias for these true positions.

    ``query_positions`` is ``[batch, queries]``, ``key_positions`` ``[batch, keys]``; the relative position is
    ``key - query`` (as T5's ``compute_bias``), bucketed bidirectionally as in the encoder.
    """
    module: Any = _bias_module(encoder_of(model))
    relative = key_positions[:, None, :] - query_positions[:, :, None]
    buckets = module._relative_position_bucket(
        relative,
        bidirectional=not module.is_decoder,
        num_buckets=module.relative_attention_num_buckets,
        max_distance=module.relative_attention_max_distance,
    )
    return module.relative_attention_bias(buckets).permute(0, 3, 1, 2)


__all__ = [
    "cache_bytes",
    "decoder_cache",
    "decoder_of",
    "decoder_start",
    "encoder_kv_shape",
    "encoder_of",
    "is_encoder_decoder",
    "relative_bias",
    "shift_right",
]
