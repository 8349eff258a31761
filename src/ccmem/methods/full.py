"""The two reference points of every report: the whole context, and no context at all.

``full`` can also be finetuned (stage 1 of the CCM recipe): an always-on LoRA trained with full attention,
saved as an ordinary adapter; ``ccmem.load(..., stage1=RUN)`` and ``load_path=RUN`` merge it into the weights.

Both also run on encoder-decoder models (T5), as the baselines of a T5 comparison: ``full`` keeps every context
token's encoder keys/values and final hidden states (each ``add`` read in full, reading what came before, as
the compressing methods read a chunk), so the decoder cross-attends to the whole context; ``none`` keeps only
the sink's. ``full``'s stage-1 LoRA is for decoders only.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import ClassVar, cast

import torch

from ccmem.data.samples import Sample
from ccmem.loading import LoadedModel
from ccmem.memory import Memory
from ccmem.methods import ccm_seq2seq
from ccmem.methods.base import LoRAOptions, answer_loss, positions_after, read_batch, read_raw
from ccmem.modules import LoRASet, default_targets
from ccmem.patching.attention import compression_attention
from ccmem.registry import register


@dataclass
class FlatBatch:
    """Whole interactions as plain causal sequences (right-padded), labels on the answers only."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor


@register
@dataclass
class FullContext(ccm_seq2seq.EncoderMemory, LoRAOptions):
    """Keep every context token in the key/value cache (the upper bound on quality and on memory).

    Its LoRA options are for finetuning it with full attention (stage 1 of the CCM recipe).
    """

    name: ClassVar[str] = "full"
    trainable: ClassVar[bool] = True
    holds_every_token: ClassVar[bool] = True
    batchable: ClassVar[bool] = True
    encoder_decoder: ClassVar[bool] = True
    runtime_options: ClassVar[frozenset[str]] = frozenset({"lora_dropout"})

    def check_options(self) -> None:
        self.check_lora_options()

    @staticmethod
    def _refuse_encoder_decoder(lm: LoadedModel) -> None:
        if lm.is_encoder_decoder:
            raise NotImplementedError(
                f"finetuning full (its stage-1 LoRA) is for decoder-only models; {lm.name} is an encoder-decoder "
                "model, where full runs as it is (train ccm-concat, ccm-merge or gist on it instead)"
            )

    def build(self, lm: LoadedModel) -> LoRASet:
        self._refuse_encoder_decoder(lm)
        targets = self.lora_targets or default_targets(lm.model)
        return LoRASet(lm.model.base_model, targets, self.lora_rank, self.lora_alpha, self.lora_dropout)

    def _lora_active(self, lm: LoadedModel) -> bool:
        if lm.is_encoder_decoder:
            return False  # no stage-1 LoRA there (build refuses one)
        if self.adapter_hash == "untrained" and self._built_for is None:
            return False  # nothing loaded, nothing built to train: runs on models the LoRA cannot adapt (GPT-2)
        lora = cast(LoRASet, self.module_for(lm))
        # Neither loaded nor being trained: B is zero, so the plain model, without the hooks' cost.
        return self.adapter_hash != "untrained" or any(p.requires_grad for p in lora.parameters())

    def changes_reading(self, lm: LoadedModel) -> bool:
        return self._lora_active(lm)

    def install(self, lm: LoadedModel, stack: ExitStack) -> None:
        if lm.is_encoder_decoder:  # the encoder reads a memory through ccmem's attention
            stack.enter_context(compression_attention(lm.model))
        if not self._lora_active(lm):
            return
        for handle in cast(LoRASet, self.module_for(lm)).attach(lm.model.base_model, gate=None):
            stack.callback(handle.remove)

    def add(self, lm: LoadedModel, memory: Memory, ids: torch.Tensor) -> Memory:
        if lm.is_encoder_decoder:
            return ccm_seq2seq.append_raw(lm, memory, ids, window=memory.window + ids.shape[-1])
        layers, positions = read_raw(lm, memory, ids)
        return memory.with_layers(layers, positions, advance=ids.shape[-1], window=memory.window + ids.shape[-1])

    def add_batch(self, lm: LoadedModel, memories: list[Memory], ids: list[torch.Tensor]) -> list[Memory]:
        if lm.is_encoder_decoder:  # one interaction at a time
            return super().add_batch(lm, memories, ids)
        read = read_batch(lm, memories, ids)
        out = []
        for m, layers, n in zip(memories, read.layers, read.n_new, strict=True):
            out.append(m.with_layers(layers, positions_after(m, layers, n), advance=n, window=m.window + n))
        return out

    def make_batch(self, samples: list[Sample], pad_id: int = 0) -> FlatBatch:
        """Each sample as ``[sink][c1]...[ck][tail]`` read with ordinary causal attention (stage-1 finetuning)."""
        rows = [s.tokens for s in samples]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for b, (row, s) in enumerate(zip(rows, samples, strict=True)):
            ids[b, : len(row)] = torch.tensor(row)
            mask[b, : len(row)] = 1
            answer = len(row) - len(s.tail) + s.answer_start
            labels[b, answer : len(row)] = ids[b, answer : len(row)]
        return FlatBatch(ids, labels, mask)

    def training_loss(self, lm: LoadedModel, batch: FlatBatch) -> torch.Tensor:
        self._refuse_encoder_decoder(lm)
        with self.attached(lm):
            hidden = lm.model.base_model(
                input_ids=batch.input_ids.to(lm.device),
                attention_mask=batch.attention_mask.to(lm.device),
                use_cache=False,
            ).last_hidden_state
            return answer_loss(lm, hidden, batch.labels)


@register
@dataclass
class NoContext(ccm_seq2seq.EncoderMemory):
    """Drop the context (keep only the attention sink): the lower bound every compression must beat."""

    name: ClassVar[str] = "none"
    uses_positions: ClassVar[bool] = False
    reads_context: ClassVar[bool] = False
    encoder_decoder: ClassVar[bool] = True  # the decoder reads the sink's encoder outputs and the query's

    def changes_reading(self, lm: LoadedModel) -> bool:
        return False

    def install(self, lm: LoadedModel, stack: ExitStack) -> None:
        if lm.is_encoder_decoder:  # the encoder reads the sink through ccmem's attention
            stack.enter_context(compression_attention(lm.model))

    batchable: ClassVar[bool] = True  # nothing to read

    def add(self, lm: LoadedModel, memory: Memory, ids: torch.Tensor) -> Memory:
        # Positions do not advance either: the model sees the query as if the context never happened.
        return memory
