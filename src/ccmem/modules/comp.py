"""The learned <COMP> embeddings: separate parameters, so the vocabulary is never resized."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn


def embedding_rows(layer: nn.Module) -> torch.Tensor:
    """The input embedding table as the model reads it: Gemma's layer scales its rows by sqrt(hidden_size), so
    new-token embeddings started from the stored rows were that many times smaller than every other input."""
    weight = cast(torch.Tensor, layer.weight).detach()
    probe = torch.arange(min(8, weight.shape[0]), device=weight.device)
    with torch.no_grad():
        read, stored = layer(probe).float(), weight[probe].float()
    norm = float(stored.pow(2).sum())
    scale = float((read * stored).sum()) / norm if norm > 0 else 1.0
    return weight if abs(scale - 1.0) < 1e-3 else weight * scale


class CompEmbeddings(nn.Module):
    """``n_tok`` trainable input embeddings written at <COMP> positions."""

    def __init__(self, n_tok: int, hidden_size: int, init_from: torch.Tensor | None = None):
        super().__init__()
        if n_tok < 1:
            raise ValueError(f"n_tok must be at least 1, got {n_tok}")
        weight = torch.zeros(n_tok, hidden_size)
        if init_from is not None:
            # Start near an ordinary token embedding so the untrained model sees in-distribution inputs.
            mean, std = init_from.float().mean(0), init_from.float().std(0)
            generator = torch.Generator().manual_seed(0)
            weight = mean + 0.1 * std * torch.randn(n_tok, hidden_size, generator=generator)
            weight = weight.to(init_from.dtype)
        self.weight = nn.Parameter(weight)

    @property
    def n_tok(self) -> int:
        return int(self.weight.shape[0])

    def fill(self, embeds: torch.Tensor, comp_mask: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Return ``embeds`` with <COMP> positions replaced by the embedding of their slot."""
        values = self.weight.to(embeds.dtype)[slots[comp_mask]]
        out = embeds.clone()
        out[comp_mask] = values
        return out
