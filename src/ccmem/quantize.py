"""float16 weights for decoding on a CPU: ``ccmem.load(..., quantize="float16")``, ``--quantize float16`` on the
commands that run a model (chat, serve, compress, ask, generate, eval, compare, stream, demo).

The model's linear layers (attention and MLP projections, and the LM head) are replaced by PyTorch's dynamically
quantized linear layers with float16 weights: the weights are held in float16 and multiplied in float32 by the
CPU's fbgemm kernels, so each forward reads half the bytes and rounds nothing but the weights (to 11 significant
bits). Embeddings, norms and the key/value cache stay float32, so a memory made this way has the layout and dtype
of one made without, and either model can read it.

Why: on a CPU, one decoding step of a small model is bound by reading its weights (540 MB per token for
SmolLM2-135M in float32; README, Serving speed). Half of that makes each step about twice as fast here, and the
part of a step that a compressed memory saves (attending to and copying a long cache) a larger share of it.
Measured on the 2-core machine of this project: README, "float16 weights".

Not int8: PyTorch's int8 dynamic quantization also rounds every layer's *input* to 8 bits, one scale per tensor,
and SmolLM2's activations have outlier channels; it decoded a little faster but tripled the perplexity of
packaged prose (38.3 → 114.9 in ``benchmarks/packed_weights.py``; per-channel weight scales did not help) and
dropped full-context persona accuracy from 0.63 to 0.41 (README). float16 weights left that perplexity at 38.326.

What stays float32: ccmem's own trainable state (LoRA pairs, <COMP> embeddings, classifiers, the IC-Former),
which hooks onto the packed layers as it does onto float ones. What it excludes: training (packed layers have no
gradients), merging a stage-1 LoRA into the weights afterwards (merge first: :func:`ccmem.load` does, when given
both), GPUs (load the model in bfloat16 there: ``dtype=``), and models loaded in another dtype than float32.
"""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from ccmem.loading import LoadedModel

#: The weight quantizations ``quantize=`` accepts.
WEIGHT_SCHEMES = ("float16",)
_ALIASES = {"fp16": "float16", "half": "float16"}


class QuantizeError(ValueError):
    """A model that cannot be quantized as asked, or a quantized model asked to do what only float weights do."""


def check_quantize(value: Any) -> str | None:
    """``quantize=`` checked: None (or "none", "") for float weights, or one of :data:`WEIGHT_SCHEMES`."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise QuantizeError(f"quantize={value!r}: pass one of {', '.join(WEIGHT_SCHEMES)} as a string, or None")
    name = value.strip().lower()
    if name in ("", "none"):
        return None
    name = _ALIASES.get(name, name)
    if name not in WEIGHT_SCHEMES:
        raise QuantizeError(
            f"quantize={value!r} is not a weight quantization ccmem knows; use one of: {', '.join(WEIGHT_SCHEMES)} "
            "(or none for the weights as loaded); int8 was measured and left out: it rounds each layer's input too, "
            "which tripled SmolLM2's perplexity"
        )
    return name


def dynamic_linear_type() -> type[nn.Module]:
    """The class of PyTorch's dynamically quantized linear layer (imported on first use), whatever its weights'
    dtype."""
    from torch.ao.nn.quantized.dynamic import Linear

    return Linear


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer ccmem's LoRA can hook: a float ``nn.Linear`` or a packed one."""
    return isinstance(module, (nn.Linear, dynamic_linear_type()))


def quantize_weights(lm: LoadedModel, scheme: str) -> None:
    """Replace ``lm``'s linear layers in place by packed ones (``scheme``: one of :data:`WEIGHT_SCHEMES`).

    Refused on a model that is not float32 on the CPU, and on one quantized already with another scheme (the same
    scheme again does nothing). Anything built on ``lm`` before (a method's LoRA, a session's memory) keeps
    working: LoRA hooks are found by layer path at each forward.
    """
    scheme = check_quantize(scheme) or ""
    if not scheme:
        return
    if lm.quantized == scheme:
        return
    if lm.quantized is not None:
        raise QuantizeError(f"{lm.name} holds {lm.quantized} weights already; load it again to pack it as {scheme}")
    check_target(scheme, lm.name, lm.device, lm.model.dtype)
    was_training = lm.model.training
    _packed(lm.model, inplace=True)
    lm.model.train(was_training)
    lm.quantized = scheme


def _packed(module: nn.Module, inplace: bool) -> nn.Module:
    """``module`` with its ``nn.Linear`` layers replaced by packed float16 ones (in place, or a copy)."""
    with warnings.catch_warnings():
        # torch.ao's eager quantization is deprecated in favour of torchao; it is what torch itself ships, and
        # ccmem pins torch, so its warnings would only bury the user's output
        warnings.simplefilter("ignore")
        from torch.ao.quantization import float16_dynamic_qconfig, quantize_dynamic

        return quantize_dynamic(module, {nn.Linear: float16_dynamic_qconfig}, dtype=torch.float16, inplace=inplace)


def check_target(scheme: str, name: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse to quantize model ``name`` loaded on ``device`` in ``dtype`` (checked before loading where known)."""
    if device.type != "cpu":
        raise QuantizeError(
            f"quantize={scheme!r} is for decoding on a CPU, and {name} is on {device}; on a GPU load it in "
            "bfloat16 (dtype=torch.bfloat16) instead"
        )
    if dtype != torch.float32:
        raise QuantizeError(
            f"quantize={scheme!r} quantizes float32 weights, and {name} is loaded in {dtype}; load it in float32 "
            "(the default) to quantize it"
        )
    if not _kernels_run():
        raise QuantizeError(
            f"quantize={scheme!r} needs PyTorch's fbgemm kernels (x86 CPUs), which this build or CPU lacks "
            f"(engine: {torch.backends.quantized.engine}); drop quantize"
        )


def check_before_loading(
    scheme: str, spec: str, attn_implementation: str = "sdpa", dtype: torch.dtype | None = None
) -> None:
    """:func:`check_target` for model ``spec`` about to be loaded with these arguments, where
    :func:`ccmem.loading.load_model` would place it (flash_attention_2: a GPU), so that a refusal comes before the
    weights load and not after."""
    from ccmem.loading import device_and_dtype  # ccmem.loading imports this module

    check_target(scheme, spec, *device_and_dtype(attn_implementation, None, dtype))


@functools.cache
def _kernels_run() -> bool:
    """Whether a packed float16 linear layer runs here (fbgemm: x86 builds of PyTorch), tried once."""
    try:
        _packed(nn.Sequential(nn.Linear(4, 2)), inplace=False)(torch.ones(1, 4))
    except (RuntimeError, NotImplementedError, AssertionError):
        return False
    return True


def refuse_quantized(lm: LoadedModel, doing: str) -> None:
    """Raise a :class:`QuantizeError` if ``lm``'s linear layers are packed: ``doing`` needs its float32 layers."""
    if lm.quantized is not None:
        raise QuantizeError(
            f"{doing} needs the model's float32 linear layers, and {lm.name}'s are packed ({lm.quantized} weights, "
            "ccmem.quantize); load it without quantize (packed weights are for decoding)"
        )
