"""int8 weights for decoding on a CPU: ``ccmem.load(..., quantize="int8")``, ``--quantize int8`` on the commands
that run a model (chat, serve, compress, ask, generate, eval).

The model's linear layers (attention and MLP projections, and the LM head) are replaced by PyTorch's dynamically
quantized linear layers: weights held as int8 with one float32 scale per tensor, activations quantized per
forward, the matmul done by the CPU's int8 kernels (fbgemm / oneDNN on x86, qnnpack on ARM). Embeddings, norms and
the key/value cache stay float32, so a memory made with int8 weights has the layout and dtype of one made
without them, and either model can read it (the values differ by the weights' rounding).

Why: on a CPU, one decoding step of a small model is bound by reading its weights (540 MB per token for
SmolLM2-135M in float32; README, Decoding speed). int8 weights read a quarter of that, so each step is cheaper,
and the part of a step that a compressed memory saves (attending to and copying a long cache) becomes a larger
share of it. Measured on the 2-core machine of this project: README, "int8 weights".

What stays float: ccmem's own trainable state (LoRA pairs, <COMP> embeddings, classifiers, the IC-Former), which
hooks onto the quantized layers as it does onto float ones. What it excludes: training (int8 layers have no
gradients), merging a stage-1 LoRA into the weights afterwards (merge first: :func:`ccmem.load` does, when given
both), GPUs (use bfloat16 there), and models loaded in another dtype than float32.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from ccmem.loading import LoadedModel

#: The weight quantizations ``quantize=`` accepts.
WEIGHT_SCHEMES = ("int8",)


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
    if name not in WEIGHT_SCHEMES:
        raise QuantizeError(
            f"quantize={value!r} is not a weight quantization ccmem knows; use one of: {', '.join(WEIGHT_SCHEMES)} "
            "(or none for float weights)"
        )
    return name


def dynamic_linear_type() -> type[nn.Module]:
    """The class of PyTorch's dynamically quantized linear layer (imported on first use)."""
    from torch.ao.nn.quantized.dynamic import Linear

    return Linear


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer ccmem's LoRA can hook: a float ``nn.Linear`` or an int8 one."""
    return isinstance(module, (nn.Linear, dynamic_linear_type()))


def quantize_weights(lm: LoadedModel, scheme: str) -> None:
    """Replace ``lm``'s linear layers in place by int8 ones (``scheme``: one of :data:`WEIGHT_SCHEMES`).

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
        raise QuantizeError(f"{lm.name} holds {lm.quantized} weights already; load it again to quantize as {scheme}")
    check_target(scheme, lm.name, lm.device, lm.model.dtype)
    was_training = lm.model.training
    with warnings.catch_warnings():
        # torch.ao's eager quantization is deprecated in favour of torchao; it is what torch itself ships, and
        # ccmem pins torch, so the warning (one per layer) would only bury the user's output
        warnings.simplefilter("ignore")
        torch.ao.quantization.quantize_dynamic(lm.model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    lm.model.train(was_training)
    lm.quantized = scheme


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
    if "none" in (torch.backends.quantized.engine or "none") or not torch.backends.quantized.supported_engines:
        raise QuantizeError("this PyTorch build has no int8 CPU kernels (torch.backends.quantized); use float weights")


def refuse_quantized(lm: LoadedModel, doing: str) -> None:
    """Raise a :class:`QuantizeError` if ``lm`` holds quantized weights: ``doing`` needs float ones."""
    if lm.quantized is not None:
        raise QuantizeError(
            f"{doing} needs float weights, and {lm.name} holds {lm.quantized} weights; load it without quantize "
            "(int8 weights are for decoding)"
        )
