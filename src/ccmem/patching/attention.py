"""ccmem's attention, registered through transformers' public ``AttentionInterface``.

A model switched to ``ccm_sdpa`` or ``ccm_eager`` (for a scope: :func:`compression_attention`) behaves exactly
like ``sdpa`` / ``eager`` until a forward passes one of two keywords, which transformers hands down to the
attention function of every layer:

* ``ccm_plan=AttentionPlan``: parallel CCM training. The attention appends the merged <COMP> keys and values
  (CCM-merge) and uses the plan's mask instead of the model's causal one. In an encoder, which keeps no cache,
  a plan also carries the memory's keys/values to read before the new tokens' (``prefix``), records the new
  tokens' own keys/values (``captured``), and replaces a relative-position model's bias (T5's
  ``position_bias``, computed from contiguous positions) by one built from the true positions.
* ``ccm_capture=AttentionCapture``: KV methods that rank entries by attention (H2O, SnapKV, TOVA) or by the
  queries (Expected Attention). The attention still runs as sdpa/eager; in addition, for just the newest
  queries the capture asks for, their softmax weights (summed over those queries) and/or the queries themselves
  are recorded per layer. The model never has to switch to eager attention for the whole sequence.

No model file is forked.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from ccmem.masks import MaskPlan, to_additive, windowed

PLAN_KWARG = "ccm_plan"
CAPTURE_KWARG = "ccm_capture"
PROBE_KWARG = "ccm_probe"  # a list each attention call appends to: shows that keywords reach the attention
BASE_IMPLEMENTATION = {"ccm_sdpa": "sdpa", "ccm_eager": "eager"}


@dataclass
class AttentionPlan:
    """A :class:`MaskPlan` moved to the model's device and dtype, ready for every layer.

    Sliding-window layers (the attention call says ``sliding_window=W``) get the plan's mask restricted to
    the window as recurrent inference counts it (:func:`ccmem.masks.windowed`), built once per window size.
    """

    mask: torch.Tensor  # [B, 1, L, L + M] additive
    mix_index: torch.Tensor  # [B, M]
    mix_weights: torch.Tensor  # [B, M, M]
    allowed: torch.Tensor  # [B, L, L + M] bool
    order: torch.Tensor  # [B, L + M]
    windows: dict[int, torch.Tensor] = field(default_factory=dict)
    #: ``[B, heads, L, P + L + M]``: the relative position bias every layer adds to its scores instead of the one the
    #: model passes (T5 builds its own from contiguous positions; see :mod:`ccmem.patching.seq2seq`).
    position_bias: torch.Tensor | None = None
    #: Per layer, ``P`` keys/values read before this forward's own (a memory, where the stack keeps no cache: an
    #: encoder). Key columns are then ``[prefix | sequence | merged]``, and ``mask`` covers all of them.
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    #: Filled, when given, with each layer's own keys/values of this forward (after projection, before the prefix).
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    #: ``[layers, kv_heads, head_dim]``: CCM-merge with ``weighting=learned`` (its gate times ``gate_scale``). Each
    #: merged entry is then a softmax, over the steps ``mix_weights`` averages, of :func:`merge_scores` of their
    #: values, instead of the plain mean.
    merge_gate: torch.Tensor | None = None

    @classmethod
    def from_mask_plan(cls, plan: MaskPlan, dtype: torch.dtype, device: torch.device) -> AttentionPlan:
        allowed = plan.allowed if plan.allowed.dim() == 3 else plan.allowed[None]
        mix_index = plan.mix_index if plan.mix_index.dim() == 2 else plan.mix_index[None]
        mix_weights = plan.mix_weights if plan.mix_weights.dim() == 3 else plan.mix_weights[None]
        return cls(
            mask=to_additive(allowed, dtype).to(device),
            mix_index=mix_index.to(device),
            mix_weights=mix_weights.to(device=device, dtype=dtype),
            allowed=allowed.to(device),
            order=plan.order.to(device),
        )

    @classmethod
    def from_allowed(cls, allowed: torch.Tensor, dtype: torch.dtype, device: torch.device) -> AttentionPlan:
        """A plan of a plain boolean ``[B, Lq, Lk]`` mask (no merged columns; keys in cache order)."""
        allowed = allowed if allowed.dim() == 3 else allowed[None]
        batch, _, keys = allowed.shape
        return cls(
            mask=to_additive(allowed, dtype).to(device),
            mix_index=torch.zeros(batch, 0, dtype=torch.long, device=device),
            mix_weights=torch.zeros(batch, 0, 0, dtype=dtype, device=device),
            allowed=allowed.to(device),
            order=torch.arange(keys, device=device).expand(batch, keys),
        )

    def mask_for(self, sliding_window: int | None) -> torch.Tensor:
        """The additive mask for a layer with this sliding window (``None``: full attention)."""
        if sliding_window is None or sliding_window >= self.allowed.shape[-1]:
            return self.mask
        if sliding_window not in self.windows:
            allowed = windowed(self.allowed, self.order, sliding_window)
            self.windows[sliding_window] = to_additive(allowed, self.mask.dtype)
        return self.windows[sliding_window]


@dataclass
class AttentionCapture:
    """What one forward should record, per layer, about its newest ``queries`` queries (``None``: all of them).

    ``weights[layer]``: ``[batch, query_heads, keys]``, the softmax attention weights of those queries summed over
    them (causally masked, as the layer computed them; soft-capping and GPT-OSS's attention sinks included).
    ``queries[layer]``: ``[batch, query_heads, n, head_dim]``, the queries after position encoding.
    """

    queries_wanted: int | None = None
    want_weights: bool = True
    want_queries: bool = False
    #: ``[batch, queries]``, False for padding queries of a batched forward: they add nothing to ``weights``.
    query_mask: torch.Tensor | None = None
    weights: dict[int, torch.Tensor] = field(default_factory=dict)
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    scaling: dict[int, float] = field(default_factory=dict)  # the factor each layer scales q·k by

    def record(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
        softcap: float | None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            layer = len(self.weights) if self.want_weights else len(self.queries)
        q_len, k_len = query.shape[2], key.shape[2]
        n = q_len if self.queries_wanted is None else min(self.queries_wanted, q_len)
        q = query[:, :, q_len - n :]
        self.scaling[layer] = scaling if scaling is not None else q.shape[-1] ** -0.5
        if self.want_queries:
            self.queries[layer] = q.detach()
        if not self.want_weights:
            return
        groups = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(groups, dim=1) if groups > 1 else key
        scores = (q.float() @ k.float().transpose(2, 3)) * self.scaling[layer]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask[:, :, -n:, :k_len]
            scores = scores + (mask.float() if mask.dtype != torch.bool else torch.where(mask, 0.0, float("-inf")))
        else:  # sdpa with an implicit causal mask: query i of this forward sees keys up to k_len - q_len + i
            rows = torch.arange(q_len - n, q_len, device=q.device)[:, None] + (k_len - q_len)
            scores = scores.masked_fill(torch.arange(k_len, device=q.device)[None, :] > rows, float("-inf"))
        if sinks is None:
            weights = torch.softmax(scores, dim=-1)
        else:  # GPT-OSS: a learned logit per head takes part in the softmax and is dropped from its result
            sink = sinks.float().reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
            weights = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        weights = weights.nan_to_num(0.0)  # a padding query may see no key at all
        if self.query_mask is not None:
            weights = weights * self.query_mask[:, None, q_len - n :, None].to(weights.dtype)
        self.weights[layer] = weights.sum(dim=2)

    def row(self, b: int, keys: torch.Tensor, n_queries: int) -> AttentionCapture:
        """Row ``b`` of a batched capture, with only its real key columns (``keys``) and its ``n_queries`` queries."""
        view = AttentionCapture(self.queries_wanted, self.want_weights, self.want_queries, scaling=dict(self.scaling))
        view.weights = {layer: w[b : b + 1][..., keys] for layer, w in self.weights.items()}
        view.queries = {
            layer: q[b : b + 1, :, q.shape[2] - min(n_queries, q.shape[2]) :] for layer, q in self.queries.items()
        }
        return view


def merge_scores(values: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``[batch, kv_heads, slots]`` float32 scores of the <COMP> ``values`` (``[batch, kv_heads, slots, dim]``)
    under one layer's ``gate`` (``[kv_heads, dim]``, the method's scale included): a merged slot is the
    softmax-weighted mean of its steps. Values are normalised, so a score is bounded by ``|gate|``."""
    unit = torch.nn.functional.normalize(values.float(), dim=-1, eps=1e-6)
    return (unit * gate.float()[None, :, None, :]).sum(-1)


def learned_mix(mix_weights: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``[batch, kv_heads, M, M]`` weights: merged entry ``m`` is the softmax of ``scores`` over the <COMP>
    positions that ``mix_weights`` (``[batch, M, M]``) averages for it; padding rows get zeros, never NaN."""
    member = (mix_weights > 0)[:, None]
    logits = scores[:, :, None, :].masked_fill(~member, float("-inf"))
    logits = logits.masked_fill(~member.any(-1, keepdim=True), 0.0)
    return torch.softmax(logits, dim=-1) * member


def _with_merged(
    key: torch.Tensor, value: torch.Tensor, plan: AttentionPlan, layer: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the merged <COMP> entries ``mix_weights @ states[comp]`` after the sequence axis (a learned merge:
    :func:`learned_mix` of the values' scores instead of ``mix_weights``)."""
    if plan.mix_index.shape[-1] == 0:
        return key, value

    def comp_of(states: torch.Tensor) -> torch.Tensor:
        batch, heads, _, dim = states.shape
        return states.gather(2, plan.mix_index[:, None, :, None].expand(batch, heads, -1, dim))

    comp_key, comp_value = comp_of(key), comp_of(value)
    if plan.merge_gate is None:
        weights = plan.mix_weights[:, None].to(key.dtype)
    else:
        if layer is None:
            raise RuntimeError("a learned ccm-merge needs attention modules with a layer_idx")
        scores = merge_scores(comp_value, plan.merge_gate[layer])
        weights = learned_mix(plan.mix_weights, scores).to(key.dtype)
    return torch.cat([key, weights @ comp_key], dim=2), torch.cat([value, weights @ comp_value], dim=2)


def _generic_eager(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention for model files that do not define ``eager_attention_forward``."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    weights = query @ key.transpose(2, 3) * scale
    if kwargs.get("softcap") is not None:
        weights = torch.tanh(weights / kwargs["softcap"]) * kwargs["softcap"]
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, :, : key.shape[-2]]
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), weights


def _eager_for(module: nn.Module) -> Callable[..., Any]:
    """The model file's own eager attention (it knows its quirks, e.g. soft-capping), else a generic one."""
    source = inspect.getmodule(type(module))
    return getattr(source, "eager_attention_forward", _generic_eager)


def _make(base: str) -> Callable[..., Any]:
    def ccm_attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        plan: AttentionPlan | None = kwargs.pop(PLAN_KWARG, None)
        capture: AttentionCapture | None = kwargs.pop(CAPTURE_KWARG, None)
        probe: list[int] | None = kwargs.pop(PROBE_KWARG, None)
        if probe is not None:
            probe.append(getattr(module, "layer_idx", -1))
        if capture is not None:
            capture.record(
                module, query, key, attention_mask, kwargs.get("scaling"), kwargs.get("softcap"), kwargs.get("s_aux")
            )
        if plan is not None:
            layer = getattr(module, "layer_idx", None)
            if plan.captured is not None:
                plan.captured[len(plan.captured) if layer is None else layer] = (key, value)
            key, value = _with_merged(key, value, plan, layer)
            if plan.prefix is not None:
                if layer is None:
                    raise RuntimeError(
                        f"{type(module).__name__} has no layer_idx: ccmem cannot tell which memory it reads"
                    )
                past_key, past_value = plan.prefix[layer]
                key, value = torch.cat([past_key, key], dim=2), torch.cat([past_value, value], dim=2)
            attention_mask = plan.mask_for(kwargs.get("sliding_window")).to(query.dtype)
            if plan.position_bias is not None:
                kwargs["position_bias"] = plan.position_bias.to(query.dtype)
        if base == "sdpa":
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return _eager_for(module)(module, query, key, value, attention_mask, **kwargs)

    ccm_attention.__name__ = f"ccm_{base}_attention"
    return ccm_attention


def register() -> None:
    """Make ``ccm_sdpa`` and ``ccm_eager`` known to transformers (idempotent)."""
    AttentionInterface.register("ccm_sdpa", _make("sdpa"))
    AttentionInterface.register("ccm_eager", _make("eager"))
    AttentionMaskInterface.register("ccm_sdpa", sdpa_mask)
    AttentionMaskInterface.register("ccm_eager", eager_mask)


def check_routes_attention(model: PreTrainedModel) -> None:
    """Refuse a model family whose attention ccmem cannot switch (its modules call attention themselves instead of
    through transformers' AttentionInterface: Falcon, for one). Methods that mask or read attention call this
    before building their state, so the error names the real obstacle, not a LoRA target that would then fail."""
    if not model._can_set_attn_implementation():
        raise ValueError(
            f"{type(model).__name__} does not route attention through transformers' AttentionInterface, so "
            "ccmem cannot read or mask its attention; use a model family that does (LLaMA, Mistral, Qwen2, ...)"
        )


@contextmanager
def compression_attention(model: PreTrainedModel) -> Iterator[None]:
    """Switch ``model`` to the ccmem variant of its attention implementation for a scope, then switch back.

    The variant behaves exactly like the original until a forward passes a plan or a capture request.
    """
    register()
    current = model.config._attn_implementation or "sdpa"
    if current in BASE_IMPLEMENTATION:  # already switched by an enclosing scope
        yield
        return
    if current not in ("sdpa", "eager"):
        raise ValueError(
            f"ccmem compression needs 'sdpa' or 'eager' attention, but the model uses {current!r}; "
            "load it with attn_implementation='sdpa' or 'eager' (ccmem ... --attn sdpa)"
        )
    check_routes_attention(model)
    model.set_attn_implementation(f"ccm_{current}")
    try:
        _check_keywords_arrive(model)
        yield
    finally:
        model.set_attn_implementation(current)


_KEYWORDS_ARRIVE: weakref.WeakKeyDictionary[PreTrainedModel, bool] = weakref.WeakKeyDictionary()


def _check_keywords_arrive(model: PreTrainedModel) -> None:
    """Refuse a model whose decoder layers drop the keywords a forward passes down (transformers' StableLM, for
    one, does not hand them to its attention): ccmem's masks and captures would silently not apply. Checked once
    per model with a one-token forward that every attention layer answers."""
    if getattr(model.config, "is_encoder_decoder", False):
        return
    if model not in _KEYWORDS_ARRIVE:
        seen: list[int] = []
        with torch.no_grad():
            device = next(model.parameters()).device
            model.base_model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), **{PROBE_KWARG: seen})
        _KEYWORDS_ARRIVE[model] = bool(seen)
    if not _KEYWORDS_ARRIVE[model]:
        raise ValueError(
            f"{type(model).__name__}'s layers do not pass a forward's keywords on to their attention, so ccmem "
            "cannot mask or read its attention (its compression would silently not apply); use a model family "
            "that does (LLaMA, Mistral, Qwen2, Gemma, Phi-3 ...)"
        )
