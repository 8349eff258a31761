"""Reusable nn.Modules: token-gated LoRA and the <COMP> embeddings."""

from ccmem.modules.comp import CompEmbeddings
from ccmem.modules.lora import GATE_KWARG, GatedLoRALinear, LoRAGate

__all__ = ["GATE_KWARG", "CompEmbeddings", "GatedLoRALinear", "LoRAGate"]
