"""What ``ccmem serve`` does with a request, independent of HTTP: sessions, prefix reuse, batched decoding.

One loaded model and method serve every request. All model work runs on one worker thread (a method is
attached to the model per call, and two threads attaching at once would mix their hooks); requests wait on
it without blocking the event loop. Generation requests are decoded together, one padded forward per step for
all of them (:class:`ccmem.generation.DecodingBatch`); one that comes while others decode joins them at the next
step (continuous batching), and the worker runs waiting calls and compressions between steps.

How a request's messages meet the memory:

- **With a session** (``session`` in the body): the stored memory holds the conversation so far. The request
  sends only the new messages, or the whole conversation: it is taken as whole when it starts with a system
  message or repeats the session's transcript from its start (at least its first exchange); then it must extend
  the transcript exactly (else 409: a retry of an answered request, or an edited history). The new messages
  before the last (user) one are compressed first, the last one is answered, and the exchange is compressed and
  saved as the session's next version, only once it succeeded.
- **Without a session** (as plain OpenAI clients talk): the whole list is sent each time. The engine keeps the
  memories of recent conversations by the hash of their messages and reuses the longest prefix it holds, so
  only the messages it has not seen are compressed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from ccmem.api import CompressedLM, ContextTooLongError, add_batch, make_room
from ccmem.chat import Message, TextStream
from ccmem.generation import DecodingBatch, Sampling, decode_batch
from ccmem.memory import CompactMemory, Memory
from ccmem.precision import AUTO, PrecisionRangeError, auto_storage, storage_name
from ccmem.serve.sessions import BaseSessionStore, SessionError, SessionRecord, check_identity, settings_of

logger = logging.getLogger(__name__)
T = TypeVar("T")


class RequestError(ValueError):
    """A request that cannot be served as sent (HTTP 400); the message says what to change."""


class ConflictError(SessionError):
    """The messages do not extend what the session holds (HTTP 409)."""


@dataclass
class Limits:
    """Bounds on what one request or the whole server may ask for."""

    max_message_bytes: int = 32_768  # UTF-8 bytes of one user or system message (an assistant one: of the total)
    max_messages: int = 256  # messages in one request
    max_new_tokens: int = 512  # the most a request may ask to generate
    max_input_tokens: int = 4_096  # tokens of new context one request may add (what is compressed or read)
    max_sessions: int = 1_000  # sessions in the store, all owners together
    max_batch: int = 8  # generation requests decoded together
    prefix_cache: int = 64  # memories kept for reuse by requests without a session
    live_sessions: int = 256  # sessions kept decoded in RAM between requests

    def check(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"limit {name} must be a positive whole number, got {value!r}")


@dataclass
class Params:
    """How to answer: sampling and length."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Answer:
    """What :meth:`Engine.chat` produced, filled while it streams: text, why it stopped, what it cost."""

    text: str = ""  # the pieces sent so far: the answer without leading or trailing whitespace once it is complete
    finish_reason: str = "stop"
    prompt_tokens: int = 0  # tokens read this request: new context compressed + the query
    completion_tokens: int = 0
    reused_messages: int = 0  # user/assistant messages whose memory was found (session or prefix cache): not read
    memory_slots: int = 0
    memory_bytes: int = 0
    session: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class AnswerPieces:
    """The text pieces of one answer, as they are generated. :meth:`aclose` (also called when iteration ends)
    releases the session's lock, even if the pieces were never read (a client gone before the answer began)."""

    def __init__(self, pieces: AsyncGenerator[str, None], lock: contextlib.AbstractAsyncContextManager[Any] | None):
        self._pieces = pieces
        self._lock = lock

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            async for piece in self._pieces:
                yield piece
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Stop generating (if still going) and release the session; safe to call more than once."""
        await self._pieces.aclose()
        lock, self._lock = self._lock, None
        if lock is not None:
            await lock.__aexit__(None, None, None)


# ---------------------------------------------------------------- the model worker


class _Call:
    def __init__(self, fn: Callable[[], Any], done: Callable[[Any, BaseException | None], None]):
        self.fn, self.done = fn, done


class _Fold:
    def __init__(
        self, session: CompressedLM, groups: list[list[Message]], done: Callable[[Any, BaseException | None], None]
    ):
        self.session, self.groups, self.done = session, groups, done


class _Generate:
    def __init__(
        self,
        memory: Memory,
        query: torch.Tensor,
        limit: int,
        sampling: Sampling,
        emit: Callable[[Any], None],
        cancelled: threading.Event,
    ):
        self.memory, self.query, self.limit, self.sampling, self.emit = memory, query, limit, sampling, emit
        self.cancelled = cancelled  # set by the reader once it wants no more tokens: the row leaves the batch


#: The most decoding steps a compression waits for others to be read with it while a batch decodes.
FOLD_WAIT_STEPS = 16


class ModelWorker:
    """The one thread that runs the model: calls in arrival order, then the waiting compressions read together,
    then the waiting generations decoded together; generations that come while a batch decodes join it between
    its steps (:meth:`_decode`)."""

    def __init__(self, session: CompressedLM, max_batch: int):
        self.session = session
        self.max_batch = max_batch
        self.stop_ids = session.format.stop_ids()
        self._jobs: queue.Queue[_Call | _Fold | _Generate | None] = queue.Queue()
        self.batches: list[int] = []  # size of each decoded batch (for stats and tests)
        self.fold_batches: list[int] = []  # sessions compressing together
        self.steps = 0  # batched decoding steps run
        self.rows_stepped = 0  # answers decoded in them, summed: rows_stepped / steps is a batch's mean occupancy
        self._waiting: list[_Generate] = []  # answers to decode once the running batch ends
        self._folding: list[_Fold] = []  # compressions held back while a batch decodes
        self._held = 0  # steps the oldest of them has waited
        self._rows: dict[int, _Generate] = {}  # the running batch's answers, by row id
        self._thread = threading.Thread(target=self._run, name="ccmem-model", daemon=True)
        self._thread.start()

    @staticmethod
    def _settler(future: asyncio.Future[Any]) -> Callable[[Any, BaseException | None], None]:
        """A callback for the model thread that settles ``future`` on its own event loop."""
        loop = future.get_loop()

        def done(result: Any, error: BaseException | None) -> None:
            def settle() -> None:
                if future.cancelled():
                    return
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)

            with contextlib.suppress(RuntimeError):  # the request's event loop is gone: nobody is waiting
                loop.call_soon_threadsafe(settle)

        return done

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the model thread; its exception is raised here."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.put(_Call(fn, self._settler(future)))
        return await future

    async def fold(self, session: CompressedLM, groups: list[list[Message]]) -> None:
        """Compress ``groups`` of messages into ``session``, one group after the other; sessions folding at the
        same time are read together (:func:`ccmem.api.add_batch`)."""
        if not groups:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._jobs.put(_Fold(session, groups, self._settler(future)))
        await future

    def generate(
        self,
        memory: Memory,
        query: torch.Tensor,
        limit: int,
        sampling: Sampling,
        cancelled: threading.Event | None = None,
    ) -> asyncio.Queue[Any]:
        """Start decoding; the queue receives token ids, then ``None`` (finished) or an exception. Setting
        ``cancelled`` (the reader is gone, or cut the answer at a stop string) ends the decoding of this answer
        after the current step, so it no longer takes a place in the batch."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[Any] = asyncio.Queue()

        def emit(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the request's event loop is gone: nobody is waiting
                loop.call_soon_threadsafe(out.put_nowait, item)

        self._jobs.put(_Generate(memory, query, limit, sampling, emit, cancelled or threading.Event()))
        return out

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self._serve([job, *self._drain()])
            while self._waiting or self._folding:
                if self._folding:  # compressions held back while a batch decoded
                    folds, self._folding, self._held = self._folding, [], 0
                    self._fold(folds)
                if self._waiting:  # answers that could not join a running batch (full, or not exactly)
                    self._decode()

    def _drain(self) -> list[_Call | _Fold | _Generate]:
        """The jobs queued now, without waiting (a ``None``, the close, is left queued for :meth:`_run`)."""
        jobs: list[_Call | _Fold | _Generate] = []
        with contextlib.suppress(queue.Empty):
            while True:
                more = self._jobs.get_nowait()
                if more is None:
                    self._jobs.put(None)
                    break
                jobs.append(more)
        return jobs

    def _serve(self, jobs: list[_Call | _Fold | _Generate], batch: DecodingBatch | None = None) -> None:
        """Calls in arrival order, then the compressions together; answers join ``batch`` (decoding) where they
        fit, else wait for :meth:`_run`.

        While a batch decodes, compressions are held back until they are at least as many as the answers decoding,
        or for :data:`FOLD_WAIT_STEPS` steps at most: one compression alone costs several decoding steps, and read
        together they cost little more than one (the exchanges of a batch's answers finish at about the same time);
        under light load they still run at the next step."""
        for call in (j for j in jobs if isinstance(j, _Call)):
            try:
                result = call.fn()
            except BaseException as err:  # handed to the awaiting request, which turns it into a response
                call.done(None, err)
            else:
                call.done(result, None)
        self._folding += [j for j in jobs if isinstance(j, _Fold)]
        self._held = self._held + 1 if self._folding and batch is not None else 0
        if self._folding and (batch is None or len(self._folding) >= len(self._rows) or self._held > FOLD_WAIT_STEPS):
            folds, self._folding, self._held = self._folding, [], 0
            self._fold(folds)
        self._waiting += [j for j in jobs if isinstance(j, _Generate)]
        if batch is not None:  # in arrival order, as many as the batch has room for and fit it
            self._waiting = [job for job in self._waiting if not self._join(batch, job)]

    def _fold(self, jobs: list[_Fold]) -> None:
        """Step t compresses the t-th group of every job that has one, up to ``max_batch`` sessions per read."""
        self.fold_batches.append(len(jobs))
        failed: dict[int, BaseException] = {}
        for t in range(max(len(j.groups) for j in jobs)):
            active = [i for i, j in enumerate(jobs) if t < len(j.groups) and i not in failed]
            for start in range(0, len(active), self.max_batch):
                rows = active[start : start + self.max_batch]
                try:
                    add_batch([jobs[i].session for i in rows], [jobs[i].groups[t] for i in rows])
                except BaseException:  # find whose context failed; the others go on
                    for i in rows:
                        try:
                            jobs[i].session.add(jobs[i].groups[t])
                        except BaseException as err:
                            failed[i] = err
        for i, job in enumerate(jobs):
            job.done(None, failed.get(i))

    def _decode(self) -> None:
        """Decode the waiting answers in one batch; between its steps, run the calls and compressions that came
        meanwhile and let waiting answers join it as rows finish (continuous batching), so requests that arrive
        apart still share forwards."""
        lm, method = self.session.lm, self.session.method
        if not method.decode_batchable or lm.is_encoder_decoder:
            jobs, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
            self._decode_apart(jobs)
            return
        batch = DecodingBatch(lm, method, stop_ids=self.stop_ids, stopped=self._stopped)
        self._rows = {}
        self._waiting = [job for job in self._waiting if not self._join(batch, job)]
        if not self._rows:
            return
        self.batches.append(len(self._rows))  # the most rows it decodes at once, kept up to date as rows join
        try:
            while batch.active:
                tokens = batch.step()
                self.steps += 1
                self.rows_stepped += len(tokens)
                for key, token in tokens.items():
                    if token is not None:
                        self._rows[key].emit(token)
                running = set(batch.running)
                for key in [k for k in self._rows if k not in running]:
                    self._rows.pop(key).emit(None)  # finished: its reader need not wait for the others
                self._serve(self._drain(), batch)
                self.batches[-1] = max(self.batches[-1], len(self._rows))
        except BaseException as err:
            for job in self._rows.values():
                job.emit(err)
        finally:
            self._rows = {}

    def _decode_apart(self, jobs: list[_Generate]) -> None:
        """Decode ``jobs`` with a method that cannot share a padded forward (it hooks each step) or an
        encoder-decoder model: :func:`decode_batch` steps them one by one, side by side; none joins meanwhile."""
        for job in (j for j in jobs if j.cancelled.is_set()):  # its reader left before it began
            job.emit(None)
        jobs = [j for j in jobs if not j.cancelled.is_set()]
        if not jobs:
            return
        self.batches.append(len(jobs))
        try:
            steps = decode_batch(
                self.session.lm,
                self.session.method,
                [j.memory for j in jobs],
                [j.query for j in jobs],
                [j.limit for j in jobs],
                sampling=[j.sampling for j in jobs],
                stop_ids=self.stop_ids,
                stopped=lambda row: jobs[row].cancelled.is_set(),
            )
            for tokens in steps:
                for job, token in zip(jobs, tokens, strict=True):
                    if token is not None:
                        job.emit(token)
        except BaseException as err:
            for job in jobs:
                job.emit(err)
            return
        for job in jobs:
            job.emit(None)

    def _stopped(self, key: int) -> bool:
        job = self._rows.get(key)
        return job is None or job.cancelled.is_set()

    def _join(self, batch: DecodingBatch, job: _Generate) -> bool:
        """Add ``job`` to ``batch`` if it has room and the row fits it exactly; False where it must wait. A job whose
        reader already left is finished at once, one whose row is refused gets the error."""
        if job.cancelled.is_set():  # its reader left before it began
            job.emit(None)
            return True
        if len(self._rows) >= self.max_batch:
            return False
        if self._rows and not batch.fits(job.memory, job.query, job.limit):  # alone, a row always fits
            return False
        try:
            key = batch.add(job.memory, job.query, job.limit, job.sampling)
        except BaseException as err:
            job.emit(err)
            return True
        self._rows[key] = job
        return True


# ---------------------------------------------------------------- the engine


def _group_turns(messages: Sequence[Message]) -> list[list[Message]]:
    """Messages in the groups a chat compresses them in: a user message with the assistant reply after it."""
    groups: list[list[Message]] = []
    for message in messages:
        if message["role"] == "assistant" and groups and groups[-1][-1]["role"] == "user":
            groups[-1].append(message)
        else:
            groups.append([message])
    return groups


def _prefix_key(owner: str, system: str | None, messages: Sequence[Message]) -> str:
    text = json.dumps([owner, system, list(messages)], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


class Engine:
    """Answers chat requests for one loaded model and method, keeping memories in a session store (SQLite or Redis)."""

    def __init__(
        self,
        base: CompressedLM,
        store: BaseSessionStore,
        *,
        model_id: str,
        limits: Limits | None = None,
        memory_dtype: str | None = None,
    ):
        self.base = base
        #: ``memory_dtype="auto"``: float16 for a float32 model, bfloat16 for a memory past float16's range.
        self.auto_dtype = isinstance(memory_dtype, str) and memory_dtype.strip().lower() == AUTO
        if self.auto_dtype:
            memory_dtype = auto_storage(base.lm.dtype)
        #: Precision sessions are held at between requests, in RAM and in the store (None: the model's own).
        self.memory_dtype = storage_name(memory_dtype) if memory_dtype is not None else None
        self.store = store
        self.model_id = model_id
        self.limits = limits or Limits()
        self.limits.check()
        self.store.max_sessions = self.limits.max_sessions
        self.identity = base.method.memory_meta(base.lm)
        self.worker = ModelWorker(base, self.limits.max_batch)
        # (created, version) names one saved state of a session, also across a delete and re-create elsewhere
        self._live: OrderedDict[tuple[str, str], tuple[tuple[float, int], Memory | CompactMemory, list[Message]]] = (
            OrderedDict()
        )
        self._prefixes: OrderedDict[str, CompressedLM] = OrderedDict()
        # sessions started from a system prompt, by (owner, prompt); the server's own prompt is everyone's ("")
        self._systems: dict[tuple[str, str | None], CompressedLM] = {("", base.system_prompt): base.fork()}

    def close(self) -> None:
        self.worker.close()

    # ------------------------------------------------------------------ sessions

    def _lock(self, owner: str, name: str) -> contextlib.AbstractAsyncContextManager[Any]:
        """The store's lock of one session: requests for it never interleave (across processes with Redis)."""
        return self.store.lock(name, owner)

    def _system_key(self, owner: str, system: str | None) -> tuple[str, str | None]:
        """Where the sink of ``system`` is kept: the server's own prompt for all, another one per token owner (a
        shared one told a token, by its usage counting no system prompt read, that another token had used it)."""
        return ("", system) if system == self.base.system_prompt else (owner, system)

    async def _start(self, owner: str, system: str | None) -> CompressedLM:
        """A fresh session with ``system`` as its sink (computed once per system prompt and token owner)."""
        key = self._system_key(owner, system)
        if key not in self._systems:

            def build() -> CompressedLM:
                fresh = self.base.fork()
                fresh.system_prompt = system
                fresh.reset()
                return fresh

            built = await self.worker.call(build)
            while len(self._systems) >= max(self.limits.prefix_cache, 2):  # keep the server's own prompt
                self._systems.pop(next(k for k in self._systems if k != ("", self.base.system_prompt)))
            self._systems[key] = built
            return built.fork()
        return self._systems[key].fork()

    async def create_session(self, owner: str, name: str, system: str | None) -> SessionRecord:
        system = system if system is not None else self.base.system_prompt
        self._count_new_system(owner, system)  # a system prompt over the input limit is refused before it is read
        async with self._lock(owner, name):  # a request for the new name waits until its first version is saved
            # a name taken or the session limit reached is refused before the system prompt is read, too
            record = self.store.create(name, self.identity, settings_of(self.base) | {"system_prompt": system}, owner)
            try:
                session = await self._start(owner, system)
                memory = self._held(session.memory)
                return self.store.save(name, memory, session.history, owner, expect_version=record.version)
            except BaseException:  # no half-made session left behind: the client's retry of the name must work
                with contextlib.suppress(SessionError):
                    self.store.delete(name, owner)
                raise

    def _held(self, memory: Memory) -> Memory | CompactMemory:
        """``memory`` as sessions are held between requests (at :attr:`memory_dtype`, if set)."""
        if self.memory_dtype is None:
            return memory
        try:
            return memory.compact(self.memory_dtype)
        except PrecisionRangeError:
            if not self.auto_dtype:
                raise
            return memory.compact("bfloat16")  # float16's range, not its precision, is what this memory lacks

    async def _load(self, owner: str, name: str) -> tuple[SessionRecord, CompressedLM]:
        record = await asyncio.to_thread(self.store.get, name, owner)
        check_identity(record, self.identity, settings_of(self.base))
        live = self._live.get((owner, name))
        if live is not None and live[0] == (record.created, record.version):
            self._live.move_to_end((owner, name))
            held, history = live[1], live[2]
            session = self.base.fork()
            session.restore(held.expanded() if isinstance(held, CompactMemory) else held, history)
            return record, session
        if record.version == 0:  # created, but its first save never happened (a crash): start it afresh
            return record, await self._start(owner, record.settings.get("system_prompt", self.base.system_prompt))

        def read() -> CompressedLM:
            session = self.base.fork()
            self.store.restore(record, session, self.identity)  # version > 0: its memory file must be there
            return session

        return record, await self.worker.call(read)

    def _keep_live(
        self, owner: str, name: str, record: SessionRecord, held: Memory | CompactMemory, history: list[Message]
    ) -> None:
        self._live[(owner, name)] = ((record.created, record.version), held, list(history))
        self._live.move_to_end((owner, name))
        while len(self._live) > self.limits.live_sessions:
            self._live.popitem(last=False)

    async def delete_session(self, owner: str, name: str) -> None:
        """Delete the session once a request working on it has saved: a request still answering would otherwise save
        its exchange into a session of the same name created after the delete."""
        async with self._lock(owner, name):
            self.store.delete(name, owner)
            self._live.pop((owner, name), None)

    # ------------------------------------------------------------------ requests

    @staticmethod
    def _rendered(session: CompressedLM, history: Sequence[Message], messages: Sequence[Message]) -> int:
        """Tokens of ``messages`` as compressing them after ``history`` reads them: the chat template's rendering
        of each group a chat compresses at once (:func:`_group_turns`)."""
        held, count = list(history), 0
        for group in _group_turns(messages):
            count += len(session.format.delta_ids(held, group))
            held += group
        return count

    def _count(self, session: CompressedLM, messages: Sequence[Message]) -> int:
        return sum(len(session.lm.tokenizer.encode(m["content"], add_special_tokens=False)) for m in messages)

    def _count_new_system(self, owner: str, system: str | None) -> int:
        """Tokens of ``system`` if no memory of it is held yet for ``owner`` (it will be read), else 0; refused over
        the limit."""
        if system is None or self._system_key(owner, system) in self._systems:
            return 0
        n = len(self.base.lm.tokenizer.encode(system, add_special_tokens=False))
        if n > self.limits.max_input_tokens:  # one message, read at once: it cannot be sent in parts
            raise RequestError(
                f"the system prompt is {n} tokens, more than the {self.limits.max_input_tokens} this server reads "
                "per request, and it is read in one piece: shorten it (or start the server with a larger "
                "--max-input-tokens)"
            )
        return n

    def _check_input(self, n: int) -> None:
        if n > self.limits.max_input_tokens:
            raise RequestError(
                f"this request adds {n} tokens of context, more than the {self.limits.max_input_tokens} this "
                "server reads per request: send the conversation in several requests"
            )

    def _split(self, messages: Sequence[Message]) -> tuple[list[Message], Message]:
        if not messages or messages[-1]["role"] != "user":
            raise RequestError("the last message must be the user's (the one to answer)")
        if not messages[-1]["content"].strip():  # refused before the messages ahead of it are compressed
            raise RequestError(
                "the last message (the user's, to answer) is empty: give a question or message with text"
            )
        return list(messages[:-1]), messages[-1]

    @staticmethod
    def new_messages(transcript: Sequence[Message], messages: Sequence[Message]) -> list[Message]:
        """The part of a session request's ``messages`` the session does not hold yet (the rule in the module doc)."""
        held = list(transcript)
        body = [m for m in held if m["role"] != "system"]
        if messages[0]["role"] == "system":
            if len(messages) < len(held) and list(messages) == held[: len(messages)]:
                raise ConflictError(
                    f"these {len(messages)} messages are the start of the {len(held)} the session holds already "
                    "(a retry of an answered request?); send the conversation with a new user message at the end"
                )
            if list(messages[: len(held)]) != held:
                raise ConflictError(
                    "these messages do not extend the session's conversation (they start with a system message, "
                    "so they are taken as the whole conversation, but differ from what the session holds at "
                    f"message {_first_difference(held, messages)}); send only the new messages, or start a new session"
                )
            return list(messages[len(held) :])
        same = 0  # how many messages from the start repeat the transcript's (system prompt aside)
        while same < min(len(body), len(messages)) and messages[same] == body[same]:
            same += 1
        if body and same == len(body):
            return list(messages[len(body) :])
        edited_reply = same == 1 and len(messages) > 1 and messages[1]["role"] == "assistant"
        if edited_reply:  # the first message and a reply other than the session's: a regenerated or edited history
            raise ConflictError(
                "these messages start as the session's conversation but its first reply differs (an edited or "
                "regenerated answer?); send only the new messages, or start a new session"
            )
        if same >= 2:  # the first exchange repeated: the whole conversation, but not one that extends the session
            if same == len(messages):
                raise ConflictError(
                    f"these {len(messages)} messages are the start of the conversation the session holds already (a "
                    "retry of an answered request?); send the conversation with a new user message at the end"
                )
            raise ConflictError(
                "these messages repeat the session's conversation from its start but differ from it at message "
                f"{same}; send only the new messages, or start a new session"
            )
        return list(messages)

    async def chat(
        self, owner: str, messages: Sequence[Message], params: Params, session: str | None = None
    ) -> tuple[Answer, AnswerPieces]:
        """Prepare an answer (errors in the request are raised here) and return it with its text pieces.

        The session is saved once the pieces have all been produced; a failure before that leaves it unchanged.
        The caller must read the pieces to the end or ``aclose()`` them: the session stays locked until then.
        """
        if params.max_new_tokens > self.limits.max_new_tokens:
            raise RequestError(
                f"max_tokens is {params.max_new_tokens}, this server allows at most {self.limits.max_new_tokens}"
            )
        if any(m["role"] == "system" for m in messages[1:]):  # the same mistake with a session or without
            raise RequestError("a system message may only come first")
        answer = Answer(session=session)
        read_system = 0
        lock = self._lock(owner, session) if session is not None else None
        if lock is not None:
            await lock.__aenter__()
        try:
            if session is not None:
                record, state = await self._load(owner, session)
                new = self.new_messages(record.transcript, messages)
                if not new:
                    raise RequestError("the session holds all of these messages already; send a new user message")
                if any(m["role"] == "system" for m in new):
                    raise ConflictError("a session's system prompt is set when it is created; start a new session")
                # the system message is not counted, sent or not (as without a session): the count is the same
                # for the same conversation however the client sends it
                held = messages[: len(messages) - len(new)]
                answer.reused_messages = sum(1 for m in held if m["role"] != "system")
                fold, query = self._split(new)
            else:
                record = None
                system = messages[0]["content"] if messages[0]["role"] == "system" else self.base.system_prompt
                body = list(messages[1:] if messages[0]["role"] == "system" else messages)
                before, query = self._split(body)
                # a system prompt not read before is read by this request: it counts, and is refused before
                # any work when it alone is over the limit
                answer.prompt_tokens = self._count_new_system(owner, system)
                if answer.prompt_tokens:  # reported as read: the system turn as the template renders it
                    read_system = self._rendered(self.base, [], [{"role": "system", "content": str(system)}])
                state, reused = await self._from_prefix(owner, system, before)
                fold = before[reused:]
                answer.reused_messages = reused
            answer.prompt_tokens += self._count(state, [*fold, query])
            self._check_input(answer.prompt_tokens)
            read_fold = self._rendered(state, state.history, fold)
            await self.worker.fold(state, _group_turns(fold))
            if session is None:
                self._remember_prefix(owner, system, before, state)
            query_ids = await self.worker.call(lambda: self._query(state, query, params, kept=session is not None))
            # usage counts every token this request read, chat template included (the limit above is checked
            # on the messages' own tokens, before any work)
            answer.prompt_tokens = read_system + read_fold + int(query_ids.shape[1])
        except BaseException:
            if lock is not None:
                await lock.__aexit__(None, None, None)
            raise
        return answer, AnswerPieces(self._pieces(owner, session, record, state, query, query_ids, params, answer), lock)

    def _query(self, state: CompressedLM, query: Message, params: Params, *, kept: bool = False) -> torch.Tensor:
        ids = state.query_ids([query])
        state.memory = make_room(
            state.lm, state.memory, ids.shape[1] + state.method.decode_positions(params.max_new_tokens), "generate"
        )
        if kept:
            self._check_room_to_keep(state, query, params.max_new_tokens)
        return ids

    @staticmethod
    def _check_room_to_keep(state: CompressedLM, query: Message, max_new_tokens: int) -> None:
        """A session compresses each exchange after its answer: refused before the answer is generated where the
        exchange, with an answer of ``max_new_tokens`` tokens, would not fit the model's positions beside the memory
        (the answer was generated, then lost to a 400)."""
        limit = state.lm.max_positions
        if limit is None:
            return
        n = len(state.format.delta_ids(state.history, [query, {"role": "assistant", "content": ""}])) + max_new_tokens
        first = state.method.parts(torch.zeros((1, n), dtype=torch.long))[0].shape[1]
        held = max(state.memory.slots_per_layer, default=0)
        need = held + state.method.positions_needed(state.memory, first)
        if need > limit:
            raise ContextTooLongError(
                f"keeping this exchange in the session (its message and an answer of up to {max_new_tokens} tokens, "
                f"compressed after the answer) needs {need} positions with the {held} slots its memory holds, but the "
                f"model allows {limit}; start a new session, or ask for fewer tokens (max_tokens)",
                positions=limit,
            )

    async def _pieces(
        self,
        owner: str,
        name: str | None,
        record: SessionRecord | None,
        state: CompressedLM,
        query: Message,
        query_ids: torch.Tensor,
        params: Params,
        answer: Answer,
    ) -> AsyncGenerator[str, None]:
        # the session's lock is held by AnswerPieces around this generator
        sampling = Sampling(params.temperature, params.top_p, params.seed)
        reading = threading.Event()  # set once this answer is read to its end or left: decoding it then stops
        tokens = self.worker.generate(state.memory, query_ids, params.max_new_tokens, sampling, cancelled=reading)
        text = TextStream(state.lm.tokenizer)
        answer.finish_reason = "length"
        held = ""  # text kept back while it could still be the start of a stop string
        trimmed = _Trimmed()
        try:
            while True:
                item = await tokens.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                answer.completion_tokens += 1
                if item in self.worker.stop_ids:
                    answer.finish_reason = "stop"
                    break
                held += text.push(item)
                cut = _stop_at(held, params.stop)
                if cut is not None:
                    held = held[:cut]
                    answer.finish_reason = "stop"
                    break
                keep = _longest_stop_prefix(held, params.stop)
                if len(held) > keep:
                    piece = trimmed.push(held[: len(held) - keep])
                    held = held[len(held) - keep :]
                    if piece:
                        answer.text += piece
                        yield piece
        finally:  # a stop string, or a client gone (the generator closed): the batch stops decoding this answer
            reading.set()
        piece = trimmed.push(held)  # whitespace still held back at the end is dropped
        if piece:
            answer.text += piece
            yield piece
        if name is not None and record is not None:
            reply = answer.text  # exactly what the client received, streamed or not
            await self.worker.fold(state, [[query, {"role": "assistant", "content": reply}]])
            # off the event loop: a save writes a file and commits (fsync), other sessions' requests go on meanwhile
            kept = self._held(state.memory)
            saved = await asyncio.to_thread(
                self.store.save, name, kept, state.history, owner, expect_version=record.version
            )
            self._keep_live(owner, name, saved, kept, state.history)
            answer.memory_bytes = saved.memory_bytes  # as stored (at --memory-dtype), as the session endpoints say
        else:
            answer.memory_bytes = state.memory.nbytes
        answer.memory_slots = state.memory.num_slots

    async def _from_prefix(self, owner: str, system: str | None, before: list[Message]) -> tuple[CompressedLM, int]:
        """The memory of the longest prefix of ``before`` held (at turn boundaries), and how many messages it covers."""
        for n in range(len(before), 0, -1):
            if n < len(before) and before[n]["role"] == "assistant" and before[n - 1]["role"] == "user":
                continue  # inside a turn, which is compressed as one group (:func:`_group_turns`), not split there
            found = self._prefixes.get(_prefix_key(owner, system, before[:n]))
            if found is not None:
                self._prefixes.move_to_end(_prefix_key(owner, system, before[:n]))
                return found.fork(), n
        return await self._start(owner, system), 0

    def _remember_prefix(self, owner: str, system: str | None, before: list[Message], state: CompressedLM) -> None:
        if not before:
            return
        self._prefixes[_prefix_key(owner, system, before)] = state.fork()
        while len(self._prefixes) > self.limits.prefix_cache:
            self._prefixes.popitem(last=False)

    def stats(self) -> dict[str, Any]:
        adapter = self.base.adapter
        return {
            "adapter": None if adapter is None else adapter.hash,  # which weights answer (no path: /health is open)
            "sessions": self.store.count(),
            "live_sessions": len(self._live),
            "prefix_cache": len(self._prefixes),
            "batches": len(self.worker.batches),
            "largest_batch": max(self.worker.batches, default=0),
            # how full decoding steps are, on average: what continuous batching keeps up (1.0: one answer at a time)
            "answers_per_step": round(self.worker.rows_stepped / self.worker.steps, 2) if self.worker.steps else 0.0,
        }


class _Trimmed:
    """Pieces of an answer without its leading and trailing whitespace: whitespace is held back until text follows
    it, so that the pieces a client streams join to exactly the stripped text a non-streaming reply returns and
    the session saves (a client that sends the conversation back then extends what the session holds)."""

    def __init__(self) -> None:
        self.started = False
        self.pending = ""

    def push(self, piece: str) -> str:
        """What of ``piece`` can be sent now."""
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self.started = True
        text = self.pending + piece
        body = text.rstrip()
        self.pending = text[len(body) :]
        return body


def _first_difference(a: Sequence[Message], b: Sequence[Message]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _stop_at(text: str, stops: Sequence[str]) -> int | None:
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


def _longest_stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that begins some stop string (held back until it is decided)."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if stop.startswith(text[-n:]):
                best = n
                break
    return best
