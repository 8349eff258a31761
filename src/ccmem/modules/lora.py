"""LoRA applied through forward hooks: ``W x + g ⊙ (B A x)·scale``, optionally gated per token.

CCM trains a LoRA that is active only while the model writes memory ("conditional LoRA", CCM section 3.2):
``g`` is 1 at <COMP> positions and 0 elsewhere, so the base model's behaviour on every other token is
untouched. peft's LoRA applies to every token and its activated LoRA gates on an invocation *sequence*,
not on arbitrary positions, so the gate lives here. With no gate (``gate=None``) the LoRA is an ordinary,
always-on one (stage 1 of the CCM recipe).

The LoRA weights live in a :class:`LoRASet` (an ``nn.Module`` that a method owns); the model is never
rewritten. :meth:`LoRASet.attach` adds a forward hook to each target linear layer and returns the handles;
removing them leaves the model exactly as it was.

The gate is shared state read by every hooked layer. :meth:`LoRAGate.install` sets it at the start of every
decoder forward from the ``ccm_comp_mask`` keyword (absent: off), and leaves it set afterwards: gradient
checkpointing recomputes the layers during backward, and they must see the same gate again. Passing the mask
as a forward keyword also lets a HF Trainer batch carry it like any other input.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ccmem.quantize import QuantizeError, is_linear

GATE_KWARG = "ccm_comp_mask"

#: LoRA targets (attention projections) by model family; anything else uses the LLaMA names.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt_neox": ("query_key_value", "dense"),
    "t5": ("q", "k", "v", "o"),
    "mt5": ("q", "k", "v", "o"),
}
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The attention projections of ``model``'s family."""
    config = model.config.get_text_config()  # type: ignore[union-attr,operator]
    return LORA_TARGETS.get(config.model_type, DEFAULT_LORA_TARGETS)


def _key(path: str) -> str:
    return path.replace(".", "/")  # module paths hold dots, which nn.Module attribute names may not


class LoRAGate:
    """Holds the current ``[batch, seq]`` gate; ``None`` means "no <COMP> in this forward"."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None
        self._factors: dict[torch.dtype, torch.Tensor] = {}

    def set(self, comp_mask: torch.Tensor | None) -> None:
        self.value = comp_mask if comp_mask is not None and bool(comp_mask.any()) else None
        self._factors = {}

    def factor(self, dtype: torch.dtype) -> torch.Tensor:
        """The gate as ``[batch, seq, 1]`` of ``dtype``, made once per forward and shared by every hooked layer."""
        assert self.value is not None
        if dtype not in self._factors:
            self._factors[dtype] = self.value[..., None].to(dtype)
        return self._factors[dtype]

    def install(self, decoder: nn.Module) -> RemovableHandle:
        """Set the gate from each ``decoder(..., ccm_comp_mask=...)`` call; a call without it turns LoRA off."""

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            self.set(kwargs.pop(GATE_KWARG, None))
            return args, kwargs

        return decoder.register_forward_pre_hook(hook, with_kwargs=True)


class LoRAPair(nn.Module):
    """The low-rank update ``(B A x)·scale`` of one linear layer (B starts at zero: no change until trained)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dtype: torch.dtype):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unscaled(x) * self.scale

    def unscaled(self, x: torch.Tensor) -> torch.Tensor:
        """``B A x`` without the scale (the hooks fold the scale into one fused add)."""
        a: torch.Tensor = self.A
        b: torch.Tensor = self.B
        if a.dtype != x.dtype:
            a, b = a.to(x.dtype), b.to(x.dtype)
        return (x @ a.t()) @ b.t()


class LoRASet(nn.Module):
    """LoRA pairs for the linear layers of ``model`` whose attribute name is in ``targets``.

    ``paths`` lists the adapted layers (module paths inside the model); the pairs are keyed by them.
    """

    def __init__(
        self,
        model: nn.Module,
        targets: Iterable[str],
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        targets = tuple(targets)
        self.pairs = nn.ModuleDict()
        self.paths: list[str] = []
        for path, module in model.named_modules():
            if path.rpartition(".")[2] in targets and is_linear(module):
                # a packed layer (ccmem.quantize) computes in float32 on the CPU; its weight is a method there
                float_layer = isinstance(module, nn.Linear)
                dtype = module.weight.dtype if float_layer else torch.float32
                pair = LoRAPair(int(module.in_features), int(module.out_features), rank, alpha, dtype)
                self.pairs[_key(path)] = pair.to(module.weight.device if float_layer else "cpu")
                self.paths.append(path)
        if not self.paths:
            model_type = getattr(model.config.get_text_config(), "model_type", "?")  # type: ignore[union-attr,operator]
            other = sorted({type(m).__name__ for p, m in model.named_modules() if p.rpartition(".")[2] in targets})
            linear = sorted({p.rpartition(".")[2] for p, m in model.named_modules() if is_linear(m) and "." in p})
            if other:
                raise ValueError(
                    f"the layers named {list(targets)} of this {model_type} model are {', '.join(other)}, not "
                    f"torch.nn.Linear, which ccmem's LoRA adapts; its linear layers are named: "
                    f"{', '.join(linear) or 'none'} (pass those as lora_targets, or use another model family)"
                )
            if not linear:
                raise ValueError(
                    f"this {model_type} model has no torch.nn.Linear layers in its blocks (GPT-2-style models use "
                    "Conv1D), so ccmem's LoRA cannot adapt it; use a model family with linear projections (LLaMA, "
                    "Qwen2, Mistral, Gemma ...)"
                )
            raise ValueError(
                f"found no linear layer named {list(targets)} in this {model_type} model; pass lora_targets with the "
                f"names of its attention (or MLP) linear layers: {', '.join(linear)}"
            )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def pair(self, path: str) -> LoRAPair:
        return self.pairs[_key(path)]  # type: ignore[return-value]

    def attach(self, model: nn.Module, gate: LoRAGate | None) -> list[RemovableHandle]:
        """Hook every adapted layer of ``model``; ``gate=None`` applies the LoRA to every token."""
        handles = []
        # A hook runs for every adapted layer of every forward (210 on SmolLM2 with MLP targets): it calls no
        # module and fuses scale, gate and add into one op, since on a CPU its per-call overhead rivals the math.
        dropout = None if isinstance(self.dropout, nn.Identity) else self.dropout
        for path in self.paths:
            pair = self.pair(path)

            def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor, pair: LoRAPair = pair) -> Any:
                x = args[0]
                if gate is not None:
                    value = gate.value
                    if value is None:
                        return out
                    if value.shape != x.shape[:-1]:
                        raise RuntimeError(
                            f"LoRA gate of shape {tuple(value.shape)} does not match the input "
                            f"{tuple(x.shape[:-1])}; set the gate for the sequence being run"
                        )
                if dropout is not None:
                    x = dropout(x)
                if gate is None:
                    return torch.add(out, pair.unscaled(x), alpha=pair.scale)
                return torch.addcmul(out, pair.unscaled(x), gate.factor(x.dtype), value=pair.scale)

            handles.append(model.get_submodule(path).register_forward_hook(hook))
        return handles

    def merge_into(self, model: nn.Module) -> None:
        """Add ``scale·B·A`` into the adapted layers' weights for good (stage 1 of the CCM recipe)."""
        if any(not isinstance(model.get_submodule(path), nn.Linear) for path in self.paths):
            raise QuantizeError(
                "a LoRA is merged into float weights, and this model's linear layers are packed (ccmem.quantize); "
                "merge first, then quantize (ccmem.load(..., stage1=..., quantize='float16') does it in that order)"
            )
        with torch.no_grad():
            for path in self.paths:
                pair = self.pair(path)
                weight = cast(torch.Tensor, model.get_submodule(path).weight)
                weight += (pair.scale * pair.B.float() @ pair.A.float()).to(weight.dtype)

    @property
    def targets(self) -> list[str]:
        """The distinct layer names adapted (``q_proj``, ``up_proj``, ...), sorted."""
        return sorted({p.rpartition(".")[2] for p in self.paths})
