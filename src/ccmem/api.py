"""The public entry points: :func:`load` a model with a method, then ``add`` context and ``generate``.

>>> lm = ccmem.load("smollm2-135m", method="ccm-concat")
>>> lm.add([{"role": "user", "content": "My dog is called Biscuit."}, {"role": "assistant", "content": "Nice!"}])
>>> lm.generate("What is my dog called?", max_new_tokens=20)
>>> lm.memory.nbytes, lm.memory.num_slots
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch

from ccmem.adapter import Adapter, adapter_path, load_adapter, options_with_adapter, read_adapter
from ccmem.chat import DEFAULT_SYSTEM_PROMPT, ChatFormat, Message, TextStream, check_messages, check_text
from ccmem.generation import Sampling, check_max_new_tokens, decode, decode_batch
from ccmem.loading import DEFAULT_MODEL, AttentionError, LoadedModel, check_dtype, load_model
from ccmem.memory import Memory, MemoryMismatchError, check_intact, check_meta
from ccmem.methods.base import ContextTooLongError, Method, add_rows, logits_for, padding_is_exact, read_batch
from ccmem.quantize import QuantizeError, check_quantize
from ccmem.registry import DEFAULT_METHOD, get_method, method_class
from ccmem.stage1 import change_weights, check_weight_changes, stage1_hash

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (tokens compressed so far, tokens to compress)

SCORE_REDUCTIONS = ("sum", "mean")  # how an option's token log-probabilities become one score


#: What to do when the new tokens alone pass the model's positions, by what reads them (:func:`make_room`).
_TOO_LONG_FIX = {
    "add": "add the text in parts (several add() calls; each part is compressed before the next is read)",
    "generate": "ask for fewer new tokens (max_new_tokens), or add a long text to the memory first (add()) and ask a "
    "short question about it",
    "score": "add a long text to the memory first (add()) and score a short query about it, or shorten the options",
}

#: The new tokens, as the refusals name them.
_NEW_TOKENS = {
    "add": "{n} new tokens at once",
    "generate": "the prompt with room for its answer ({n} tokens)",
    "score": "the query with its longest option ({n} tokens)",
}
#: The second remedy where the memory's slots and the new tokens together pass the positions.
_LESS = {"add": "send less at once", "generate": "ask for fewer new tokens", "score": "score shorter options"}


def make_room(lm: LoadedModel, memory: Memory, n_new: int, reading: str = "add") -> Memory:
    """``memory``, ready to read ``n_new`` more tokens: as it is while they fit below the model's last position;
    past it, re-based (:func:`ccmem.rope.compact_positions`: every slot moved to the position of its index, keys
    re-rotated) so a chat or session goes on however long it runs, as long as the slots it holds and the new
    tokens fit. Refused (:class:`ContextTooLongError`, before any work) where they do not, or where the model's
    keys cannot be moved (no RoPE, or length-dependent RoPE). ``reading`` (``add``, ``generate``, ``score``) says
    what the new tokens are, so the refusal names them and what to do."""
    from ccmem.rope import RopeError, compact_positions, layer_frequencies

    limit = lm.max_positions
    if limit is None or memory.next_position + n_new <= limit:
        return memory
    held = max(memory.slots_per_layer, default=0)
    if n_new > limit - memory.sink:
        fact = (
            f"{_NEW_TOKENS[reading].format(n=n_new)} and the {memory.sink}-token system prompt need "
            f"{n_new + memory.sink} positions, but the model allows {limit}, whatever the memory keeps"
        )
        raise ContextTooLongError(f"{fact}: {_TOO_LONG_FIX[reading]}", positions=limit, fact=fact)
    if held + n_new > limit:
        fact = (
            f"{_NEW_TOKENS[reading].format(n=n_new)} after the {held} slots this memory holds need {held + n_new} "
            f"positions, but the model allows {limit}"
        )
        raise ContextTooLongError(
            f"{fact}; start a new conversation (Python: reset()), {_LESS[reading]}, or use a method that keeps "
            "fewer slots",
            positions=limit,
            fact=fact,
        )
    try:
        freqs = layer_frequencies(lm)
    except RopeError as err:
        fact = (
            f"this interaction would reach position {memory.next_position + n_new}, but the model allows {limit}, "
            f"and its positions cannot be re-based ({err})"
        )
        raise ContextTooLongError(
            f"{fact}; start a new conversation (Python: reset())", positions=limit, fact=fact
        ) from None
    logger.info("positions re-based: %d slots moved from up to %d to 0..%d", held, memory.next_position, held - 1)
    return compact_positions(memory, freqs)


def fold(
    lm: LoadedModel, method: Method, memory: Memory, ids: torch.Tensor, progress: Progress | None = None
) -> Memory:
    """``memory`` with ``ids`` (``[1, n]``) compressed into it, part by part (:meth:`Method.parts`: a chunked
    method's chunks), re-based between parts where needed (:func:`make_room`), so a text longer than the model's
    positions goes in as one call. ``memory`` itself is not changed. Called while attached."""
    done = 0
    for part in method.parts(ids):
        memory = make_room(lm, memory, _positions_for(lm, method, memory, part.shape[1]))
        memory = method.add(lm, memory, part)
        done += part.shape[1]
        if progress is not None:
            progress(done, ids.shape[1])
    return memory


def _positions_for(lm: LoadedModel, method: Method, memory: Memory, n: int) -> int:
    """:meth:`Method.positions_needed` for ``n`` new tokens; refused where the method's own tokens (its <COMP>
    tokens, say) are what passes the model's positions, which adding the text in parts cannot help."""
    needed = method.positions_needed(memory, n)
    limit = lm.max_positions
    fix = method.positions_fix()
    if limit is not None and fix and memory.next_position + needed > limit:
        raise ContextTooLongError(  # positions None: the method's options lift it, not the text's length
            f"{method.name} would hold {memory.next_position + needed} positions after reading these {n} tokens"
            f"{f' (the {memory.sink}-token system prompt included)' if memory.sink else ''}, but the model allows "
            f"{limit}; {fix}"
        )
    if limit is not None and needed > n and memory.sink + n <= limit < memory.sink + needed:
        raise ContextTooLongError(
            f"{method.name} reads {needed - n} tokens of its own with the {n} new ones (its options: e.g. n_tok): "
            f"{memory.sink + needed} positions{f' with the {memory.sink}-token system prompt' if memory.sink else ''}"
            f", but the model allows {limit}; give {method.name} fewer tokens of its own (a smaller n_tok)",
            positions=limit,
        )
    return needed


def fold_rows(lm: LoadedModel, method: Method, memories: list[Memory], ids: list[torch.Tensor]) -> list[Memory]:
    """:func:`fold` for several interactions (each its own memory and ``[1, n_i]`` ids): the same memories as one
    at a time. Rows whose new tokens fit the positions at once are read together (:func:`add_rows`: padded
    forwards where the method can); a row that fits only part by part, re-based between parts, is folded alone.
    Called while attached; nothing is changed in place, so a failure leaves every memory as it was."""
    out: list[Memory | None] = [None] * len(memories)
    batched: list[int] = []
    roomy: list[Memory] = []
    for i, (memory, x) in enumerate(zip(memories, ids, strict=True)):
        try:
            try:
                roomy.append(make_room(lm, memory, _positions_for(lm, method, memory, x.shape[1])))
                batched.append(i)
            except ContextTooLongError:
                if len(method.parts(x)) == 1:
                    raise
                out[i] = fold(lm, method, memory, x)
        except ContextTooLongError as err:
            err.row = i  # which interaction it is, for the caller to name
            raise
    for i, memory in zip(batched, add_rows(method, lm, roomy, [ids[i] for i in batched]), strict=True):
        out[i] = memory
    return [m for m in out if m is not None]


T = TypeVar("T")


def _one_at_a_time(method: Callable[..., T]) -> Callable[..., T]:
    """Calls that read or change a session's memory run one after another on that session: threads sharing one
    session (a web app's handlers) lost turns when two folds read the same memory and the last write won."""

    @functools.wraps(method)
    def serialized(self: CompressedLM, *args: Any, **kwargs: Any) -> T:
        with self._lock:
            return method(self, *args, **kwargs)

    return serialized


class CompressedLM:
    """A language model whose context lives in a compressed memory managed by one method.

    ``add`` folds new context into :attr:`memory`; ``generate``/``stream`` answer from the memory without
    changing it; ``remember`` folds a finished exchange back in. ``history`` keeps the *text* of the
    turns only so the chat template can be applied to increments; the model never reads it again.
    The method is attached to the model only during each call, so several sessions (with different
    methods) can share one loaded model.
    """

    def __init__(
        self,
        lm: LoadedModel,
        method: Method,
        *,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        sink: bool = True,
        adapter: Adapter | None = None,
    ):
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise ValueError(f"system_prompt must be text or None (no system prompt), got {system_prompt!r}")
        if not isinstance(sink, bool):  # sink="no" counted as True
            raise ValueError(f"sink must be True or False (keep the system prompt as an attention sink), got {sink!r}")
        self.lm = lm
        lm.readers.add(self)
        self.method = method
        self.adapter = adapter
        self.format = ChatFormat(lm.tokenizer)
        self.system_prompt = system_prompt
        self.sink = sink
        self._lock = threading.RLock()  # calls on one session take turns (see _one_at_a_time)
        self.reset()

    @property
    def adapter_trained(self) -> bool:
        """False when the method needs trained weights and runs without them (its memory is then meaningless)."""
        return not self.method.needs_adapter or self.method.adapter_hash != "untrained"

    # ------------------------------------------------------------------ memory

    @_one_at_a_time
    def reset(self) -> None:
        """Forget everything but the system prompt."""
        self.history: list[Message] = []
        self.memory = self.method.new_memory(self.lm)
        if self.system_prompt is not None:
            system = [{"role": "system", "content": self.system_prompt}]
            ids = self._delta_ids([], system)
            limit = self.lm.max_positions
            if limit is not None and ids.shape[1] >= limit:  # else every later call failed, blaming its own text
                raise ContextTooLongError(
                    f"the system prompt is {ids.shape[1]} tokens as the chat template renders it, but {self.lm.name} "
                    f"reads at most {limit} positions, the system prompt and a question together: shorten the "
                    "system prompt (or put what it says into the memory with add(), which a compressing method "
                    "reads in parts)",
                    positions=limit,
                )
            if self.sink:
                with torch.no_grad(), self.method.attached(self.lm):
                    self.memory = self.method.add_sink(self.lm, self.memory, ids)
            else:
                self._fold(ids)
            self.history = system

    @_one_at_a_time
    def add(self, context: str | Message | Sequence[Message], *, progress: Progress | None = None) -> Memory:
        """Compress new context: chat messages (formatted with the chat template) or plain text.

        ``progress(done, total)``, if given, is called with the tokens compressed so far after each part of a
        long context (a chunked method's chunks: :meth:`Method.parts`)."""
        if isinstance(context, str):
            if not context.strip():
                raise ValueError("nothing to add: the text is empty")
            return self.add_ids(self._ids(context), progress=progress)
        if not isinstance(context, dict | list | tuple):
            raise ValueError(
                f"add() takes text (a str) or chat messages ({{'role': ..., 'content': ...}} dicts), "
                f"got {type(context).__name__}"
            )
        messages = check_messages(context)  # type: ignore[arg-type]
        if not messages:
            raise ValueError("nothing to add: the message list is empty")
        memory = self.add_ids(self._delta_ids(self.history, messages), progress=progress)
        self.history = self.history + messages  # only once the turns are really in memory
        return memory

    @_one_at_a_time
    def add_ids(self, ids: torch.Tensor | Sequence[int], *, progress: Progress | None = None) -> Memory:
        """Compress context given as token ids (the method decides how to cut it); ``progress`` as for :meth:`add`."""
        if progress is not None and not callable(progress):
            raise ValueError(f"progress must be a function progress(done, total), got {type(progress).__name__}")
        ids = self._check_ids(ids, "context")
        if ids.numel() == 0:
            raise ValueError("nothing to add: no tokens")
        self._fold(ids, progress)
        return self.memory

    def _check_ids(self, ids: torch.Tensor | Sequence[int], what: str) -> torch.Tensor:
        try:
            tensor = torch.as_tensor(ids, device=self.lm.device)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"the {what} must be a sequence of token ids (ints), got {type(ids).__name__}") from None
        if tensor.numel() and (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool):
            raise ValueError(f"the {what} must be token ids (ints), got {tensor.dtype} values")
        tensor = tensor.long()
        if tensor.dim() == 1:
            tensor = tensor[None]
        if tensor.dim() != 2 or tensor.shape[0] != 1:
            raise ValueError(f"the {what} must be one sequence of token ids, got shape {tuple(tensor.shape)}")
        if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= self.lm.vocab_size):
            bad = int(tensor.max()) if int(tensor.max()) >= self.lm.vocab_size else int(tensor.min())
            raise ValueError(
                f"token id {bad} in the {what} is outside this model's vocabulary (0..{self.lm.vocab_size - 1})"
            )
        return tensor

    def _fold(self, ids: torch.Tensor, progress: Progress | None = None) -> None:
        """Compress ``ids`` into memory, part by part (:meth:`Method.parts`: a chunked method's chunks), re-based
        between parts where needed; the memory changes only if the whole add succeeds."""
        with torch.no_grad(), self.method.attached(self.lm):
            self.memory = fold(self.lm, self.method, self.memory, ids, progress)

    def remember(self, user: str, assistant: str) -> Memory:
        """Fold a finished exchange into memory (what a chat does after each answer)."""
        return self.add([{"role": "user", "content": user}, {"role": "assistant", "content": assistant}])

    @_one_at_a_time
    def restore(self, memory: Memory, history: Sequence[Message]) -> None:
        """Continue an interaction saved elsewhere (a session store): ``memory`` must be this model's and
        method's, ``history`` the transcript (system prompt first, if any) whose turns it holds."""
        if not isinstance(memory, Memory):  # else an AttributeError from inside the check
            raise ValueError(f"memory is a {type(memory).__name__}: give a ccmem.Memory (load one with load_memory)")
        memory.check(self.lm.kv_shape, where="the restored memory")
        check_meta(memory.meta, self.method.memory_meta(self.lm), "the restored memory")
        self._check_state(memory, "the restored memory")
        if isinstance(history, str) or not isinstance(history, Sequence):  # else a TypeError from list()
            raise ValueError(
                f"history is a {type(history).__name__}: give the transcript the memory holds, a list of "
                "{'role': ..., 'content': ...} messages ([] for none)"
            )
        messages = check_messages(list(history))
        if messages and messages[0]["role"] == "system" and memory.sink:
            self._check_sink(memory, messages[0]["content"], "the restored memory")
        check_intact(memory, "the restored memory")
        self.memory = memory
        self.history = messages
        if messages and messages[0]["role"] == "system":
            self.system_prompt = messages[0]["content"]

    def _check_sink(self, memory: Memory, system_prompt: str, where: str) -> None:
        """The sink must be exactly the system prompt's tokens: a hand-edited count would leave part of the prompt
        to be evicted or compressed, or keep context tokens as if they were the prompt."""
        expected = self._delta_ids([], [{"role": "system", "content": system_prompt}]).shape[1]
        if memory.sink != expected:
            raise MemoryMismatchError(
                f"{where} is damaged or hand-edited: its sink holds {memory.sink} slots, but its system prompt is "
                f"{expected} tokens; save the memory again from the session that made it"
            )

    def _check_state(self, memory: Memory, where: str) -> None:
        counts = sorted(set(memory.slots_per_layer))
        if len(counts) > 1:  # representable, but no method reads one: it failed deep inside the attention
            raise MemoryMismatchError(
                f"{where} is damaged or hand-edited: its layers hold different numbers of slots ({counts[0]} to "
                f"{counts[-1]}), and every method reads memories whose layers hold the same number"
            )
        try:
            self.method.check_memory(memory)
        except ValueError as err:
            raise MemoryMismatchError(f"{where} is damaged or hand-edited: {err}") from None
        ids = memory.state.get("context_ids")  # gist, icformer: read again at the next add (an IndexError in torch)
        if ids is not None and ids.numel() and int(ids.max()) >= self.lm.vocab_size:
            raise MemoryMismatchError(
                f"{where} is damaged or hand-edited: its context (state context_ids) holds token id {int(ids.max())}, "
                f"outside this model's vocabulary (0..{self.lm.vocab_size - 1})"
            )

    @_one_at_a_time  # not halfway through another thread's reset() or add()
    def fork(self) -> CompressedLM:
        """A session with the same model, method and (immutable) memory whose later changes are its own."""
        twin = copy.copy(self)
        twin.lm.readers.add(twin)
        twin.history = list(self.history)
        twin._lock = threading.RLock()
        return twin

    @_one_at_a_time
    def save_memory(self, path: str | os.PathLike[str], dtype: str | None = None) -> Path:
        """Write the memory (safetensors, atomic) with the identity of this model and method.

        ``dtype``: storage precision of keys/values, ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"int8"``
        (per-channel scales; :mod:`ccmem.precision`); default: the model's dtype. :meth:`load_memory` reads any.
        """
        memory = self.memory.with_layers(self.memory.layers, self.memory.positions)
        memory.meta["model_name"] = self.lm.name  # said when another model loads it (the check is by fingerprint)
        if self.system_prompt is not None and memory.sink:
            # the sink it holds, restored by load_memory; not the session's flag: a memory without a sink loaded
            # into a session with one was stamped with a prompt it does not hold, and refused as damaged next load
            memory.meta["system_prompt"] = self.system_prompt
        if self.system_prompt is None and self.history:
            # the chat template's opening (SmolLM2's default system turn, or a system message the user added) is in
            # the memory already: a loaded copy must not render it again before the next turn (load_memory)
            memory.meta["conversation_started"] = "true"
        return memory.save(path, dtype=dtype)

    @_one_at_a_time
    def load_memory(self, path: str | os.PathLike[str]) -> Memory:
        """Replace the memory by a saved one; refuse one made by another model, method or adapter, or a damaged one.

        The chat history restarts from the memory's own system prompt (it is in the memory's sink).
        """
        memory = Memory.load(
            path, expect=self.method.memory_meta(self.lm), shape=self.lm.kv_shape, device=self.lm.device, verify=False
        )
        self._check_state(memory, f"memory {path}")
        if "system_prompt" in memory.meta:
            self._check_sink(memory, memory.meta["system_prompt"], f"memory {path}")
        check_intact(memory, f"memory {path}")
        self.memory = memory
        self.system_prompt = self.memory.meta.get("system_prompt", self.system_prompt)
        self.history = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        if self.system_prompt is None and self.memory.meta.get("conversation_started") == "true":
            # turns are held, their text is not: an empty exchange stands for them, so the next turn renders as a
            # continuation (without the template's opening, which the memory holds already)
            self.history = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
        return self.memory

    # ------------------------------------------------------------------ generation

    def _ids(self, text: str) -> torch.Tensor:
        check_text(text)
        ids = self.lm.tokenizer.encode(text, add_special_tokens=False)
        return torch.tensor([ids], dtype=torch.long, device=self.lm.device)

    def _delta_ids(
        self, history: list[Message], messages: list[Message], generation_prompt: bool = False
    ) -> torch.Tensor:
        """``[1, n]`` ids of what ``messages`` add after ``history`` (:meth:`ChatFormat.delta_ids`: content is text)."""
        ids = self.format.delta_ids(history, messages, generation_prompt, check=True)
        return torch.tensor([ids], dtype=torch.long, device=self.lm.device)

    def _check_room(self, n_new: int, reading: str) -> None:
        """Make room for ``n_new`` tokens: the memory is re-based where it would pass the model's positions."""
        self.memory = make_room(self.lm, self.memory, n_new, reading)

    def query_ids(self, prompt: str | Sequence[Message]) -> torch.Tensor:
        """Token ids of a question, formatted as a new user turn that asks for an answer."""
        if not isinstance(prompt, str | list | tuple | dict):
            raise ValueError(f"the prompt must be text or chat messages, got {type(prompt).__name__}")
        if isinstance(prompt, str):
            check_text(prompt, "the prompt")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else check_messages(prompt)
        if not messages or not any(m["content"].strip() for m in messages):
            raise ValueError("the prompt is empty: give a question or message with some text")
        return self._delta_ids(self.history, messages, generation_prompt=True)

    @_one_at_a_time
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
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        sampling = Sampling(temperature, top_p, seed)
        query = self._check_ids(query, "query")
        if query.numel() == 0:
            raise ValueError("the query has no tokens")
        self._check_room(query.shape[1] + self.method.decode_positions(max_new_tokens), "generate")
        stops = self.format.stop_ids() if stop_ids is None else stop_ids
        return decode(self.lm, self.method, self.memory, query, max_new_tokens, sampling=sampling, stop_ids=stops)

    @_one_at_a_time
    def score_ids(
        self, query: torch.Tensor | Sequence[int], options: Sequence[Sequence[int]], *, reduce: str = "sum"
    ) -> list[float]:
        """Log-likelihood of each option's tokens after ``query``, read with the memory.

        ``reduce="sum"`` (MetaICL's scoring) adds the tokens' log-probabilities, which favours short options;
        ``reduce="mean"`` divides by the option's token count (length-normalised). All options are read in one
        padded forward (:func:`score_batch`).
        """
        query = self._check_ids(query, "query")[0].tolist()
        if not options or any(len(o) == 0 for o in options):
            raise ValueError("give at least one option, and no empty option")
        targets = [self._check_ids(o, "option")[0].tolist() for o in options]
        self._check_room(len(query) + max(len(t) for t in targets) - 1, "score")
        # the session's memory was checked when it was restored or loaded, or made here: no scan per call
        return score_batch(self.lm, self.method, [(self.memory, query, targets)], reduce=reduce, check=False)[0]

    def score(self, prompt: str | Sequence[Message], options: Sequence[str], *, reduce: str = "sum") -> list[float]:
        """Log-likelihood of each answer option to ``prompt`` given the memory (MetaICL-style scoring).

        ``reduce``: ``"sum"`` over the option's tokens, or ``"mean"`` (length-normalised); see :meth:`score_ids`.
        Where one option's tokens begin another's ("63" and "6305"), every option is scored with the end of the
        answer after it (``ccmem eval``'s rule): a sum over the longer one's extra tokens could never beat the
        shorter one, which then always won.
        """
        if isinstance(options, str | bytes | set | frozenset | dict):  # a set has no order to match scores to
            raise ValueError("give options as a list of non-empty strings, e.g. score(prompt, ['yes', 'no'])")
        options = list(options) if options is not None else []  # a generator or array, read once
        if not options or any(not isinstance(o, str) or not o for o in options):
            raise ValueError("give options as a list of non-empty strings, e.g. score(prompt, ['yes', 'no'])")
        ids = [self.format.answer_ids(o) for o in options]  # as an answer follows the generation prompt
        if one_begins_another(ids):
            ids = [o + self.format.end_of_turn_ids()[:1] for o in ids]
        return self.score_ids(self.query_ids(prompt), ids, reduce=reduce)

    def choose(self, prompt: str | Sequence[Message], options: Sequence[str], *, reduce: str = "sum") -> int:
        """Index of the most likely option (``reduce`` as in :meth:`score`)."""
        scores = self.score(prompt, options, reduce=reduce)
        return max(range(len(scores)), key=scores.__getitem__)

    def stream(
        self,
        prompt: str | Sequence[Message],
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Yield the answer to ``prompt`` as text pieces while it is generated (greedy by default; ``temperature``,
        ``top_p`` and ``seed`` as in :meth:`stream_ids`)."""
        tokens = self.stream_ids(
            self.query_ids(prompt), max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
        )  # made here, so that a wrong argument is said at the call, not at the first piece
        return self._pieces(tokens)

    def _pieces(self, tokens: Iterator[int]) -> Iterator[str]:
        stops = self.format.stop_ids()
        text = TextStream(self.lm.tokenizer)
        for token in tokens:
            if token in stops:
                break
            piece = text.push(token)
            if piece:
                yield piece

    def generate(
        self,
        prompt: str | Sequence[Message],
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> str:
        """The answer to ``prompt`` given the memory (the memory itself is not changed); sampling as in
        :meth:`stream`."""
        pieces = self.stream(prompt, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        return "".join(pieces).strip()


def one_begins_another(options: Sequence[list[int]]) -> bool:
    """Whether one option's tokens begin another's ("63" and "6305"): a sum of log-probabilities over the longer
    one's extra tokens can never beat the shorter one, so such options are scored with the end of the answer."""
    return any(a != b and a == b[: len(a)] for a in options for b in options)


def score_batch(
    lm: LoadedModel,
    method: Method,
    items: Sequence[tuple[Memory, Sequence[int], Sequence[Sequence[int]]]],
    *,
    reduce: str = "sum",
    check: bool = True,
) -> list[list[float]]:
    """:meth:`CompressedLM.score_ids` for several ``(memory, query, options)`` at once: every option of every
    item is a row of one padded forward (each row reads its own memory, as :func:`ccmem.methods.base.read_batch`).

    Each memory is checked against the model first (:meth:`Memory.check`: a scan of every key and value) and its
    method's settings always; ``check=False`` skips the scan, for memories this method just made for this model."""
    if reduce not in SCORE_REDUCTIONS:
        raise ValueError(f"reduce must be one of {SCORE_REDUCTIONS}, got {reduce!r}")
    if not items:
        raise ValueError("nothing to score: give at least one (memory, query, options) item")
    expect = method.memory_meta(lm)
    for i, (memory, query, options) in enumerate(items):
        where = f"item {i}'s memory" if len(items) > 1 else "the memory"
        if check:
            memory.check(lm.kv_shape, where=where)  # as restore and load_memory: another model's or method's memory
        check_meta(memory.meta, expect, where)  # would be read without a word, its scores meaningless
        if not options or any(len(o) == 0 for o in options):
            raise ValueError("give at least one option, and no empty option")
        if len(query) == 0 and not lm.is_encoder_decoder:  # T5's decoder starts from its own start token
            raise ValueError("give a query of at least one token: an option's first token is predicted from it")
    picked = _seq2seq_logprobs(lm, method, items) if lm.is_encoder_decoder else _decoder_logprobs(lm, method, items)
    flat = [float(p.sum() if reduce == "sum" else p.mean()) for p in picked]
    out, at = [], 0
    for _, _, options in items:
        out.append(flat[at : at + len(options)])
        at += len(options)
    return out


def _decoder_logprobs(
    lm: LoadedModel, method: Method, items: Sequence[tuple[Memory, Sequence[int], Sequence[Sequence[int]]]]
) -> list[torch.Tensor]:
    """Each option's token log-probabilities, every option of every item a row of one padded forward."""
    memories, rows, targets = [], [], []
    for i, (memory, query, options) in enumerate(items):
        try:
            memory = make_room(lm, memory, len(query) + max(len(o) for o in options) - 1, "score")  # as score_ids
        except ContextTooLongError as err:
            err.row = i
            raise
        for option in options:
            row = [*query, *option[:-1]]
            memories.append(memory)
            rows.append(torch.tensor([row], dtype=torch.long, device=lm.device))
            targets.append(torch.tensor(option, dtype=torch.long, device=lm.device))
    slots = [max(m.slots_per_layer, default=0) for m in memories]
    with torch.no_grad(), method.attached(lm, reading=True):
        if padding_is_exact(lm, slots, [r.shape[1] for r in rows]):
            reads = [read_batch(lm, memories, rows).hidden]
        else:  # a sliding window shorter than the padded rows: each row alone
            reads = [read_batch(lm, [m], [r]).hidden for m, r in zip(memories, rows, strict=True)]
        states = [h for read in reads for h in read]
        # logits only where an option's tokens are predicted: the last len(option) positions of each row
        hidden = torch.cat([states[r][-len(t) :] for r, t in enumerate(targets)])
        logprobs = torch.log_softmax(logits_for(lm, hidden), dim=-1)
    return list(logprobs.gather(1, torch.cat(targets)[:, None])[:, 0].split([len(t) for t in targets]))


def _seq2seq_logprobs(
    lm: LoadedModel, method: Method, items: Sequence[tuple[Memory, Sequence[int], Sequence[Sequence[int]]]]
) -> list[torch.Tensor]:
    """Encoder-decoder: each item's query is encoded with its memory once (:meth:`Method.encoder_states`), then
    the decoder, cross-attending to that, reads all the item's options in one padded forward."""
    out: list[torch.Tensor] = []
    for memory, query, options in items:
        with torch.no_grad(), method.attached(lm):
            hidden = method.encoder_states(lm, memory, torch.tensor([list(query)], dtype=torch.long, device=lm.device))
            out += _decoder_option_logprobs(lm, hidden, options)
    return out


def _decoder_option_logprobs(
    lm: LoadedModel, encoder_hidden: torch.Tensor, options: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """Each option's token log-probabilities (``[len(option)]``) written by an encoder-decoder model's decoder
    after its start token, cross-attending to ``encoder_hidden`` (``[1, n, d]``); all options in one padded
    forward (the decoder is causal, so padding after an option does not change it)."""
    from ccmem.patching.seq2seq import teacher_forced

    labels = torch.full((len(options), max(len(o) for o in options)), -100, dtype=torch.long)
    for r, option in enumerate(options):
        labels[r, : len(option)] = torch.tensor(list(option), dtype=torch.long)
    labels = labels.to(encoder_hidden.device)
    out = teacher_forced(lm.model, encoder_hidden.expand(len(options), -1, -1), labels)
    picked = torch.log_softmax(logits_for(lm, out.last_hidden_state), dim=-1).gather(2, labels.clamp(min=0)[..., None])
    return [picked[r, : len(option), 0] for r, option in enumerate(options)]


def generate_batch(
    sessions: Sequence[CompressedLM],
    prompts: Sequence[str | Sequence[Message]],
    max_new_tokens: int | Sequence[int] = 64,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | Sequence[int | None] | None = None,
) -> list[str]:
    """:meth:`CompressedLM.generate` for several sessions at once: the same answers as one at a time, decoded in
    one padded forward per step (:func:`ccmem.generation.decode_batch`). The sessions must share one loaded
    model and one method (same options and adapter); ``max_new_tokens`` and ``seed`` may be given per session."""
    _check_batch_args(sessions, prompts, "prompt")
    if not sessions or len(prompts) != len(sessions):
        raise ValueError(f"give one prompt per session ({len(sessions)} sessions, {len(prompts)} prompts)")
    _check_shared(sessions, "batched generation")
    first = sessions[0]
    limits, seeds = (_each(value, len(sessions)) for value in (max_new_tokens, seed))
    if len(limits) != len(sessions) or len(seeds) != len(sessions):
        raise ValueError("give max_new_tokens and seed once, or once per session")
    limits = [check_max_new_tokens(k) for k in limits]
    sampling = [Sampling(temperature, top_p, one) for one in seeds]
    with _holding(sessions):  # as generate: a concurrent add to one of them is not lost to make_room's write
        queries = [s.query_ids(p) for s, p in zip(sessions, prompts, strict=True)]
        for s, query, limit in zip(sessions, queries, limits, strict=True):
            s._check_room(query.shape[1] + s.method.decode_positions(limit), "generate")
        memories = [s.memory for s in sessions]
    stops = first.format.stop_ids()
    answers: list[list[int]] = [[] for _ in sessions]
    for step in decode_batch(first.lm, first.method, memories, queries, limits, sampling=sampling, stop_ids=stops):
        for answer, token in zip(answers, step, strict=True):
            if token is not None and token not in stops:
                answer.append(token)
    # as stream(): an incomplete multi-byte character at the end is not shown
    return [str(first.lm.tokenizer.decode(a, skip_special_tokens=True)).rstrip("\ufffd").strip() for a in answers]


def add_batch(sessions: Sequence[CompressedLM], contexts: Sequence[Sequence[Message]]) -> list[Memory]:
    """:meth:`CompressedLM.add` of chat messages for several sessions at once: the same memories as one at a
    time, read in padded forwards where the method can (:attr:`~ccmem.methods.base.Method.batchable`).

    Each session's memory and history change only if every session's context goes in; a context longer than the
    model's positions goes in part by part, re-based between parts, as :meth:`CompressedLM.add` does.
    """
    _check_batch_args(sessions, contexts, "message list")
    if not sessions or len(contexts) != len(sessions):
        raise ValueError(f"give one message list per session ({len(sessions)} sessions, {len(contexts)} lists)")
    for i, context in enumerate(contexts):
        if isinstance(context, str | dict):
            raise ValueError(
                f"context {i} is {type(context).__name__}; add_batch takes one list of chat messages per session, "
                "e.g. [[{'role': 'user', 'content': '...'}], ...]"
            )
    _check_shared(sessions, "batched compression")
    first = sessions[0]
    messages = [check_messages(list(c)) for c in contexts]
    if any(not m for m in messages):
        raise ValueError("nothing to add: a message list is empty")
    if len({id(s) for s in sessions}) < len(sessions):
        raise ValueError("a session is given twice; add its messages in one list")
    with _holding(sessions):  # as add: each session's memory is read and replaced with no other call between
        ids = [s._delta_ids(s.history, m) for s, m in zip(sessions, messages, strict=True)]
        with torch.no_grad(), first.method.attached(first.lm):
            memories = fold_rows(first.lm, first.method, [s.memory for s in sessions], ids)
        for s, m, memory in zip(sessions, messages, memories, strict=True):
            s.memory = memory
            s.history = s.history + m
    return memories


def _check_batch_args(sessions: Any, items: Any, what: str) -> None:
    """Refuse a batch call given one session, or one text where a list of them is due (a string is a sequence:
    each character would have been answered as a prompt of its own)."""
    if isinstance(sessions, CompressedLM) or not isinstance(sessions, Sequence):
        raise ValueError(f"give the sessions as a list (one {what} each), e.g. [session_a, session_b]")
    if isinstance(items, str | bytes | dict) or not isinstance(items, Sequence):
        raise ValueError(f"give a list with one {what} per session, e.g. ['first', 'second']")


def _each(value: Any, n: int) -> list[Any]:
    """A batch argument as one value per session: a list as it is, one value (a text too) ``n`` times."""
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str | bytes) else [value] * n


@contextmanager
def _holding(sessions: Sequence[CompressedLM]) -> Iterator[None]:
    """Hold every session's lock (each once, in one global order, so two batches over the same sessions never
    wait on each other crosswise), as the session's own calls hold it (:func:`_one_at_a_time`)."""
    with ExitStack() as stack:
        for s in sorted({id(s): s for s in sessions}.values(), key=id):
            stack.enter_context(s._lock)
        yield


def _check_shared(sessions: Sequence[CompressedLM], what: str) -> None:
    """Refuse sessions that do not share one loaded model and one method (options and adapter included)."""
    for i, s in enumerate(sessions):
        if not isinstance(s, CompressedLM):
            raise ValueError(f"session {i} is a {type(s).__name__}, not a session: give what ccmem.load() returns")
    first = sessions[0]
    meaning = first.method.memory_meta(first.lm)
    for i, s in enumerate(sessions):
        if s.lm is not first.lm:
            raise ValueError(
                f"session {i} has its own copy of the model; {what} needs sessions of one loaded "
                "model (load(model=first.lm, ...) shares it)"
            )
        if s.method.memory_meta(s.lm) != meaning:
            raise ValueError(
                f"session {i} uses method {s.method.name!r} with other options or adapter than session 0 "
                f"({first.method.name!r}); {what} needs one method for all sessions"
            )
        # options that only change how it runs are not in the memory's meaning, but the batch runs every row with
        # session 0's method: a ccm-reason row with its own threshold was decoded with session 0's
        differ = sorted(k for k, v in s.method.options().items() if first.method.options().get(k) != v)
        if differ:
            raise ValueError(
                f"session {i} runs {s.method.name} with {differ[0]}={getattr(s.method, differ[0])!r}, session 0 with "
                f"{differ[0]}={getattr(first.method, differ[0])!r}; {what} runs every session with one method and "
                "its options: batch sessions of the same options, or call each one alone"
            )


def check_attention(lm: LoadedModel, method: Method) -> None:
    """Refuse, before any work, a method that cannot run on the model's attention implementation.

    Methods that mask or read attention switch the model to ccmem's own sdpa/eager variant while attached
    (:func:`ccmem.patching.attention.compression_attention`), which refuses other kernels such as
    flash_attention_2. Attaching once here turns that into an error at load time instead of at the first
    compression (or the first request of a server). Models on sdpa or eager need no check.
    """
    current = lm.model.config._attn_implementation or "sdpa"
    if current in ("sdpa", "eager"):
        return
    try:
        with method.attached(lm):
            pass
    except ValueError as err:
        raise AttentionError(
            f"method {method.name!r} cannot run on {current} attention: {err}; methods that only read, such as "
            "full and none, can"
        ) from None


def _check_loaded_as_asked(lm: LoadedModel, dtype: Any, attn_implementation: str, quantize: str | None) -> None:
    """Refuse a ``dtype``, ``attn_implementation`` or ``quantize`` the already loaded ``lm`` does not have: they
    apply when :func:`load` loads a model, and were silently ignored for a loaded one (a float32 session asked for
    bfloat16). Quantizing a shared model in place would change the sessions already reading it."""
    if quantize is not None and lm.quantized != quantize:
        raise QuantizeError(
            f"quantize={quantize!r}, but {lm.name} is loaded already with {lm.quantized or 'its float32'} weights; "
            "quantize applies when ccmem.load loads a model: pass its name or folder, or quantize it yourself "
            "(ccmem.quantize.quantize_weights) before any session reads it"
        )
    asked = check_dtype(dtype)
    if asked is not None and asked != lm.model.dtype:
        raise ValueError(
            f"dtype={dtype!r}, but {lm.name} is loaded already, in {lm.model.dtype}; dtype applies when ccmem.load "
            "loads a model: pass its name or folder, or drop dtype to share this one"
        )
    current = lm.model.config._attn_implementation or "sdpa"
    if attn_implementation != "sdpa" and attn_implementation != current:  # "sdpa", the default, may be unasked
        raise ValueError(
            f"attn_implementation={attn_implementation!r}, but {lm.name} is loaded already, with {current}; it "
            "applies when ccmem.load loads a model: pass its name or folder, or drop it to share this one"
        )


def load(
    model: str | LoadedModel = DEFAULT_MODEL,
    method: str = DEFAULT_METHOD,
    *,
    adapter: str | os.PathLike[str] | None = None,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    sink: bool = True,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype | None = None,
    stage1: str | os.PathLike[str] | None = None,
    quantize: str | None = None,
    **method_options: Any,
) -> CompressedLM:
    """Load ``model`` with context method ``method`` and return a :class:`CompressedLM`.

    ``adapter``: path of a trained adapter; ``None`` uses the one ccmem ships for this model and method when
    the method needs one (otherwise it runs untrained, and says so). The adapter's options (``n_tok``,
    ``recurrent``, ...) fill in those not given; a given option that conflicts with the adapter is refused.
    ``stage1``: a stage-1 LoRA run (``ccmem train persona-full``) merged into the weights first; adapters
    trained on top of one require it.
    ``method_options`` are the method's options, e.g. ``n_tok=4, recurrent=False`` (``ccmem methods`` lists them).
    ``attn_implementation``: sdpa (default), eager or flash_attention_2 (a CUDA GPU with flash_attn; only for
    methods that read plainly, such as full and none). ``dtype``: float32 by default (flash_attention_2: bfloat16).
    ``quantize="float16"``: linear layers with float16 weights multiplied in float32, for decoding on a CPU (half
    the bytes read per token: :mod:`ccmem.quantize`); a ``stage1`` LoRA is merged into the float weights first.
    A loaded model (``model=lm.lm``) can be shared by several sessions with different methods; ``dtype``,
    ``attn_implementation`` and ``quantize`` are then those it was loaded with (another is refused).
    """
    if isinstance(model, CompressedLM):
        raise ValueError(
            "ccmem.load() takes a model, not a session: pass the session's model, ccmem.load(session.lm, ...), to "
            "share its weights (or session.fork() for a branch of the same conversation)"
        )
    cls = method_class(method)
    get_method(method, **method_options)  # refuse a bad option before spending time on the model
    if adapter is not None and not str(adapter).strip():
        raise ValueError("adapter= is empty: pass an adapter file, or None for the shipped one")
    if adapter is not None and not cls.trainable:
        raise ValueError(f"method {method!r} takes no adapter; drop adapter= or pick a trainable method")
    quantize = check_quantize(quantize)
    if isinstance(model, LoadedModel):
        _check_loaded_as_asked(model, dtype, attn_implementation, quantize)
        check_weight_changes(stage1, None, model.name)
    else:
        check_weight_changes(stage1, quantize, str(model), attn_implementation, check_dtype(dtype))
    lm = (
        model
        if isinstance(model, LoadedModel)
        else load_model(model, dtype=dtype, attn_implementation=attn_implementation)
    )
    path = adapter_path(lm.name, method, adapter)
    found = read_adapter(path) if path is not None else None
    if found is not None:
        compression = get_method(method, **options_with_adapter(method, found, method_options))
        # checked before the stage-1 LoRA goes into the weights: a refused adapter left a shared model merged
        load_adapter(compression, lm, found, merging=stage1_hash(stage1) if stage1 is not None else None)
    else:
        compression = get_method(method, **method_options)
    compression.check_model(lm)  # a decoder-only method on an encoder-decoder model, before any work
    check_attention(lm, compression)
    change_weights(lm, stage1, quantize)
    if found is None and cls.needs_adapter:  # said once the model is known to be one the method runs on
        logger.warning(
            "no trained adapter for %s with %s: it runs untrained, answers will not use the context", lm.name, method
        )
    return CompressedLM(lm, compression, system_prompt=system_prompt, sink=sink, adapter=found)
