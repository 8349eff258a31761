"""The compressed memory: per-layer key/value tensors plus what is needed to use them safely.

A :class:`Memory` is plain data (tensors and metadata). :meth:`Memory.to_cache` turns it into a fresh
transformers ``DynamicCache`` for a forward or ``model.generate(...)``, so generating never mutates the
memory itself. Saved files are safetensors with string metadata, written atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import DynamicCache

from ccmem.fileio import atomic_path

FORMAT_VERSION = "1"


class MemoryMismatchError(ValueError):
    """A saved memory does not belong to the model or method it is being loaded into."""


@dataclass
class Memory:
    """Compressed key/value memory of one interaction.

    ``layers[i] = (keys, values)`` with shape ``[batch, kv_heads, slots, head_dim]``.
    ``next_position`` is the position id the next token will get (CCM keeps the positions of the full
    interaction); ``steps`` counts compressed chunks (the ``t`` of CCM-merge's running average);
    ``sink`` is how many leading slots are the attention sink.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    next_position: int = 0
    steps: int = 0
    sink: int = 0
    meta: dict[str, str] = field(default_factory=dict)
    #: Uncompressed context tokens, kept only by methods that recompress from scratch (gist); not KV memory.
    context_ids: torch.Tensor | None = None

    @property
    def num_slots(self) -> int:
        """Number of key/value positions held (per layer)."""
        return int(self.layers[0][0].shape[-2]) if self.layers else 0

    @property
    def nbytes(self) -> int:
        """Bytes taken by all keys and values."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)

    def is_empty(self) -> bool:
        return self.num_slots == 0

    def clone(self) -> Memory:
        context = None if self.context_ids is None else self.context_ids.clone()
        return replace(
            self,
            layers=[(k.clone(), v.clone()) for k, v in self.layers],
            meta=dict(self.meta),
            context_ids=context,
        )

    def to_cache(self) -> DynamicCache:
        """A new ``DynamicCache`` holding a copy of this memory (empty memory -> empty cache)."""
        if not self.layers:
            return DynamicCache()
        return DynamicCache(ddp_cache_data=[(k, v) for k, v in self.layers])

    def generate_inputs(self, query_ids: torch.Tensor) -> dict[str, torch.Tensor | DynamicCache]:
        """Keyword arguments for ``model.generate(**memory.generate_inputs(query))``.

        ``generate`` expects ``input_ids`` to cover the cached positions too, so the memory slots are
        represented by placeholder ids it never reads; position ids continue the interaction's positions.
        """
        query_ids = query_ids[None] if query_ids.dim() == 1 else query_ids
        batch, n = query_ids.shape
        placeholder = query_ids.new_full((batch, self.num_slots), int(query_ids[0, 0]))
        input_ids = torch.cat([placeholder, query_ids], dim=1)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "position_ids": torch.arange(self.next_position, self.next_position + n, device=query_ids.device)[None],
            "cache": self.to_cache(),
        }

    @staticmethod
    def layers_of(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer ``(keys, values)`` of a filled cache."""
        return [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[union-attr,misc]

    def select(self, index: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys/values at the given slot indices, every layer."""
        return [(k.index_select(-2, index), v.index_select(-2, index)) for k, v in self.layers]

    # ---------------------------------------------------------------- persistence

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to a safetensors file atomically (a crash never leaves a half-written file)."""
        path = Path(path)
        tensors = {}
        for i, (k, v) in enumerate(self.layers):
            tensors[f"layers.{i}.keys"] = k.detach().contiguous().cpu()
            tensors[f"layers.{i}.values"] = v.detach().contiguous().cpu()
        if self.context_ids is not None:
            tensors["context_ids"] = self.context_ids.contiguous().cpu()
        metadata = {
            "format": "ccmem.memory",
            "format_version": FORMAT_VERSION,
            "next_position": str(self.next_position),
            "steps": str(self.steps),
            "sink": str(self.sink),
            "meta": json.dumps(self.meta, sort_keys=True),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        expect: dict[str, str] | None = None,
        device: torch.device | str = "cpu",
    ) -> Memory:
        """Read a memory; refuse it when any ``expect`` entry differs from what it was saved with."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no memory file at {path}")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                header: dict[str, Any] = f.metadata() or {}
                if header.get("format") != "ccmem.memory":
                    raise MemoryMismatchError(f"{path} is not a ccmem memory file")
                n_layers = len([k for k in f.keys() if k.endswith(".keys")])
                layers = [
                    (f.get_tensor(f"layers.{i}.keys"), f.get_tensor(f"layers.{i}.values")) for i in range(n_layers)
                ]
                context = f.get_tensor("context_ids") if "context_ids" in f.keys() else None
        except (OSError, ValueError, SafetensorError) as err:
            if isinstance(err, MemoryMismatchError):
                raise
            raise MemoryMismatchError(f"{path} is not a readable safetensors memory file: {err}") from err
        meta = json.loads(header.get("meta", "{}"))
        for key, wanted in (expect or {}).items():
            found = meta.get(key, "")  # a key older memories lack reads as empty, like stage1 on plain weights
            if found != wanted:
                raise MemoryMismatchError(
                    f"memory {path} was made with {key}={found!r}, but this model has {key}={wanted!r}; "
                    "load it with the same model, stage-1 LoRA, method and adapter that wrote it"
                )
        return cls(
            layers=layers,
            next_position=int(header.get("next_position", 0)),
            steps=int(header.get("steps", 0)),
            sink=int(header.get("sink", 0)),
            meta=meta,
            context_ids=context,
        )
