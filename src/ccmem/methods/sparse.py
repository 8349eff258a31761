"""What ``sentinel``, ``local`` and ``scattered`` share: a LoRA-finetuned model that reads its context through a
sparse attention mask and keeps only the key/value entries later tokens may still see.

Ren et al. (EMNLP 2023) compare sentinel-token compression with two sparse-attention baselines at the same
compression ratio ``r``: of ``n`` context tokens each keeps ``n - floor(r·n)`` entries (sentinel within one
span's rounding). The rules live in :mod:`ccmem.sparse_masks`; a method here only says how it lays out new
context (:meth:`SparseMethod.layout`).

Training is one masked forward over the whole sample (labels on every real token by default, as the
reproduction's causal language modelling). Inference (``add``) runs the same masked forward over the new
tokens after the memory, then really evicts every entry no later token may see, so the memory shrinks in
bytes; ``tests/methods/test_sparse.py`` checks that this equals the training forward.
"""

from __future__ import annotations

import random
from abc import abstractmethod
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import nn

from ccmem.data.samples import Sample
from ccmem.loading import LoadedModel
from ccmem.memory import Memory
from ccmem.methods.base import LoRAOptions, Method, context_count, logits_for, option
from ccmem.modules import LoRASet, default_targets, embedding_rows
from ccmem.patching.attention import PLAN_KWARG, AttentionPlan, check_routes_attention, compression_attention
from ccmem.sparse_masks import Kind, SparseLayout

LOSS_ON = ("all", "answer")


@dataclass(frozen=True)
class Where:
    """Where a layout starts: its sink and tail lengths, the position of its first token, and the context
    tokens read (and entries evicted) before it."""

    sink: int = 0
    tail: int = 0
    start_position: int = 0
    context_before: int = 0
    evicted_before: int = 0

    def context(self, ids: list[int]) -> int:
        """Context tokens among ``ids``."""
        return len(ids) - self.sink - self.tail


@dataclass
class SparseBatch:
    """Right-padded layouts of a batch, ready for one masked forward."""

    input_ids: torch.Tensor  # [B, L]; sentinel positions hold a placeholder id
    sentinel: torch.Tensor  # [B, L] bool: <CL>/<CR> positions
    slot: torch.Tensor  # [B, L]: 0 for <CL>, 1 for <CR>
    allowed: torch.Tensor  # [B, L, L]
    position_ids: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L] (labels[i + 1] is predicted at i)
    lengths: list[int]


class SentinelState(nn.Module):
    """Trainable state of ``sentinel``: the <CL>/<CR> input embeddings (rows 0 and 1) and the LoRA."""

    def __init__(self, embed: torch.Tensor, lora: LoRASet):
        super().__init__()
        mean, std = embed.float().mean(0), embed.float().std(0)
        generator = torch.Generator().manual_seed(0)
        start = mean + 0.1 * std * torch.randn(2, embed.shape[1], generator=generator)
        self.sentinels = nn.Parameter(start.to(device=embed.device, dtype=embed.dtype))
        self.lora = lora


@dataclass
class SparseMethod(Method, LoRAOptions):
    """A LoRA-finetuned model that reads through a sparse mask and evicts what it can no longer see (not
    registered itself)."""

    kind: ClassVar[str] = "learned"
    paper: ClassVar[str] = (
        "Ren et al., Context Compression for Auto-regressive Transformers with Sentinel Tokens, EMNLP 2023"
    )
    trainable: ClassVar[bool] = True
    budgeted: ClassVar[bool] = True
    runtime_options: ClassVar[frozenset[str]] = frozenset({"lora_dropout", "compression_ratio", "seed"})
    #: The method inserts <CL>/<CR> sentinel tokens (its state then holds their embeddings).
    uses_sentinels: ClassVar[bool] = False

    compression_ratio: float = option(0.5, "share r of the context's key/value entries evicted, in [0, 1)")
    lora_rank: int = option(16, "rank of the LoRA (the reproduction's 16)")
    lora_alpha: float = option(32.0, "LoRA scale numerator (the update is scaled by alpha / rank)")
    lora_dropout: float = option(0.05, "dropout on the LoRA input during training")
    loss_on: str = option("all", "tokens trained on: 'all' real tokens (causal LM, as the paper) or 'answer'")
    seed: int = option(0, "seed of the random choices (spans, the scattered subset)")

    def check_options(self) -> None:
        if not 0 <= self.compression_ratio < 1:
            raise ValueError(
                f"compression_ratio must be in [0, 1) (the share of the context evicted), got {self.compression_ratio}"
            )
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {LOSS_ON}, got {self.loss_on!r}")
        self.check_lora_options()
        self._rng = random.Random(self.seed)

    @classmethod
    def budget_options(cls, keep: float) -> dict[str, Any]:
        return {"compression_ratio": round(1 - keep, 6)}

    # ------------------------------------------------------------------ what a method provides

    @abstractmethod
    def layout(self, lm: LoadedModel | None, ids: list[int], where: Where, rng: random.Random) -> SparseLayout:
        """Lay out ``ids`` (``where.sink`` tokens, the context, ``where.tail`` tokens) read after what ``where``
        describes; ``rng`` drives the method's random choices. ``lm`` is None in training batches."""

    # ------------------------------------------------------------------ state and attaching

    def build(self, lm: LoadedModel) -> nn.Module:
        check_routes_attention(lm.model)  # before the LoRA, whose target hint would lead nowhere here
        targets = self.lora_targets or default_targets(lm.model)
        lora = LoRASet(lm.model.base_model, targets, self.lora_rank, self.lora_alpha, self.lora_dropout)
        if not self.uses_sentinels:
            return lora
        embeddings = lm.model.get_input_embeddings()
        if embeddings is None or not hasattr(embeddings, "weight"):
            raise ValueError(
                f"{type(lm.model).__name__} has no input embedding matrix, so {self.name} cannot give its "
                "<CL>/<CR> sentinel tokens embeddings; use a model family that takes inputs_embeds"
            )
        self._pieces = _piece_reader(lm.tokenizer)
        return SentinelState(embedding_rows(embeddings), lora)

    def lora(self, lm: LoadedModel) -> LoRASet:
        module = self.module_for(lm)
        return cast(LoRASet, module.lora if isinstance(module, SentinelState) else module)

    def _lora_active(self, lm: LoadedModel) -> bool:
        # Neither loaded nor being trained: B is zero, so the plain model, without the hooks' cost.
        return self.adapter_hash != "untrained" or any(p.requires_grad for p in self.lora(lm).parameters())

    def changes_reading(self, lm: LoadedModel) -> bool:
        return self._lora_active(lm)

    def install(self, lm: LoadedModel, stack: ExitStack) -> None:
        if self._lora_active(lm):
            for handle in self.lora(lm).attach(lm.model.base_model, gate=None):
                stack.callback(handle.remove)
        stack.enter_context(compression_attention(lm.model))

    # ------------------------------------------------------------------ inference

    def _embed(self, lm: LoadedModel, ids: torch.Tensor, sentinel: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        embeds = lm.model.get_input_embeddings()(ids.to(lm.device))
        if bool(sentinel.any()):
            state = cast(SentinelState, self.module_for(lm))
            embeds = embeds.clone()
            embeds[sentinel.to(lm.device)] = state.sentinels.to(embeds.dtype)[slot[sentinel].to(lm.device)]
        return embeds

    def check_memory(self, memory: Memory) -> None:
        """Each kept entry after the sink carries a context index (state ``index``; a sentinel's may be the count
        of context tokens seen, state ``context_tokens``): what decides the next add's layout."""
        after = memory.num_slots - memory.sink
        index, seen = memory.state.get("index"), context_count(memory)
        if index is None:
            if after:
                raise ValueError(f"its {after} entries after the sink carry no context index (state index)")
            return
        if seen is None:
            raise ValueError("its context count (state context_tokens) must be a whole number >= 0, got none")
        if index.dim() != 1 or index.is_floating_point() or index.dtype == torch.bool or index.numel() != after:
            raise ValueError(
                f"its context index (state index) must hold one whole number per entry after the sink ({after}), "
                f"got shape {tuple(index.shape)} {index.dtype}"
            )
        if index.numel() and (int(index.min()) < -1 or int(index.max()) > seen):  # -1: outside the context
            raise ValueError(
                f"its context index (state index) must lie in -1..{seen} (the context tokens seen), got "
                f"{int(index.min())}..{int(index.max())}"
            )

    def add(self, lm: LoadedModel, memory: Memory, ids: torch.Tensor) -> Memory:
        n = int(ids.shape[-1])
        if n == 0:
            return memory
        before = int(memory.state.get("context_tokens", torch.tensor(0)))
        rng = random.Random(f"{self.seed}-{before}-{n}")  # the same context gives the same memory
        where = Where(
            sink=0,
            tail=0,
            start_position=memory.next_position,
            context_before=before,
            evicted_before=before - (memory.num_slots - memory.sink),
        )
        layout = self.layout(lm, ids[0].tolist(), where, rng)
        old_index = memory.state.get("index", torch.zeros(0, dtype=torch.long))
        if int(old_index.numel()) != memory.num_slots - memory.sink:
            raise ValueError(
                f"this memory was not written by {self.name} (its slots carry no context index); "
                f"start a new memory for {self.name}"
            )
        input_ids, sentinel, slot = _inputs(ids[0].tolist(), layout)
        embeds = self._embed(lm, input_ids[None], sentinel[None], slot[None])
        plan = AttentionPlan.from_allowed(layout.allowed_with_memory(memory.sink, old_index), embeds.dtype, lm.device)
        cache = memory.to_cache()
        lm.model.base_model(
            inputs_embeds=embeds,
            cache=cache,
            position_ids=layout.position_ids[None].to(lm.device),
            use_cache=True,
            **{PLAN_KWARG: plan},
        )
        keep_old = old_index >= layout.final_horizon
        keep_new = layout.kept_after()
        keep = torch.cat([torch.ones(memory.sink, dtype=torch.bool), keep_old, keep_new]).nonzero().flatten()
        keep = keep.to(lm.device)
        layers = [(k.index_select(2, keep), v.index_select(2, keep)) for k, v in Memory.layers_of(cache)]
        new_positions = layout.position_ids.to(lm.device)
        positions = []
        for i, (k, _) in enumerate(layers):
            batch, heads = k.shape[0], k.shape[1]
            empty = torch.zeros(batch, heads, 0, dtype=torch.long, device=lm.device)
            held = memory.positions[i] if memory.positions else empty
            every = torch.cat([held, new_positions.expand(batch, heads, -1)], dim=-1)
            positions.append(every.index_select(-1, keep))
        index = torch.cat([old_index[keep_old], layout.index[keep_new]])
        state = dict(memory.state) | {"context_tokens": torch.tensor(before + n), "index": index}
        return memory.with_layers(layers, positions, advance=n, state=state)

    # ------------------------------------------------------------------ training

    def has_targets(self, sample: Sample) -> bool:
        return self.loss_on == "all" or super().has_targets(sample)  # causal LM: every text trains

    def sample_length(self, sample: Sample) -> int:
        if not self.uses_sentinels:
            return super().sample_length(sample)
        return self.sample_layout(sample, random.Random(0)).length  # sentinels take room in the sequence

    def sample_layout(self, sample: Sample, rng: random.Random | None = None) -> SparseLayout:
        """The training layout of one sample (its context read with the method's mask, its tail as a query)."""
        where = Where(sink=len(sample.sink), tail=len(sample.tail))
        return self.layout(None, sample.tokens, where, rng or self._rng)

    def make_batch(self, samples: list[Sample], pad_id: int = 0) -> SparseBatch:
        rows = []
        for s in samples:
            ids = s.tokens
            layout = self.sample_layout(s)
            trained = torch.ones(len(ids), dtype=torch.bool)
            if self.loss_on == "answer":
                trained[:] = False
                trained[len(ids) - len(s.tail) + s.answer_start :] = True
            rows.append((ids, layout, layout.labels(ids, trained)))
        width = max(r[1].length for r in rows)
        batch = len(rows)
        out = SparseBatch(
            input_ids=torch.full((batch, width), pad_id, dtype=torch.long),
            sentinel=torch.zeros(batch, width, dtype=torch.bool),
            slot=torch.zeros(batch, width, dtype=torch.long),
            allowed=torch.eye(width, dtype=torch.bool).repeat(batch, 1, 1),  # padding queries see themselves
            position_ids=torch.zeros(batch, width, dtype=torch.long),
            labels=torch.full((batch, width), -100, dtype=torch.long),
            lengths=[r[1].length for r in rows],
        )
        for b, (ids, layout, labels) in enumerate(rows):
            n = layout.length
            input_ids, sentinel, slot = _inputs(ids, layout, pad_id)
            out.input_ids[b, :n] = input_ids
            out.sentinel[b, :n] = sentinel
            out.slot[b, :n] = slot
            out.allowed[b, :n, :n] = layout.allowed()
            out.position_ids[b, :n] = layout.position_ids
            if n < width:
                out.position_ids[b, n:] = int(layout.position_ids[-1]) + 1
            out.labels[b, :n] = labels
        return out

    def parallel_hidden(self, lm: LoadedModel, batch: SparseBatch) -> torch.Tensor:
        """The last hidden states of one masked forward over ``batch`` (call while attached)."""
        embeds = self._embed(lm, batch.input_ids, batch.sentinel, batch.slot)
        plan = AttentionPlan.from_allowed(batch.allowed, embeds.dtype, lm.device)
        return cast(
            torch.Tensor,
            lm.model.base_model(
                inputs_embeds=embeds,
                position_ids=batch.position_ids.to(lm.device),
                use_cache=False,
                **{PLAN_KWARG: plan},
            ).last_hidden_state,
        )

    def nll(self, lm: LoadedModel, batch: SparseBatch) -> tuple[torch.Tensor, int]:
        """Summed next-token loss over the labelled tokens of ``batch`` and their number (perplexity's parts)."""
        with self.attached(lm):
            hidden = self.parallel_hidden(lm, batch)
        labels = batch.labels.to(hidden.device)[:, 1:]
        keep = labels != -100
        if not bool(keep.any()):
            raise ValueError("this batch has no token to train on (texts of one token?)")
        logits = logits_for(lm, hidden[:, :-1][keep])
        return nn.functional.cross_entropy(logits, labels[keep], reduction="sum"), int(keep.sum())

    def training_loss(self, lm: LoadedModel, batch: SparseBatch) -> torch.Tensor:
        total, count = self.nll(lm, batch)
        return total / count


# ---------------------------------------------------------------------------- helpers


def _inputs(ids: list[int], layout: SparseLayout, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids of a layout (a placeholder at sentinels), the sentinel mask, and each sentinel's row."""
    source = layout.source
    sentinel = source < 0
    token = torch.tensor(ids, dtype=torch.long)
    input_ids = torch.where(sentinel, torch.tensor(pad_id), token[source.clamp(min=0)])
    slot = (layout.kind == Kind.CLOSE).long()
    return input_ids, sentinel, slot


def _piece_reader(tokenizer: Any) -> Any:
    """A function giving the text of each token id (for the sentence splitter)."""

    def pieces(ids: list[int]) -> list[str]:
        return [tokenizer.decode([i]) for i in ids]

    return pieces
