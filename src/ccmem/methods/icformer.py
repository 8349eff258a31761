"""IC-Former (Wang et al., Findings of EMNLP 2024, arXiv:2406.13618): a small former compresses, the LM never reads
the context.

``num_query_tokens`` digest tokens cross-attend to the context's token embeddings (the frozen LM's own embedding
layer) in a ``num_hidden_layers``-layer former (:mod:`ccmem.modules.icformer`); the digests are soft-prompt
embeddings, and the memory is the frozen LM's keys/values of ``[digests][FT]`` read after the sink (``marker=lm``
reads ``[digests][LM]`` instead: a pretrained former continuing a text, as its LM rows were trained). The LM's
decoder layers run over ``q`` digests per chunk plus one marker, never over the context.

A context longer than ``max_seq_len`` is refused unless ``use_chunk``; then (as the reference) it is split into
``ceil(n / max_chunk_len)`` chunks of equal size, each compressed alone and the digests concatenated. The former
cannot extend digests, so each ``add`` recompresses the whole context so far (kept in ``Memory.state``, as gist
does); that costs one former pass over the context and one LM pass over the digests.

Training (the LM stays frozen; the former is the one trainable module): ``objective=finetune`` lays out
``[sink][digests][FT][prompt answer]`` with the loss on the answer; ``objective=pretrain`` autoencodes the context
(``[sink][digests][AE][context]``) and models its continuation (``[sink][digests][LM][continuation]``: the tokens
after the first ``max_seq_len``; with ``pretrain_min_len``, the cut is drawn per text between it and
``max_seq_len``, so batches mix compression ratios). ``avg_level`` is the loss reduction: ``token`` averages
over every target token of the batch, ``sentence`` averages each sample's tokens first (the reference's
gradient manager, as a loss).
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch.nn import functional as F

from ccmem.data.samples import Sample
from ccmem.loading import LoadedModel
from ccmem.memory import Memory, concat_positions, positions_for
from ccmem.methods.base import ContextTooLongError, Method, check_context_ids, logits_for, option, run_decoder
from ccmem.modules import embedding_rows
from ccmem.modules.icformer import ICFormer
from ccmem.registry import register

OBJECTIVES = ("finetune", "pretrain")
MARKERS = {"ft": ICFormer.FT, "lm": ICFormer.LM, "ae": ICFormer.AE}
AVG_LEVELS = ("token", "sentence")


@dataclass
class Row:
    """One LM sequence of a training batch: ``[sink][digests of sample's chunks][marker][tail]``."""

    sample: int  # index of the sample (and of its digests) in the batch
    sink: list[int]
    marker: int
    tail: list[int]
    label_from: int  # tail[label_from:] are targets


@dataclass
class DigestBatch:
    """Context chunks for one padded former pass, and the LM rows that read their digests."""

    chunks: list[list[int]]  # every chunk of every sample, in order
    owner: list[int]  # the sample each chunk belongs to
    rows: list[Row]
    n_samples: int
    input_ids: torch.Tensor  # [rows, width]: the LM rows' ids, digests and markers as pad (the trainer counts it)
    lengths: list[int]  # real positions per LM row (digests and marker included)


@register
@dataclass
class ICFormerMethod(Method):
    """IC-Former: digest tokens of a small former cross-attend to context embeddings; the LM never reads the context."""

    name: ClassVar[str] = "icformer"
    kind: ClassVar[str] = "learned"
    paper: ClassVar[str] = (
        "Wang et al., In-Context Former: Lightning-fast Compressing Context for Large Language Model, "
        "Findings of EMNLP 2024"
    )
    trainable: ClassVar[bool] = True
    needs_adapter: ClassVar[bool] = True
    runtime_options: ClassVar[frozenset[str]] = frozenset(
        {"max_seq_len", "use_chunk", "max_chunk_len", "objective", "avg_level", "pretrain_min_len", "marker"}
    )

    num_hidden_layers: int = option(3, "layers of the former")
    num_query_tokens: int = option(128, "digest tokens per chunk: the memory slots one chunk becomes")
    max_seq_len: int = option(512, "longest context compressed at once (longer: an error, or chunks with use_chunk)")
    use_chunk: bool = option(False, "split a context longer than max_seq_len into chunks, digests concatenated")
    max_chunk_len: int = option(
        512, "longest chunk with use_chunk (the context is cut into equal chunks; at most max_seq_len)"
    )
    objective: str = option("finetune", "training loss: finetune (answer after digests + prompt) or pretrain")
    avg_level: str = option("token", "loss reduction: token (mean over all targets) or sentence (of sample means)")
    pretrain_min_len: int = option(
        0,
        "pretraining: cut each text's context at a length drawn per text between this and max_seq_len, so batches "
        "mix compression ratios (at num_query_tokens: one digest per token); 0: always max_seq_len, as the paper",
    )
    locality: bool = option(
        True,
        "digests at the centres of their context segments with a learned distance penalty, starting as a copy of "
        "their segments, which the LM already reads (ccmem's); false: the paper's layout (digests after the context)",
    )

    marker: str = option(
        "ft",
        "the learned marker read after the digests in the memory: ft (answer a prompt: finetuned formers), lm "
        "(continue the text: what pretraining's continuation rows read), ae (write the context back)",
    )

    def check_options(self) -> None:
        if self.marker not in MARKERS:
            raise ValueError(f"marker must be one of {', '.join(MARKERS)} (got {self.marker!r})")
        for key in ("num_hidden_layers", "num_query_tokens", "max_seq_len", "max_chunk_len"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1 (got {getattr(self, key)})")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)} (got {self.objective!r})")
        if not 0 <= self.pretrain_min_len <= self.max_seq_len:
            raise ValueError(
                f"pretrain_min_len must be between 0 (off) and max_seq_len={self.max_seq_len} "
                f"(got {self.pretrain_min_len})"
            )
        if self.use_chunk and self.max_chunk_len > self.max_seq_len:
            raise ValueError(
                f"max_chunk_len={self.max_chunk_len} is longer than max_seq_len={self.max_seq_len}: with use_chunk "
                "each chunk is compressed at once, so it must fit max_seq_len; lower max_chunk_len or raise max_seq_len"
            )
        if self.avg_level not in AVG_LEVELS:
            raise ValueError(f"avg_level must be one of {', '.join(AVG_LEVELS)} (got {self.avg_level!r})")

    # ------------------------------------------------------------------ state

    def build(self, lm: LoadedModel) -> ICFormer:
        cfg = lm.model.config.get_text_config()
        embed = embedding_rows(lm.model.get_input_embeddings())  # the digests are read as input embeddings
        hidden = int(embed.shape[1])
        heads = int(getattr(cfg, "num_attention_heads", 0) or 1)
        if hidden % heads or (hidden // heads) % 2:
            heads = 1
        former = ICFormer(
            hidden,
            self.num_hidden_layers,
            self.num_query_tokens,
            num_heads=heads,
            intermediate_size=getattr(cfg, "intermediate_size", None),
            init_from=embed.detach(),
            locality=self.locality,
        )
        return former.to(device=embed.device, dtype=embed.dtype)

    def former(self, lm: LoadedModel) -> ICFormer:
        return cast(ICFormer, self.module_for(lm))

    def changes_reading(self, lm: LoadedModel) -> bool:
        return False  # the memory is ordinary keys/values; reading with it needs nothing attached

    # ------------------------------------------------------------------ chunking

    def split(self, n: int) -> list[int]:
        """Chunk lengths of a context of ``n`` tokens (refused when empty, or too long without ``use_chunk``)."""
        if n < 1:
            raise ValueError("icformer cannot compress an empty context")
        if not self.use_chunk:
            if n > self.max_seq_len:
                fix = (  # use_chunk refuses a max_chunk_len over max_seq_len: then the fix names both
                    f"set use_chunk=true to compress it in chunks of at most max_chunk_len={self.max_chunk_len}"
                    if self.max_chunk_len <= self.max_seq_len
                    else f"set use_chunk=true and max_chunk_len={self.max_seq_len} (it is {self.max_chunk_len}, "
                    f"longer than max_seq_len) to compress it in chunks"
                )
                raise ContextTooLongError(
                    f"the context has {n} tokens, more than max_seq_len={self.max_seq_len}; {fix}, or raise "
                    "max_seq_len (-O use_chunk=true on the command line, method.use_chunk=true in training)"
                )
            return [n]
        count = -(-n // self.max_chunk_len)
        size = -(-n // count)  # equal chunks, as the reference cuts them
        return [min(size, n - i) for i in range(0, n, size)]

    def memory_meta(self, lm: LoadedModel) -> dict[str, str]:
        """The marker's keys/values are part of the memory (read after the digests), so a memory records it: read
        by a session set to another marker, it would quietly answer with the one it holds."""
        return super().memory_meta(lm) | {"marker": self.marker}

    def n_digests(self, n: int) -> int:
        return self.num_query_tokens * len(self.split(n))

    # ------------------------------------------------------------------ compression

    def digests(self, lm: LoadedModel, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Digest embeddings ``[q, hidden]`` of each chunk of ids, in one padded former pass."""
        embed = lm.model.get_input_embeddings()
        lengths = [int(c.numel()) for c in chunks]
        ids = torch.zeros(len(chunks), max(lengths), dtype=torch.long, device=lm.device)
        for i, c in enumerate(chunks):
            ids[i, : lengths[i]] = c.reshape(-1).to(lm.device)
        out = self.former(lm)(embed(ids), lengths)
        return list(out)

    def soft_prompt(self, lm: LoadedModel, context: torch.Tensor, marker: int = ICFormer.FT) -> torch.Tensor:
        """``[1, digests + 1, hidden]``: the digests of ``context`` (``[1, n]`` ids), then a marker (FT: answer a
        prompt; AE: reconstruct the context; LM: continue it)."""
        sizes = self.split(int(context.shape[-1]))
        chunks = list(context.reshape(-1).split(sizes))
        digests = torch.cat(self.digests(lm, chunks), dim=0)
        return torch.cat([digests, self.former(lm).marker(marker, digests.dtype)], dim=0)[None]

    def reconstruct(self, lm: LoadedModel, context: torch.Tensor, max_new_tokens: int | None = None) -> list[int]:
        """The context as the frozen LM writes it back, greedily, from its digests and the AE marker (what
        pretraining teaches; ``max_new_tokens`` defaults to the context's length)."""
        n = max_new_tokens or int(context.shape[-1])
        cache = Memory().to_cache()
        with torch.no_grad():
            prompt = self.soft_prompt(lm, context, ICFormer.AE).to(lm.dtype)
            hidden = run_decoder(lm, None, cache, 0, inputs_embeds=prompt).last_hidden_state
            position, out = prompt.shape[1], []
            for _ in range(n):
                token = int(logits_for(lm, hidden[:, -1]).argmax(-1))
                out.append(token)
                ids = torch.tensor([[token]], device=lm.device)
                hidden = run_decoder(lm, ids, cache, position).last_hidden_state
                position += 1
        return out

    def reconstruction_logits(self, lm: LoadedModel, context: torch.Tensor) -> torch.Tensor:
        """``[n, vocab]``: the frozen LM's next-token logits for each of the ``n`` context tokens (``[1, n]`` ids),
        teacher-forced after its digests and the AE marker (one forward; what the AE loss of pretraining reads)."""
        prompt = self.soft_prompt(lm, context, ICFormer.AE).to(lm.dtype)
        embeds = torch.cat([prompt, lm.model.get_input_embeddings()(context.to(lm.device))], dim=1)
        hidden = lm.model.base_model(inputs_embeds=embeds).last_hidden_state
        return logits_for(lm, hidden[0, prompt.shape[1] - 1 : -1])

    def positions_needed(self, memory: Memory, n_tokens: int) -> int:
        seen = memory.state.get("context_ids")
        total = n_tokens + (int(seen.shape[-1]) if seen is not None else 0)
        return max(0, memory.sink + self.n_digests(total) + 1 - memory.next_position) if n_tokens else 0

    def positions_fix(self) -> str:
        return (
            f"each add turns the whole context so far into {self.num_query_tokens} digests per chunk, however it is "
            "added: give it longer chunks (a larger max_chunk_len, and max_seq_len), fewer digests (a smaller "
            "num_query_tokens: a former trained with them), or a shorter context"
        )

    def check_memory(self, memory: Memory) -> None:
        check_context_ids(memory, lambda n: self.n_digests(n) + 1)  # the digests and the marker after them

    def add(self, lm: LoadedModel, memory: Memory, ids: torch.Tensor) -> Memory:
        if ids.numel() == 0:
            raise ValueError("icformer cannot compress an empty context")
        previous = memory.state.get("context_ids")
        context = ids if previous is None else torch.cat([previous.to(ids.device), ids], dim=-1)
        prompt = self.soft_prompt(lm, context, MARKERS[self.marker])
        base = memory.prefix(memory.sink)
        cache = base.to_cache()
        run_decoder(lm, None, cache, memory.sink, inputs_embeds=prompt.to(lm.dtype))
        layers = Memory.layers_of(cache)
        n = prompt.shape[1]
        positions = concat_positions([base.positions, [positions_for(memory.sink, n, k) for k, _ in layers]])
        return base.with_layers(layers, positions, next_position=memory.sink + n, state={"context_ids": context})

    # ------------------------------------------------------------------ training

    def _targets(self, sample: Sample) -> tuple[list[int], list[tuple[int, list[int], int]]]:
        """The context to compress and the ``(marker, tail, label_from)`` rows that read its digests."""
        if self.objective == "finetune":
            context = [t for c in sample.chunks for t in c]
            return context, [(ICFormer.FT, list(sample.tail), sample.answer_start)]
        text = [t for c in sample.chunks for t in c] + list(sample.tail)
        cut = self.max_seq_len
        if self.pretrain_min_len and len(text) > self.pretrain_min_len:
            # the same length for the same text in every epoch and process: seeded by the text itself
            seed = zlib.crc32(" ".join(map(str, text[:64])).encode())
            cut = random.Random(seed).randint(self.pretrain_min_len, self.max_seq_len)
        context, rest = text[:cut], text[cut : cut + self.max_seq_len]
        rows = [(ICFormer.AE, context, 0)]
        if rest:
            rows.append((ICFormer.LM, rest, 0))
        return context, rows

    def has_targets(self, sample: Sample) -> bool:
        if self.objective == "pretrain":  # the context is reconstructed (and continued): any text trains
            return any(sample.chunks) or bool(sample.tail)
        return sample.answer_start < len(sample.tail)  # finetune: the answer after the prompt

    def no_targets_hint(self) -> str:
        if self.objective != "finetune":
            return ""
        return (
            "icformer's finetune objective trains on answers: PwC records; plain text such as the Pile needs "
            "method.objective=pretrain, the icformer-pretrain preset"
        )

    def sample_length(self, sample: Sample) -> int:
        context, rows = self._targets(sample)
        return len(sample.sink) + self.n_digests(len(context)) + 1 + max(len(tail) for _, tail, _ in rows)

    def make_batch(self, samples: list[Sample], pad_id: int = 0) -> DigestBatch:
        chunks: list[list[int]] = []
        owner: list[int] = []
        rows: list[Row] = []
        layout: list[list[int]] = []
        for i, sample in enumerate(samples):
            context, targets = self._targets(sample)
            start = 0
            for size in self.split(len(context)):
                chunks.append(context[start : start + size])
                owner.append(i)
                start += size
            n_digests = self.n_digests(len(context))
            for marker, tail, frm in targets:
                rows.append(Row(i, list(sample.sink), marker, tail, frm))
                layout.append([*sample.sink, *[pad_id] * (n_digests + 1), *tail])
        ids = torch.full((len(layout), max(map(len, layout))), pad_id, dtype=torch.long)
        for b, row in enumerate(layout):
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        return DigestBatch(chunks, owner, rows, len(samples), ids, [len(r) for r in layout])

    def loss_terms(self, lm: LoadedModel, batch: DigestBatch) -> tuple[torch.Tensor, int]:
        """``(summed loss, count)`` of a batch: summed over target tokens (``token``) or over samples' mean
        losses (``sentence``). Batches of any split add up: ``sum(totals) / sum(counts)`` is the loss of their
        union, which is what makes accumulation over single samples equal one padded batch."""
        former = self.former(lm)
        embed = lm.model.get_input_embeddings()
        dtype = cast(torch.Tensor, embed.weight).dtype
        digests = self.digests(lm, [torch.tensor(c) for c in batch.chunks])
        per_sample: list[list[torch.Tensor]] = [[] for _ in range(batch.n_samples)]
        for d, i in zip(digests, batch.owner, strict=True):
            per_sample[i].append(d)
        parts, labels = [], []
        for row in batch.rows:
            sink = embed(torch.tensor(row.sink, dtype=torch.long, device=lm.device))
            tail = embed(torch.tensor(row.tail, dtype=torch.long, device=lm.device))
            soft = torch.cat([*per_sample[row.sample], former.marker(row.marker, dtype)], dim=0)
            parts.append(torch.cat([sink, soft.to(dtype), tail], dim=0))
            label = torch.full((parts[-1].shape[0],), -100, dtype=torch.long)
            first = len(row.sink) + soft.shape[0] + row.label_from
            label[first:] = torch.tensor(row.tail[row.label_from :], dtype=torch.long)
            labels.append(label)
        width = max(p.shape[0] for p in parts)
        inputs = parts[0].new_zeros(len(parts), width, parts[0].shape[1])
        mask = torch.zeros(len(parts), width, dtype=torch.long, device=lm.device)
        label_ids = torch.full((len(parts), width), -100, dtype=torch.long)
        for b, (p, label) in enumerate(zip(parts, labels, strict=True)):
            inputs[b, : p.shape[0]] = p
            mask[b, : p.shape[0]] = 1
            label_ids[b, : p.shape[0]] = label
        positions = torch.arange(width, device=lm.device).expand(len(parts), width)
        hidden = lm.model.base_model(
            inputs_embeds=inputs, attention_mask=mask, position_ids=positions, use_cache=False
        ).last_hidden_state
        target = label_ids.to(lm.device)[:, 1:]
        keep = target != -100
        if not bool(keep.any()):
            raise ValueError("this batch has no target tokens to train on")
        losses = F.cross_entropy(logits_for(lm, hidden[:, :-1][keep]), target[keep], reduction="none")
        if self.avg_level == "token":
            return losses.sum(), int(keep.sum())
        row_of = torch.arange(len(parts), device=lm.device)[:, None].expand_as(keep)[keep]
        sample_of = torch.tensor([r.sample for r in batch.rows], device=lm.device)[row_of]
        sums = torch.zeros(batch.n_samples, device=lm.device).index_add(0, sample_of, losses)
        counts = torch.zeros(batch.n_samples, device=lm.device).index_add(0, sample_of, torch.ones_like(losses))
        has = counts > 0
        return (sums[has] / counts[has]).sum(), int(has.sum())

    def training_loss(self, lm: LoadedModel, batch: Any) -> torch.Tensor:
        total, count = self.loss_terms(lm, batch)
        return total / count

    def loss_count(self, batch: Any) -> int | None:
        """The ``count`` of :meth:`loss_terms` without a forward: target tokens, or samples with a target."""
        targets = [len(row.tail) - row.label_from for row in batch.rows]
        if self.avg_level == "token":
            return sum(targets)
        return len({row.sample for row, n in zip(batch.rows, targets, strict=True) if n > 0})
