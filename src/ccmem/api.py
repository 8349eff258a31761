"""The public entry points: :func:`load` a model with a method, then ``add`` context and ``generate``.

>>> lm = ccmem.load("smollm2-135m", method="ccm-concat")
>>> lm.add([{"role": "user", "content": "My dog is called Biscuit."}, {"role": "assistant", "content": "Nice!"}])
>>> lm.generate("What is my dog called?", max_new_tokens=20)
>>> lm.memory.nbytes, lm.memory.num_slots
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ccmem.chat import DEFAULT_SYSTEM_PROMPT, ChatFormat, Message, check_messages
from ccmem.loading import DEFAULT_MODEL, LoadedModel, load_model
from ccmem.memory import Memory
from ccmem.methods.base import Method, positions
from ccmem.methods.ccm import CCM
from ccmem.registry import get_method
from ccmem.stage1 import merge_stage1

logger = logging.getLogger(__name__)

SCORE_REDUCTIONS = ("sum", "mean")  # how an option's token log-probabilities become one score


class ContextTooLongError(ValueError):
    """The interaction would pass the model's maximum position."""


def shipped_adapter(model_name: str, method: str) -> Path | None:
    """The adapter ccmem ships for ``(model, method)``, if any."""
    candidate = resources.files("ccmem") / "adapters" / model_name / f"{method}.safetensors"
    path = Path(str(candidate))
    return path if path.is_file() else None


class CompressedLM:
    """A language model whose context lives in a compressed memory managed by one method.

    ``add`` folds new context into :attr:`memory`; ``generate``/``stream`` answer from the memory without
    changing it; ``remember`` folds a finished exchange back in. ``history`` keeps the *text* of the
    turns only so the chat template can be applied to increments; the model never reads it again.
    """

    def __init__(
        self,
        lm: LoadedModel,
        method: Method,
        *,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        sink: bool = True,
        max_chunk_tokens: int = 512,
        adapter_trained: bool = False,
    ):
        if max_chunk_tokens < 1:
            raise ValueError(f"max_chunk_tokens must be at least 1, got {max_chunk_tokens}")
        self.lm = lm
        self.method = method
        self.format = ChatFormat(lm.tokenizer)
        self.system_prompt = system_prompt
        self.sink = sink
        self.max_chunk_tokens = max_chunk_tokens
        self.adapter_trained = adapter_trained or not method.needs_adapter
        method.prepare(lm)
        self.reset()

    # ------------------------------------------------------------------ memory

    def reset(self) -> None:
        """Forget everything but the system prompt."""
        self.history: list[Message] = []
        self.memory = self.method.new_memory(self.lm)
        if self.system_prompt is not None:
            system = [{"role": "system", "content": self.system_prompt}]
            ids = self._ids(self.format.delta([], system))
            if self.sink:
                with torch.no_grad():
                    self.memory = self.method.add_sink(self.lm, self.memory, ids)
            else:
                self._fold(ids)
            self.history = system

    def add(self, context: str | Message | Sequence[Message]) -> Memory:
        """Compress new context: chat messages (formatted with the chat template) or plain text."""
        if isinstance(context, str):
            if not context.strip():
                raise ValueError("nothing to add: the text is empty")
            text = context
        else:
            messages = check_messages(context)  # type: ignore[arg-type]
            if not messages:
                raise ValueError("nothing to add: the message list is empty")
            text = self.format.delta(self.history, messages)
            memory = self.add_ids(self._ids(text))
            self.history = self.history + messages  # only once the turns are really in memory
            return memory
        return self.add_ids(self._ids(text))

    def add_ids(self, ids: torch.Tensor | Sequence[int]) -> Memory:
        """Compress context given as token ids; long inputs are split into ``max_chunk_tokens`` chunks."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.lm.device)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.numel() == 0:
            raise ValueError("nothing to add: no tokens")
        self._fold(ids)
        return self.memory

    def _fold(self, ids: torch.Tensor) -> None:
        """Compress ``ids`` chunk by chunk; the memory changes only if every chunk succeeds."""
        step = self.max_chunk_tokens if isinstance(self.method, CCM) else ids.shape[1]
        extra = self.method.n_tok if isinstance(self.method, CCM) else 0
        n_chunks = -(-ids.shape[1] // step)
        if self.method.uses_positions:
            self._check_room(ids.shape[1] + n_chunks * extra)
        memory = self.memory
        with torch.no_grad():
            for start in range(0, ids.shape[1], step):
                memory = self.method.add(self.lm, memory, ids[:, start : start + step])
        self.memory = memory

    def remember(self, user: str, assistant: str) -> Memory:
        """Fold a finished exchange into memory (what a chat does after each answer)."""
        return self.add([{"role": "user", "content": user}, {"role": "assistant", "content": assistant}])

    def save_memory(self, path: str | os.PathLike[str]) -> Path:
        """Write the memory (safetensors, atomic) with the identity of this model and method."""
        return self.memory.save(path)

    def load_memory(self, path: str | os.PathLike[str]) -> Memory:
        """Replace the memory by a saved one; refuse one made by another model, method or adapter."""
        self.memory = Memory.load(path, expect=self.method.memory_meta(self.lm), device=self.lm.device)
        return self.memory

    # ------------------------------------------------------------------ generation

    def _ids(self, text: str) -> torch.Tensor:
        ids = self.lm.tokenizer.encode(text, add_special_tokens=False)
        return torch.tensor([ids], dtype=torch.long, device=self.lm.device)

    def _check_room(self, n_new: int) -> None:
        limit = self.lm.max_positions
        if limit is not None and self.memory.next_position + n_new > limit:
            raise ContextTooLongError(
                f"this interaction would reach position {self.memory.next_position + n_new}, but the model allows "
                f"{limit}; call reset() to start over, or use a method that keeps fewer positions"
            )

    def query_ids(self, prompt: str | Sequence[Message]) -> torch.Tensor:
        """Token ids of a question, formatted as a new user turn that asks for an answer."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else check_messages(prompt)
        if not messages or not any(m["content"].strip() for m in messages):
            raise ValueError("the prompt is empty")
        return self._ids(self.format.delta(self.history, messages, generation_prompt=True))

    def stream_ids(
        self,
        query: torch.Tensor | Sequence[int],
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_ids: set[int] | None = None,
    ) -> Iterator[int]:
        """Yield generated token ids one by one, reading ``query`` with the memory (greedy by default)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        query = torch.as_tensor(query, dtype=torch.long, device=self.lm.device)
        query = query[None] if query.dim() == 1 else query
        if query.numel() == 0:
            raise ValueError("the query has no tokens")
        self._check_room(query.shape[1] + max_new_tokens)
        stops = self.format.stop_ids() if stop_ids is None else stop_ids
        generator = torch.Generator(device=self.lm.device)
        if seed is not None:
            generator.manual_seed(seed)
        cache = self.memory.to_cache()
        position = self.memory.next_position
        inputs = query
        with torch.no_grad():
            for _ in range(max_new_tokens):
                out = self.lm.model(
                    input_ids=inputs,
                    cache=cache,
                    position_ids=positions(position, inputs.shape[1], self.lm.device),
                    use_cache=True,
                    logits_to_keep=1,
                )
                position += inputs.shape[1]
                token = _pick(out.logits[0, -1], temperature, top_p, generator)
                yield token
                if token in stops:
                    return
                inputs = torch.tensor([[token]], device=self.lm.device)

    def score_ids(
        self, query: torch.Tensor | Sequence[int], options: Sequence[Sequence[int]], *, reduce: str = "sum"
    ) -> list[float]:
        """Log-likelihood of each option's tokens after ``query``, read with the memory.

        ``reduce="sum"`` (MetaICL's scoring) adds the tokens' log-probabilities, which favours short options;
        ``reduce="mean"`` divides by the option's token count (length-normalised).
        """
        query = torch.as_tensor(query, dtype=torch.long, device=self.lm.device).reshape(1, -1)
        if not options or any(len(o) == 0 for o in options):
            raise ValueError("give at least one option, and no empty option")
        if reduce not in SCORE_REDUCTIONS:
            raise ValueError(f"reduce must be one of {SCORE_REDUCTIONS}, got {reduce!r}")
        scores = []
        with torch.no_grad():
            for option in options:
                target = torch.as_tensor(option, dtype=torch.long, device=self.lm.device).reshape(1, -1)
                inputs = torch.cat([query, target[:, :-1]], dim=1)
                self._check_room(inputs.shape[1])
                out = self.lm.model(
                    input_ids=inputs,
                    cache=self.memory.to_cache(),
                    position_ids=positions(self.memory.next_position, inputs.shape[1], self.lm.device),
                    logits_to_keep=target.shape[1],  # logits only where the option's tokens are predicted
                )
                logprobs = torch.log_softmax(out.logits[0].float(), dim=-1)
                token_logprobs = logprobs.gather(1, target[0, :, None])
                scores.append(float(token_logprobs.sum() if reduce == "sum" else token_logprobs.mean()))
        return scores

    def score(self, prompt: str | Sequence[Message], options: Sequence[str], *, reduce: str = "sum") -> list[float]:
        """Log-likelihood of each answer option to ``prompt`` given the memory (MetaICL-style scoring).

        ``reduce``: ``"sum"`` over the option's tokens, or ``"mean"`` (length-normalised); see :meth:`score_ids`.
        """
        if not options or any(not o for o in options):
            raise ValueError("give at least one option, and no empty option")
        ids = [self.lm.tokenizer.encode(o, add_special_tokens=False) for o in options]
        return self.score_ids(self.query_ids(prompt), ids, reduce=reduce)

    def choose(self, prompt: str | Sequence[Message], options: Sequence[str], *, reduce: str = "sum") -> int:
        """Index of the most likely option (``reduce`` as in :meth:`score`)."""
        scores = self.score(prompt, options, reduce=reduce)
        return max(range(len(scores)), key=scores.__getitem__)

    def stream(self, prompt: str | Sequence[Message], max_new_tokens: int = 64, **kwargs: Any) -> Iterator[str]:
        """Yield the answer to ``prompt`` as text pieces while it is generated."""
        stops = self.format.stop_ids()
        tokens: list[int] = []
        shown = ""
        for token in self.stream_ids(self.query_ids(prompt), max_new_tokens, **kwargs):
            if token in stops:
                break
            tokens.append(token)
            text = str(self.lm.tokenizer.decode(tokens, skip_special_tokens=True))
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                continue
            if len(text) > len(shown):
                yield text[len(shown) :]
                shown = text

    def generate(self, prompt: str | Sequence[Message], max_new_tokens: int = 64, **kwargs: Any) -> str:
        """The answer to ``prompt`` given the memory (the memory itself is not changed)."""
        return "".join(self.stream(prompt, max_new_tokens, **kwargs)).strip()


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def load(
    model: str | LoadedModel = DEFAULT_MODEL,
    method: str = "ccm-concat",
    *,
    adapter: str | os.PathLike[str] | None = None,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    sink: bool = True,
    max_chunk_tokens: int = 512,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    stage1: str | os.PathLike[str] | None = None,
    **method_options: Any,
) -> CompressedLM:
    """Load ``model`` with compression ``method`` and return a :class:`CompressedLM`.

    ``adapter``: path of a trained compression adapter; ``None`` uses the one ccmem ships for this model
    and method when there is one (otherwise the method runs untrained, and says so).
    ``stage1``: a stage-1 LoRA run (``ccmem train persona-full``) merged into the weights first; adapters
    trained on top of one require it.
    ``method_options`` are the method's hyper-parameters, e.g. ``n_tok=4, recurrent=False``.
    """
    compression = get_method(method, **method_options)
    lm = (
        model
        if isinstance(model, LoadedModel)
        else load_model(model, dtype=dtype, attn_implementation=attn_implementation)
    )
    if stage1 is not None:
        merge_stage1(lm, stage1)
    trained = False
    if isinstance(compression, CCM):
        path = Path(adapter) if adapter is not None else shipped_adapter(lm.name, compression.name)
        if path is not None:
            compression.load_adapter(lm, path)  # prepares the model with the layers the adapter was trained on
            trained = True
        else:
            compression.prepare(lm)
            logger.warning(
                "no trained adapter for %s with %s: <COMP> tokens are untrained, answers will not use the context",
                lm.name,
                compression.name,
            )
    elif adapter is not None:
        raise ValueError(f"method {method!r} takes no adapter; drop adapter= or pick a compression method")
    return CompressedLM(
        lm,
        compression,
        system_prompt=system_prompt,
        sink=sink,
        max_chunk_tokens=max_chunk_tokens,
        adapter_trained=trained,
    )
