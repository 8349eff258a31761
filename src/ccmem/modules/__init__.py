"""Reusable nn.Modules: LoRA applied through hooks (optionally gated per token) and the <COMP> embeddings."""

from ccmem.modules.comp import CompEmbeddings, embedding_rows
from ccmem.modules.lora import GATE_KWARG, LoRAGate, LoRAPair, LoRASet, default_targets

__all__ = ["GATE_KWARG", "CompEmbeddings", "LoRAGate", "LoRAPair", "LoRASet", "default_targets", "embedding_rows"]
