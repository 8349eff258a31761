"""CCM: Compressed Context Memory (Kim et al., ICLR 2024, arXiv:2312.03414).

After each context chunk, ``n_tok`` <COMP> tokens are run through the model with a conditional LoRA
that is active only at their positions; their keys/values become the memory. *concat* keeps every
step's <COMP> keys/values; *merge* keeps their running average, so memory stays ``n_tok`` slots.

Two ways to run the same computation, proven equal by ``tests/methods/test_ccm_equivalence.py``:
``add`` (recurrent inference, one chunk at a time) and ``parallel_forward`` (training: a whole
interaction in one masked forward, see :mod:`ccmem.masks`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ccmem.fileio import atomic_path
from ccmem.loading import LoadedModel
from ccmem.masks import MaskPlan, build_plan, collate_plans
from ccmem.memory import Memory
from ccmem.methods.base import Method, answer_loss, run_decoder, updated_memory
from ccmem.modules import GATE_KWARG, CompEmbeddings, GatedLoRALinear, LoRAGate
from ccmem.patching.attention import PLAN_KWARG, AttentionPlan, use_ccm_attention

#: LoRA targets (attention projections) by model family; anything else uses the LLaMA names.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt_neox": ("query_key_value", "dense"),
}
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def appended(memory: Memory, comp: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer of ``memory`` with the <COMP> keys/values ``comp`` appended (an empty memory: just ``comp``)."""
    if not memory.layers:
        return comp
    return [
        (torch.cat([k, ck], dim=-2), torch.cat([v, cv], dim=-2))
        for (k, v), (ck, cv) in zip(memory.layers, comp, strict=True)
    ]


def _parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module holding submodule ``path`` of ``root``, and the attribute name it is held under."""
    head, _, leaf = path.rpartition(".")
    return (root.get_submodule(head) if head else root), leaf


class AdapterMismatchError(ValueError):
    """An adapter file made for another model or method."""


@dataclass
class Sample:
    """One interaction for parallel training: ``[sink][c1]...[ck][tail]`` as token ids.

    ``tail[answer_start:]`` are the tokens trained on (the answer); everything before them (sink,
    context, <COMP>, the question) is read but never a label.
    """

    chunks: list[list[int]]
    tail: list[int]
    sink: list[int] = field(default_factory=list)
    answer_start: int = 0


@dataclass
class ParallelBatch:
    """Model inputs for one masked forward over a batch of interactions."""

    input_ids: torch.Tensor  # [B, L]; <COMP> positions hold a placeholder id
    labels: torch.Tensor  # [B, L]; the token at each answer position, -100 elsewhere
    comp: torch.Tensor  # [B, L] bool
    slots: torch.Tensor  # [B, L] slot index at <COMP> positions, 0 elsewhere
    plan: MaskPlan
    lengths: list[int]
    tail_start: list[int]


@dataclass
class CCM(Method):
    """Compressed Context Memory with <COMP> tokens and a conditional LoRA."""

    name: ClassVar[str] = "ccm"
    needs_adapter: ClassVar[bool] = True
    update: ClassVar[str] = "concat"

    n_tok: int = 4
    recurrent: bool = True
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.n_tok < 1:
            raise ValueError(
                f"n_tok must be at least 1 (got {self.n_tok}): it is the number of <COMP> tokens per chunk"
            )
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be at least 1 (got {self.lora_rank})")
        self.gate = LoRAGate()
        self.comp_embeddings: CompEmbeddings | None = None
        self.loras: dict[str, GatedLoRALinear] = {}
        self.adapter_hash = "untrained"

    # ------------------------------------------------------------------ set-up

    def config_meta(self) -> dict[str, str]:
        return {"n_tok": str(self.n_tok), "recurrent": str(self.recurrent), "adapter": self.adapter_hash}

    def prepare(self, lm: LoadedModel) -> None:
        """Wrap the attention projections in gated LoRA, add <COMP> embeddings, switch to CCM attention."""
        if self.comp_embeddings is not None:
            return
        model = lm.model
        if any(isinstance(m, GatedLoRALinear) for m in model.modules()):
            raise RuntimeError("this model already carries a compression adapter; load a fresh model per method")
        model_type = model.config.get_text_config().model_type
        targets = self.lora_targets or LORA_TARGETS.get(model_type, DEFAULT_LORA_TARGETS)
        for path, module in list(model.base_model.named_modules()):
            parent, leaf = _parent(model.base_model, path)
            if leaf in targets and isinstance(module, nn.Linear):
                wrapped = GatedLoRALinear(module, self.gate, self.lora_rank, self.lora_alpha, self.lora_dropout)
                wrapped.to(device=module.weight.device)
                setattr(parent, leaf, wrapped)
                self.loras[path] = wrapped
        if not self.loras:
            raise ValueError(
                f"found no attention projection named {list(targets)} in this {model_type} model; "
                "pass lora_targets with the names of its attention linear layers"
            )
        embed = cast(torch.Tensor, model.get_input_embeddings().weight)
        self.comp_embeddings = CompEmbeddings(self.n_tok, embed.shape[1], init_from=embed.detach()).to(embed.device)
        self._hook = self.gate.install(model.base_model)
        self._attn = model.config._attn_implementation
        use_ccm_attention(model)

    def release(self, lm: LoadedModel) -> None:
        """Undo :meth:`prepare`: put the original projections and attention back (the adapter is dropped)."""
        if self.comp_embeddings is None:
            return
        for path, wrapped in self.loras.items():
            setattr(*_parent(lm.model.base_model, path), wrapped.base)
        self._hook.remove()
        lm.model.set_attn_implementation(self._attn)
        self.loras, self.comp_embeddings = {}, None

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.comp_embeddings is None:
            raise RuntimeError("call prepare(model) first")
        params = [self.comp_embeddings.weight]
        for lora in self.loras.values():
            params += [lora.lora_A, lora.lora_B]
        return params

    # ------------------------------------------------------------------ adapter files

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors: <COMP> embeddings and every LoRA pair."""
        if self.comp_embeddings is None:
            raise RuntimeError("call prepare(model) first")
        state = {"comp_embeddings": self.comp_embeddings.weight.detach()}
        for path, lora in self.loras.items():
            state[f"lora.{path}.A"] = lora.lora_A.detach()
            state[f"lora.{path}.B"] = lora.lora_B.detach()
        return state

    def adapter_meta(self, lm: LoadedModel) -> dict[str, str]:
        return {
            "format": "ccmem.adapter",
            "model": lm.fingerprint,
            "model_name": lm.name,
            "method": self.name,
            "n_tok": str(self.n_tok),
            "recurrent": str(self.recurrent),
            "lora_rank": str(self.lora_rank),
            "lora_alpha": str(self.lora_alpha),
            "stage1": lm.stage1 or "",
        }

    def save_adapter(self, lm: LoadedModel, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
        """Write the adapter as safetensors with its identity in the metadata (atomically)."""
        path = Path(path)
        meta = self.adapter_meta(lm) | {"extra": json.dumps(extra or {}, sort_keys=True)}
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in self.adapter_state().items()}, str(tmp), metadata=meta)
        return path

    def load_adapter(self, lm: LoadedModel, path: str | os.PathLike[str]) -> None:
        """Load trained weights; refuse a file made for another model, method or <COMP> count."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no adapter file at {path}")
        try:
            state, meta = self._read_adapter(path)
        except SafetensorError as err:
            raise AdapterMismatchError(f"{path} is not a readable safetensors adapter: {err}") from None
        if meta.get("format") != "ccmem.adapter":
            raise AdapterMismatchError(f"{path} is not a ccmem adapter file")
        if self.comp_embeddings is None and self.lora_targets is None:
            # The file says which layers it adapts (e.g. MLP too, trained with method.lora_targets=[...]).
            self.lora_targets = tuple(sorted({k.split(".")[-2] for k in state if k.startswith("lora.")})) or None
        self.prepare(lm)
        wanted = self.adapter_meta(lm)
        for key in ("model", "method", "n_tok", "lora_rank", "lora_alpha"):
            if meta.get(key) != wanted[key]:
                hint = f" (it was trained for {meta.get('model_name')!r})" if key == "model" else ""
                raise AdapterMismatchError(
                    f"adapter {path} has {key}={meta.get(key)!r}{hint} but this run has {key}={wanted[key]!r}; "
                    "use an adapter trained for this model and method, or change the method options to match"
                )
        if meta.get("stage1", "") != wanted["stage1"]:
            raise AdapterMismatchError(
                f"adapter {path} was trained on top of stage-1 LoRA {meta.get('stage1') or 'none'}, but this model has "
                f"{wanted['stage1'] or 'none'} merged in; pass the same stage-1 run (ccmem.load(..., stage1=PATH))"
            )
        expected = set(self.adapter_state())
        if set(state) != expected:
            differing = sorted(expected ^ set(state))[:3]
            raise AdapterMismatchError(
                f"adapter {path} does not fit this model's layers (e.g. {differing} is in one but not the other); "
                "was it trained with other lora_targets?"
            )
        assert self.comp_embeddings is not None
        with torch.no_grad():
            self.comp_embeddings.weight.copy_(state["comp_embeddings"])
            for p, lora in self.loras.items():
                lora.lora_A.copy_(state[f"lora.{p}.A"])
                lora.lora_B.copy_(state[f"lora.{p}.B"])
        self.adapter_hash = hashlib.sha256(path.read_bytes()).hexdigest()[:16]

    @staticmethod
    def _read_adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}

    # ------------------------------------------------------------------ recurrent inference

    def _comp_inputs(self, lm: LoadedModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of ``ids`` followed by the <COMP> tokens, and the <COMP> mask."""
        assert self.comp_embeddings is not None, "call prepare(model) first"
        embeds = lm.model.get_input_embeddings()(ids)
        comp = self.comp_embeddings.weight.to(embeds.dtype)[None].expand(ids.shape[0], -1, -1)
        mask = torch.zeros(ids.shape[0], ids.shape[1] + self.n_tok, dtype=torch.bool, device=ids.device)
        mask[:, ids.shape[1] :] = True
        return torch.cat([embeds, comp], dim=1), mask

    def compress_step(
        self, lm: LoadedModel, memory: Memory, ids: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys/values of the <COMP> tokens after reading chunk ``ids`` with the memory it may see."""
        self.prepare(lm)
        seen = memory if self.recurrent else Memory(layers=memory.select(torch.arange(memory.sink, device=lm.device)))
        cache = seen.to_cache()
        embeds, comp = self._comp_inputs(lm, ids)
        run_decoder(lm, None, cache, memory.next_position, inputs_embeds=embeds, **{GATE_KWARG: comp})
        return [(k[..., -self.n_tok :, :], v[..., -self.n_tok :, :]) for k, v in Memory.layers_of(cache)]

    def add(self, lm: LoadedModel, memory: Memory, ids: torch.Tensor) -> Memory:
        layers = appended(memory, self.compress_step(lm, memory, ids))
        return updated_memory(memory, layers, steps=memory.steps + 1, advance=ids.shape[-1] + self.n_tok)

    # ------------------------------------------------------------------ parallel training

    def make_batch(self, samples: list[Sample], pad_id: int = 0) -> ParallelBatch:
        """Lay out each sample as ``[sink][c1][C]...[ck][C][tail]`` and build the batched attention plan."""
        plans, rows, comps, slots, tail_start = [], [], [], [], []
        for s in samples:
            plan = build_plan(
                [len(c) for c in s.chunks],
                self.n_tok,
                len(s.tail),
                sink_length=len(s.sink),
                update=self.update,
                recurrent=self.recurrent,
            )
            row = list(s.sink)
            for chunk in s.chunks:
                row += list(chunk) + [pad_id] * self.n_tok
            tail_start.append(len(row))
            row += list(s.tail)
            plans.append(plan)
            rows.append(row)
            comps.append(plan.comp)
            slot = torch.zeros(len(row), dtype=torch.long)
            slot[plan.comp] = torch.arange(self.n_tok).repeat(len(s.chunks))
            slots.append(slot)
        lengths = [len(r) for r in rows]
        width = max(lengths)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        comp_mask = torch.zeros(len(rows), width, dtype=torch.bool)
        slot_ids = torch.zeros(len(rows), width, dtype=torch.long)
        for b, (row, sample) in enumerate(zip(rows, samples, strict=True)):
            input_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            answer = tail_start[b] + sample.answer_start
            labels[b, answer : len(row)] = input_ids[b, answer : len(row)]
            comp_mask[b, : len(row)] = comps[b]
            slot_ids[b, : len(row)] = slots[b]
        return ParallelBatch(input_ids, labels, comp_mask, slot_ids, collate_plans(plans), lengths, tail_start)

    def _parallel_inputs(self, lm: LoadedModel, batch: ParallelBatch) -> dict[str, Any]:
        self.prepare(lm)
        assert self.comp_embeddings is not None
        device = lm.device
        ids = batch.input_ids.to(device)
        comp = batch.comp.to(device)
        embeds = lm.model.get_input_embeddings()(ids)
        embeds = self.comp_embeddings.fill(embeds, comp, batch.slots.to(device))
        plan = AttentionPlan.from_mask_plan(batch.plan, embeds.dtype, device)
        return {
            "inputs_embeds": embeds,
            "attention_mask": plan.mask[..., : ids.shape[1]],
            "position_ids": batch.plan.position_ids.to(device),
            "use_cache": False,
            PLAN_KWARG: plan,
            GATE_KWARG: comp,
        }

    def parallel_forward(self, lm: LoadedModel, batch: ParallelBatch, **kwargs: Any) -> Any:
        """One masked forward of the full model over ``batch``: every compression step at once."""
        return lm.model(**self._parallel_inputs(lm, batch), **kwargs)

    def parallel_loss(self, lm: LoadedModel, batch: ParallelBatch) -> torch.Tensor:
        """Mean next-token loss over the answer tokens of one masked forward (logits only at labels)."""
        hidden = lm.model.base_model(**self._parallel_inputs(lm, batch)).last_hidden_state
        return answer_loss(lm, hidden, batch.labels)

    training_loss = parallel_loss

    def recurrent_loss(self, lm: LoadedModel, sample: Sample) -> torch.Tensor:
        """The same loss computed the slow way: compress chunk by chunk (backpropagating through the
        memory), then read the tail with it. The reference that ``parallel_loss`` must equal, and the
        baseline of ``benchmarks/train_throughput.py``."""
        self.prepare(lm)
        memory = self.new_memory(lm)
        if sample.sink:
            memory = self.add_sink(lm, memory, torch.tensor([sample.sink], device=lm.device))
        for chunk in sample.chunks:
            memory = self.add(lm, memory, torch.tensor([chunk], device=lm.device))
        tail = torch.tensor([sample.tail], device=lm.device)
        hidden = run_decoder(lm, tail, memory.to_cache(), memory.next_position).last_hidden_state
        labels = torch.full_like(tail, -100)
        labels[:, sample.answer_start :] = tail[:, sample.answer_start :]
        return answer_loss(lm, hidden, labels)


@dataclass
class CCMConcat(CCM):
    """CCM-concat: memory grows by ``n_tok`` slots per chunk (all <COMP> keys/values are kept)."""

    name: ClassVar[str] = "ccm-concat"
    update: ClassVar[str] = "concat"


@dataclass
class CCMMerge(CCM):
    """CCM-merge: memory is the running average ``(1-1/t)·Mem(t-1) + (1/t)·h(t)``, constant ``n_tok`` slots."""

    name: ClassVar[str] = "ccm-merge"
    update: ClassVar[str] = "merge"

    def add(self, lm: LoadedModel, memory: Memory, ids: torch.Tensor) -> Memory:
        comp = self.compress_step(lm, memory, ids)
        t = memory.steps + 1
        if memory.steps == 0:  # Mem(1) = h(1): the first <COMP> block goes in after the sink as it is
            return updated_memory(memory, appended(memory, comp), steps=t, advance=ids.shape[-1] + self.n_tok)
        s = memory.sink
        layers = []
        for (k, v), (ck, cv) in zip(memory.layers, comp, strict=True):
            mk = k[..., s:, :] * (1 - 1 / t) + ck / t
            mv = v[..., s:, :] * (1 - 1 / t) + cv / t
            layers.append((torch.cat([k[..., :s, :], mk], -2), torch.cat([v[..., :s, :], mv], -2)))
        return updated_memory(memory, layers, steps=t, advance=ids.shape[-1] + self.n_tok)
