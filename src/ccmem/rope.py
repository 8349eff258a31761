"""Re-basing rotary position embeddings (RoPE) of cached keys: pure functions, no model code but a lookup.

A RoPE key written at position ``p`` is ``R(p)·k``, a rotation of each pair of dimensions ``(i, i + d/2)`` by
``p·θ_i``. Rotations compose, ``R(q - p)·R(p)·k = R(q)·k``, so a cached key can be moved to position ``q``
without the token that wrote it: :func:`rotate_keys` by ``q - p``. Values carry no position and never change.
This is what lets ``ccmem stream`` keep position ids inside the cache (StreamingLLM's rule; kvpress's
``KeyRerotationPress`` does the same after pruning) so a text longer than the model's context never runs out
of positions.

Covered: every model whose keys are rotated by one static table of frequencies per layer in the
``rotate_half`` layout of transformers: LLaMA, Mistral, Qwen2 (one table), Gemma 3 (one table per layer type:
local and global layers) and GPT-NeoX (partial rotary: only the first ``2·len(inv_freq)`` dimensions turn, the
rest pass through). Layers without RoPE in such a model (NoPE: SmolLM3's every fourth layer) keep their keys,
which carry no position. Refused with a clear error: models without RoPE, and RoPE whose frequencies
depend on the sequence length (``dynamic`` NTK, ``longrope``), where a key's rotation is not a function of its
position alone.
Attention scaling factors of ``yarn``/``llama3`` multiply cos and sin of every position alike, so a pure
rotation by the difference is still exact.
"""

from __future__ import annotations

from typing import Any

import torch

from ccmem.loading import LoadedModel
from ccmem.memory import Memory

#: RoPE variants whose frequencies are fixed, so a key at position p is exactly R(p)·k.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


#: What re-basing is for, as the refusals say it (not only ``ccmem stream``: any session that outlives the positions).
MOVING = "moving cached keys (what ccmem stream, and a chat or session past the model's positions, do)"


class RopeError(ValueError):
    """A model whose cached keys cannot be moved to other positions."""


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension (the pairing transformers' RoPE uses)."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotation(
    delta: torch.Tensor | int, n: int, inv_freq: torch.Tensor, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` (``[..., n, 2·len(inv_freq)]``, dtype and device of ``like``) of a move by ``delta``
    positions (an int, ``[n]``: one per slot, or ``[..., n]``: one per head and slot). The angle is computed in
    float64, so moving a key far and back returns it to float32 rounding."""
    delta_t = torch.as_tensor(delta, device=like.device).to(torch.float64)
    if delta_t.dim() == 0:
        delta_t = delta_t.expand(n)
    angle = delta_t[..., None] * inv_freq.to(device=like.device, dtype=torch.float64)
    angle = torch.cat([angle, angle], dim=-1)
    return angle.cos().to(like.dtype), angle.sin().to(like.dtype)


def apply_rotation(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``keys`` (``[..., n, head_dim]``) rotated by :func:`rotation`'s ``cos``/``sin``; only the first
    ``cos.shape[-1]`` dimensions turn (all of them but for partial rotary)."""
    dim = cos.shape[-1]
    if dim > keys.shape[-1]:
        raise RopeError(f"{dim // 2} RoPE frequencies do not fit keys of size {keys.shape[-1]}")
    turning, passing = keys[..., :dim], keys[..., dim:]
    turned = turning * cos + rotate_half(turning) * sin
    return torch.cat([turned, passing], dim=-1) if passing.shape[-1] else turned


def rotate_keys(keys: torch.Tensor, delta: torch.Tensor | int, inv_freq: torch.Tensor) -> torch.Tensor:
    """``keys`` (``[..., n, head_dim]``) moved by ``delta`` positions (an int, ``[n]``: one per slot, or the shape
    of the keys without ``head_dim``: one per head and slot)."""
    if isinstance(delta, int) and delta == 0:
        return keys
    return apply_rotation(keys, *rotation(delta, keys.shape[-2], inv_freq, keys))


def half_split_pairing(lm: LoadedModel) -> bool:
    """Whether the model rotates dimension ``j`` with ``j + d/2`` (LLaMA's pairing, which ccmem's rotations use),
    read off its model file's own ``rotate_half`` (GPT-OSS's ``_apply_rotary_emb``, which turns the two halves with
    tables of ``d/2`` entries); Cohere's pairs neighbours (``2j`` with ``2j+1``), and so do GPT-J and CodeGen
    (``rotate_every_two``). :class:`RopeError` for a model file that shows none of these."""
    import inspect

    module = inspect.getmodule(type(lm.model.base_model))
    theirs = getattr(module, "rotate_half", None)
    if theirs is None and hasattr(module, "rotate_every_two"):
        return False
    halves = getattr(module, "_apply_rotary_emb", None)
    if theirs is None and halves is not None:
        x, cos, sin = torch.arange(1.0, 5.0), torch.tensor([0.6, 0.8]), torch.tensor([0.8, -0.6])
        ours = x * torch.cat([cos, cos]) + rotate_half(x) * torch.cat([sin, sin])
        return bool(torch.allclose(halves(x, cos, sin), ours))
    if theirs is None:  # Llama 4 and DeepSeek-V2 pair neighbours through complex numbers; taken as LLaMA's before
        family = getattr(lm.model.config.get_text_config(), "model_type", type(lm.model).__name__)
        raise RopeError(
            f"{family}'s model file has no rotate_half, so ccmem cannot tell which dimensions its RoPE rotates "
            "together; moving cached keys and expected-attention need LLaMA-style RoPE (llama, mistral, qwen2, "
            "gemma3, gpt-neox)"
        )
    x = torch.arange(1.0, 5.0)
    return bool(torch.equal(theirs(x), rotate_half(x)))


def layers_without_rope(lm: LoadedModel) -> set[int]:
    """Decoder layers whose keys get no rotary position at all (NoPE): those marked 0 in the config's
    ``no_rope_layers`` (SmolLM3, Llama 4: 1 marks a layer with RoPE)."""
    flags = getattr(lm.model.config.get_text_config(), "no_rope_layers", None) or []
    return {i for i, uses_rope in enumerate(flags) if not uses_rope}


def layer_frequencies(lm: LoadedModel) -> list[torch.Tensor]:
    """Per decoder layer, the inverse frequencies its keys were rotated with (zeros for a layer without RoPE: its
    keys do not turn); :class:`RopeError` if there are none or they change with the sequence length."""
    cfg = lm.model.config.get_text_config()
    family = getattr(cfg, "model_type", type(lm.model).__name__)
    rotary: Any = getattr(lm.model.base_model, "rotary_emb", None)
    layers = int(cfg.num_hidden_layers)
    if rotary is None or getattr(cfg, "alibi", False):  # Falcon with ALiBi builds a rotary_emb it never applies
        raise RopeError(
            f"{family} models have no rotary position embedding ccmem can re-base; {MOVING} needs a RoPE model "
            "(llama, mistral, qwen2, gemma3, gpt-neox)"
        )
    if not half_split_pairing(lm):
        raise RopeError(
            f"{family} rotates neighbouring dimensions as RoPE pairs, which ccmem's re-basing does not follow, so its "
            f"keys cannot be moved; {MOVING} needs LLaMA-style RoPE (llama, mistral, qwen2, gemma3, gpt-neox)"
        )
    if isinstance(getattr(rotary, "inv_freq", None), torch.Tensor):
        kinds = [str(rotary.rope_type)] * layers
        freqs = [rotary.inv_freq] * layers
    else:
        types = list(getattr(cfg, "layer_types", None) or [])
        if len(types) != layers or not all(
            isinstance(getattr(rotary, f"{t}_inv_freq", None), torch.Tensor) for t in types
        ):
            raise RopeError(f"{family}: cannot find the RoPE frequencies of each layer, so keys cannot be re-based")
        kinds = [str(rotary.rope_type[t]) for t in types]
        freqs = [getattr(rotary, f"{t}_inv_freq") for t in types]
    bad = sorted({k for k in kinds if k not in STATIC_ROPE})
    if bad:
        raise RopeError(
            f"{family} uses {bad[0]} RoPE, whose frequencies change with the sequence length, so cached keys "
            f"cannot be moved exactly; {MOVING} supports RoPE types {', '.join(STATIC_ROPE)}"
        )
    tables = {id(f): f.detach().float() for f in freqs}  # layers that share a table share one tensor
    nope = layers_without_rope(lm)  # rotating their keys would corrupt them: they were never rotated
    return [torch.zeros_like(tables[id(f)]) if i in nope else tables[id(f)] for i, f in enumerate(freqs)]


def compact_positions(memory: Memory, freqs: list[torch.Tensor]) -> Memory:
    """``memory`` with every slot moved to the position of its index in its layer (StreamingLLM's rule), keys
    re-rotated, so the next token comes right after the last slot: position ids stop growing with the length of
    the interaction, and only the slots held count against the model's limit.

    Distances between slots shrink to their order (a ccm-concat group written after a 500-token chunk now sits
    next to the one before it), which changes what the model reads; this is the price of going past the model's
    positions, as in StreamingLLM. A blended slot (position -1: CCM-merge's average of groups written at several
    positions) has no single position; it moves by as much as ``next_position`` does, so it keeps its distance to
    the text that follows, which is exact for every part of the blend since rotation is linear.
    ``freqs`` are :func:`layer_frequencies` of the model that wrote the memory.
    """
    if len(freqs) != len(memory.layers):
        raise RopeError(f"{len(freqs)} frequency tables for a memory of {len(memory.layers)} layers")
    next_position = max(memory.slots_per_layer, default=0)
    shift = next_position - memory.next_position
    layers, positions = [], []
    for (k, v), position, f in zip(memory.layers, memory.positions, freqs, strict=True):
        index = torch.arange(k.shape[-2], device=position.device).expand_as(position)
        blend = position < 0
        delta = torch.where(blend, torch.full_like(position, shift), index - position)
        layers.append((rotate_keys(k, delta, f) if bool(delta.any()) else k, v))
        positions.append(torch.where(blend, position, index))
    return memory.with_layers(layers, positions, next_position=next_position)
