"""Token-gated ("conditional") LoRA: ``W x + g ⊙ (B A x)·scale`` with ``g`` = 1 only at <COMP> positions.

CCM trains a LoRA that is active only while the model writes memory, so the base model's behaviour on
every other token is untouched (CCM, section 3.2). peft's LoRA applies to every token and its activated
LoRA gates on an invocation *sequence*, not on arbitrary positions, so the gate lives here.

The gate is shared state read by every wrapped layer. :meth:`LoRAGate.install` sets it at the start of
every decoder forward from the ``ccm_comp_mask`` keyword (absent: off), and leaves it set afterwards:
gradient checkpointing recomputes the layers during backward, and they must see the same gate again.
Passing the mask as a forward keyword also lets a HF Trainer batch carry it like any other input.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

GATE_KWARG = "ccm_comp_mask"


class LoRAGate:
    """Holds the current ``[batch, seq]`` gate; ``None`` means "no <COMP> in this forward"."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def set(self, comp_mask: torch.Tensor | None) -> None:
        self.value = comp_mask if comp_mask is not None and bool(comp_mask.any()) else None

    def install(self, decoder: nn.Module) -> torch.utils.hooks.RemovableHandle:
        """Set the gate from each ``decoder(..., ccm_comp_mask=...)`` call; a call without it turns LoRA off."""

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            self.set(kwargs.pop(GATE_KWARG, None))
            return args, kwargs

        return decoder.register_forward_pre_hook(hook, with_kwargs=True)


class GatedLoRALinear(nn.Module):
    """Wraps a frozen ``nn.Linear``; adds the low-rank update only where the gate is on."""

    def __init__(self, base: nn.Linear, gate: LoRAGate, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.base = base
        self.gate = gate
        self.rank = rank
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:  # some model code reads ``proj.weight.dtype``
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        gate = self.gate.value
        if gate is None:
            return out
        if gate.shape != x.shape[:-1]:
            raise RuntimeError(
                f"LoRA gate of shape {tuple(gate.shape)} does not match the input {tuple(x.shape[:-1])}; "
                "set the gate for the sequence being run"
            )
        update = (self.dropout(x) @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype)
        return out + update * (self.scale * gate[..., None].to(x.dtype))
