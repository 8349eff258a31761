"""The contract every method follows, and the forward helpers they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ccmem.loading import LoadedModel
from ccmem.memory import Memory


@dataclass
class Method(ABC):
    """A way to keep context: ``add`` folds new context tokens into a :class:`Memory`.

    Subclasses are dataclasses whose fields are their hyper-parameters; ``name`` is the registry key.
    ``prepare`` attaches whatever the method needs to the model (adapters, attention hooks) once.
    """

    name: ClassVar[str]
    #: True where ``add`` uses trained parameters (an adapter); the harness says when they are untrained.
    needs_adapter: ClassVar[bool] = False
    #: False where added context does not use up positions (``none``), so no length limit applies to it.
    uses_positions: ClassVar[bool] = True

    def prepare(self, lm: LoadedModel) -> None:  # noqa: B027 - optional hook
        """Attach modules or hooks to the model (called once per model)."""

    def new_memory(self, lm: LoadedModel) -> Memory:
        """An empty memory for this model."""
        return Memory(meta=self.memory_meta(lm))

    def memory_meta(self, lm: LoadedModel) -> dict[str, str]:
        """Identity stamped into memories, checked when they are loaded again (a memory made on weights with a
        stage-1 LoRA merged in means something else to the plain model)."""
        return {"model": lm.fingerprint, "stage1": lm.stage1 or "", "method": self.name, **self.config_meta()}

    def config_meta(self) -> dict[str, str]:
        """Hyper-parameters that change what a memory means."""
        return {}

    def add_sink(self, lm: LoadedModel, memory: Memory, ids: torch.Tensor) -> Memory:
        """Keep ``ids`` (a system prompt, BOS) uncompressed at the front of the memory."""
        if memory.steps or memory.num_slots != memory.sink:
            raise ValueError("the attention sink must be added before any other context")
        cache = memory.to_cache()
        run_decoder(lm, ids, cache, memory.next_position)
        return updated_memory(memory, Memory.layers_of(cache), sink=memory.sink + ids.shape[-1], advance=ids.shape[-1])

    @abstractmethod
    def add(self, lm: LoadedModel, memory: Memory, ids: torch.Tensor) -> Memory:
        """Fold the context tokens ``ids`` (shape ``[1, n]``) into ``memory``; return the new memory."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters a training recipe should update (none for training-free methods)."""
        return []

    # Training: ``make_batch`` lays samples out, ``training_loss`` is the loss of one batch.
    def make_batch(self, samples: list[Any], pad_id: int = 0) -> Any:
        raise NotImplementedError(f"method {self.name!r} cannot be trained; train full, ccm-concat or ccm-merge")

    def training_loss(self, lm: LoadedModel, batch: Any) -> torch.Tensor:
        raise NotImplementedError(f"method {self.name!r} cannot be trained; train full, ccm-concat or ccm-merge")


def answer_loss(lm: LoadedModel, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss where ``labels`` (aligned with ``hidden``) are set, with logits formed only there.

    The LM head over a large vocabulary dominates the cost of a small model; context and <COMP>
    positions have no label, so their logits are never computed.
    """
    labels = labels.to(hidden.device)[:, 1:]
    keep = labels != -100
    if not bool(keep.any()):
        raise ValueError("this batch has no answer tokens to train on (check answer_start)")
    logits = lm.model.get_output_embeddings()(hidden[:, :-1][keep]).float()
    softcap = getattr(lm.model.config.get_text_config(), "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return nn.functional.cross_entropy(logits, labels[keep])


def updated_memory(
    memory: Memory,
    layers: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    advance: int = 0,
    steps: int | None = None,
    sink: int | None = None,
    context_ids: torch.Tensor | None = None,
) -> Memory:
    """A new memory holding ``layers``, with positions moved on by ``advance`` tokens."""
    return Memory(
        layers=layers,
        next_position=memory.next_position + advance,
        steps=memory.steps if steps is None else steps,
        sink=memory.sink if sink is None else sink,
        meta=dict(memory.meta),
        context_ids=memory.context_ids if context_ids is None else context_ids,
    )


def positions(start: int, length: int, device: torch.device) -> torch.Tensor:
    """Position ids ``start .. start+length-1`` as a ``[1, length]`` tensor."""
    return torch.arange(start, start + length, device=device)[None]


def run_decoder(
    lm: LoadedModel,
    ids: torch.Tensor | None,
    cache: Any,
    start: int,
    *,
    inputs_embeds: torch.Tensor | None = None,
    **kwargs: Any,
) -> Any:
    """Run the decoder stack only (no LM head: memory writing needs no logits) and fill ``cache``."""
    length = (ids if ids is not None else inputs_embeds).shape[1]  # type: ignore[union-attr]
    return lm.model.base_model(
        input_ids=ids,
        inputs_embeds=inputs_embeds,
        cache=cache,
        position_ids=positions(start, length, lm.device),
        use_cache=True,
        **kwargs,
    )
