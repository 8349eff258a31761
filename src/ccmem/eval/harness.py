"""``ccmem eval``: several methods on the same examples, side by side, one JSONL row per (method, dataset).

For every example the context is compressed segment by segment into the method's memory, then:

* **accuracy**: the answer options are scored by summed log-likelihood given the memory (MetaICL-style;
  :meth:`ccmem.CompressedLM.score_ids`; ``score="mean"`` divides by the option's length) and the most likely
  one must be the answer;
* **perplexity**: of the reference answer given the memory (DailyDialog-style);
* with ``generate``: greedy generation, scored by **exact match**, **contains** (the answer's words appear
  whole in the generation: :func:`contains_answer`) and **ROUGE-L** F1. For GSM8K, exact match compares the
  final answers (the number after ``####``, or the last number generated; :func:`ccmem.data.gsm8k.is_correct`),
  as GSM8K is scored, while contains and ROUGE-L compare the whole worked solution.

Each row records what it cost (mean memory slots and bytes, context tokens, compression throughput) and
what produced it (method, model, adapter hash, the dataset it was trained on, data, config hash).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ccmem.api import (
    SCORE_REDUCTIONS,
    CompressedLM,
    ContextTooLongError,
    fold_rows,
    load,
    one_begins_another,
    score_batch,
)
from ccmem.chat import DEFAULT_SYSTEM_PROMPT
from ccmem.data import gsm8k
from ccmem.data.records import MemoryExample, to_sample
from ccmem.data.samples import Sample
from ccmem.eval import textmetrics
from ccmem.fileio import DatasetFormatError, jsonl_records
from ccmem.loading import LoadedModel
from ccmem.memory import Memory
from ccmem.options import OptionError
from ccmem.precision import storage_name
from ccmem.registry import method_class

logger = logging.getLogger(__name__)


@dataclass
class EvalRow:
    """One method on one dataset: quality, cost, provenance. Written as a JSON line."""

    method: str
    model: str
    adapter: str  # file hash, "untrained", or "-" for methods without an adapter
    train_dataset: str  # what the adapter was trained on ("-" when nothing was trained)
    dataset: str
    split: str
    examples: int
    accuracy: float | None  # option scoring
    perplexity: float | None
    exact_match: float | None  # GSM8K: the final answer's accuracy
    contains: float | None
    rouge_l: float | None
    memory_slots: float  # mean key/value positions kept after the context
    memory_bytes: float
    context_tokens: float  # mean tokens of context read
    tokens_per_second: float | None  # context tokens compressed per second (None: the method reads none)
    seconds: float
    config_hash: str
    label: str = ""  # free text to tell runs apart in reports (e.g. "k=4")
    extra: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # method options given (not the defaults)
    budget: float | None = None  # the share of the context a budgeted method kept (``ccmem compare``)


@dataclass
class EvalSettings:
    generate: bool = False
    max_new_tokens: int = 24
    system: str | None = DEFAULT_SYSTEM_PROMPT  # as at training and in ccmem.load
    method_options: dict[str, Any] = field(default_factory=dict)
    score: str = "sum"  # option scoring: "sum" (MetaICL) or "mean" (length-normalised) log-likelihood
    data: dict[str, Any] = field(default_factory=dict)  # how the examples were made (k, seed, ...), when known
    model: str = ""  # which model, when rows of several models may meet
    batch_size: int = 8  # contexts compressed together by methods that batch (the same memories; only faster)
    memory_dtype: str | None = None  # answer from memories stored at this precision (ccmem.precision); None: as made
    data_path: str | None = None  # the user's dataset file/folder, recorded in each row (its content is in ``data``)

    def __post_init__(self) -> None:
        if self.score not in SCORE_REDUCTIONS:
            raise ValueError(f"score must be one of {SCORE_REDUCTIONS}, got {self.score!r}")
        if self.memory_dtype is not None:
            self.memory_dtype = storage_name(self.memory_dtype)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")

    def fingerprint(self, dataset: str, n: int, weights: str | None = None) -> str:
        """The hash of what a row measures: these settings, the dataset, ``n`` examples, and the model's weight
        quantization (``weights``, ccmem.quantize; None for float weights keeps the hash rows had before)."""
        settings = asdict(self)
        if weights is not None:
            settings["weights"] = weights
        del settings["batch_size"]  # changes the speed, not what is measured
        del settings["data_path"]  # where the data lies; what it holds is hashed through ``data``
        # -O options are each row's own (``EvalRow.options``, only those its method takes): hashing them here made
        # the full and none rows of a ratio sweep "not comparable" with each other. {} keeps older rows' hash.
        settings["method_options"] = {}
        for key, default in (("score", "sum"), ("data", {}), ("model", ""), ("memory_dtype", None)):
            if settings[key] == default:
                del settings[key]  # the default before the field existed: older rows keep their hash
        blob = json.dumps({"dataset": dataset, "n": n, **settings}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------- metrics


#: Scripts written without spaces between words (Chinese, Japanese kana and kanji): each character is a word.
UNSPACED = re.compile("([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff])")


def normalize(text: str, *, articles: bool = True, punctuation: bool = True) -> str:
    """Lower case, no punctuation or articles, single spaces (SQuAD-style answer normalisation); characters of
    scripts written without spaces are words of their own, so ROUGE-L gives Chinese or Japanese answers credit.
    ``articles`` / ``punctuation`` False keep those (:func:`answer_normalizer`)."""
    if punctuation:
        text = re.sub(r"[^\w\s]", " ", text)
    text = UNSPACED.sub(r" \1 ", text.lower())
    return " ".join(w for w in text.split() if not (articles and w in ("a", "an", "the")))


def _keep_articles(text: str) -> str:
    return normalize(text, articles=False)


def _keep_punctuation(text: str) -> str:
    return normalize(text, articles=False, punctuation=False)


def answer_normalizer(answer: str) -> Callable[[str], str]:
    """How a generation is compared with ``answer``: after :func:`normalize`, or, for an answer it leaves no word
    of ("A", "The", "?!"), with articles kept, then punctuation too. Under :func:`normalize` alone every
    generation, an empty one included, matched such an answer exactly, and none contained it."""
    return next((norm for norm in (normalize, _keep_articles, _keep_punctuation) if norm(answer)), normalize)


def exact_match(text: str, answer: str) -> bool:
    """Whether ``text`` is ``answer`` after :func:`answer_normalizer`'s normalisation."""
    norm = answer_normalizer(answer)
    return norm(text) == norm(answer)


def contains_answer(text: str, answer: str) -> bool:
    """Whether ``answer``'s words appear in ``text`` together and whole, after :func:`answer_normalizer`'s
    normalisation: "4" is not in "14 cats", nor "red" in "tired" (a substring test counted both; measured before
    2026-12-04 that way)."""
    norm = answer_normalizer(answer)
    wanted = norm(answer)
    return bool(wanted) and f" {wanted} " in f" {norm(text)} "


def answer_words(text: str) -> list[str]:
    """The words of an answer after :func:`normalize`."""
    return normalize(text).split()


#: The word lists ROUGE-L reads under each normalisation (one function each: rouge-score's scorer is cached by it).
_WORDS: dict[Callable[[str], str], Callable[[str], list[str]]] = {
    normalize: answer_words,
    _keep_articles: lambda text: _keep_articles(text).split(),
    _keep_punctuation: lambda text: _keep_punctuation(text).split(),
}


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over the words of :func:`answer_normalizer`'s normalisation (rouge-score's LCS); two answers
    with no word left agree."""
    words = _WORDS[answer_normalizer(reference)]
    if not words(prediction) and not words(reference):
        return 1.0  # rouge-score gives 0 when there is nothing to match
    return textmetrics.rouge_l(prediction, reference, tokenize=words)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------- one example


def _encode(session: CompressedLM, text: str) -> list[int]:
    return list(session.lm.tokenizer.encode(text, add_special_tokens=False))


def read_context(session: CompressedLM, example: MemoryExample) -> None:
    """Compress the example's context, one segment per step, into a fresh memory."""
    session.reset()
    for segment in example.context:
        if example.chat:
            session.remember(*segment)
        else:
            session.add(segment)


def read_contexts(session: CompressedLM, samples: Sequence[Sample]) -> list[Memory]:
    """The memories of several examples' contexts (each from the session's sink), compressed in padded batches:
    step t adds the t-th segment of every example that has one (:meth:`Method.add_batch`). A dialog longer than
    the model's positions goes on as a chat does: its memory is re-based once it would pass them, part by part
    where one segment does not fit at once (:func:`ccmem.api.fold_rows`)."""
    session.reset()
    memories = [session.memory] * len(samples)
    method, lm = session.method, session.lm
    with torch.no_grad(), method.attached(lm):
        for t in range(max(len(s.chunks) for s in samples)):
            rows = [i for i, s in enumerate(samples) if t < len(s.chunks)]
            ids = [torch.tensor([samples[i].chunks[t]], dtype=torch.long, device=lm.device) for i in rows]
            # re-based past the model's last position, part by part where one segment does not fit, as add does
            try:
                folded = fold_rows(lm, method, [memories[i] for i in rows], ids)
            except ContextTooLongError as err:
                err.row = None if err.row is None else rows[err.row]  # the sample's index, not the step's row
                raise
            for i, memory in zip(rows, folded, strict=True):
                memories[i] = memory
    return memories


def generate_answer(session: CompressedLM, example: MemoryExample, query: list[int], max_new_tokens: int) -> str:
    """Greedy answer; plain-text tasks stop at the end of the line."""
    tokens: list[int] = []
    stops = session.format.stop_ids()
    for token in session.stream_ids(query, max_new_tokens, stop_ids=stops):
        if token in stops:
            break
        tokens.append(token)
        if not example.chat and "\n" in str(session.lm.tokenizer.decode(tokens)):
            break
    text = str(session.lm.tokenizer.decode(tokens, skip_special_tokens=True))
    return text.split("\n")[0].strip() if not example.chat else text.strip()


# ---------------------------------------------------------------------------- a method on a dataset


def adapter_provenance(session: CompressedLM) -> tuple[str, str]:
    """(adapter hash, "untrained" or "-"; the dataset it was trained on) for the row."""
    if session.adapter is None:
        return ("untrained" if session.method.kind == "learned" else "-"), "-"
    trained_on = session.adapter.train_dataset
    version = str(session.adapter.extra.get("data_version", ""))
    if version.startswith("files:"):  # the user's own files, not the generator of that name
        trained_on = f"{trained_on} ({version})"
    return session.adapter.hash, trained_on


def options_for(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``options`` that method ``name`` declares (an option applies to the methods that have it)."""
    declared = {spec.name for spec in method_class(name).option_specs()}
    return {k: v for k, v in options.items() if k in declared}


def check_options_apply(names: Sequence[str], options: dict[str, Any]) -> None:
    """Refuse an option that none of ``names`` declares (a typo would otherwise be ignored silently)."""
    declared = {spec.name for name in names for spec in method_class(name).option_specs()}
    unused = [k for k in options if k not in declared]
    if unused:
        raise OptionError(
            f"no method among {', '.join(names)} has the option {unused[0]!r}; their options: "
            f"{', '.join(sorted(declared)) or '(no options)'} (see `ccmem methods`)"
        )


#: The group of an example that lacks a grouping other examples have (``extra.by``).
NO_GROUP = "(none)"

Scored = tuple[list[int], list[int], list[list[int]]]  # query, answer, options (token ids)


def _scored(session: CompressedLM, example: MemoryExample, sample: Sample) -> Scored:
    """What is scored for ``example``: the query's token ids, the answer's and the options' (the answer alone when
    it has none). A continuation without a query (a pretraining document's next segment) reads the answer's first
    token as its query, since nothing before it in the input predicts it; the rest is scored."""
    query = list(sample.tail[: sample.answer_start])
    # a chat's answer and options as the sample's labels hold an answer: right after the generation prompt
    encode = session.format.answer_ids if example.chat else functools.partial(_encode, session)
    answer = encode(example.answer)
    if not answer:
        raise ValueError(
            f"example {example.id!r} has no answer to score (a pretraining document of a train or validation split?); "
            "evaluate a split whose examples have answers (--split test)"
        )
    if not query and not example.options and not session.lm.is_encoder_decoder:  # T5's decoder has a start token
        query, answer = answer[:1], answer[1:]
        if not answer:
            raise ValueError(
                f"example {example.id!r}: a one-token continuation without a query leaves nothing to score"
            )
    if not example.options:
        return query, answer, [answer]
    options = [encode(o) for o in example.options]
    if one_begins_another(options):
        # "63" among the options of "6305": a sum over the tokens of the longer option is never above the shorter
        # one's, so the prefix always won; where options overlap so, each is scored with the end of the answer after it
        end = _answer_end(session, example, sample, answer)
        options = [o + end for o in options]
    return query, answer, options


def _answer_end(session: CompressedLM, example: MemoryExample, sample: Sample, answer: list[int]) -> list[int]:
    """The token that ends an answer: in a chat, the template's end of turn (what follows the answer in the
    sample); in plain text, a line break."""
    if example.chat:
        after = [int(t) for t in sample.tail[sample.answer_start :]]
        if after[: len(answer)] == answer and len(after) > len(answer):
            return after[len(answer) : len(answer) + 1]
        stops = sorted(session.format.stop_ids())
        if stops:
            return stops[:1]
    return _encode(session, "\n")[:1]


def evaluate(
    session: CompressedLM,
    examples: Sequence[MemoryExample],
    *,
    dataset: str,
    split: str = "test",
    settings: EvalSettings | None = None,
    label: str = "",
    progress: Callable[[int], None] | None = None,
) -> EvalRow:
    """Run ``session``'s method over ``examples`` and aggregate one :class:`EvalRow`."""
    settings = settings or EvalSettings()
    if not examples:
        raise ValueError(f"no examples to evaluate for {dataset}/{split}")
    correct: list[float] = []
    nll: list[float] = []
    n_answer_tokens = 0
    em: list[float] = []
    contains: list[float] = []
    rouge: list[float] = []
    slots: list[int] = []
    nbytes: list[int] = []
    tokens: list[int] = []
    compress_seconds = 0.0
    started = time.perf_counter()
    samples = [to_sample(session.lm.tokenizer, e, system=session.system_prompt) for e in examples]
    scored = [_scored(session, e, s) for e, s in zip(examples, samples, strict=True)]  # every example checked first
    batched = session.method.batchable and session.sink and settings.batch_size > 1
    step = settings.batch_size if batched else 1
    memories: list[Memory] = []
    group_scores: list[list[float]] = []
    by_group: dict[str, dict[str, list[float]]] = {}  # "distance" -> "2-4" -> correct flags
    groupings = sorted({name for e in examples if e.options for name in e.groups})
    with torch.no_grad():
        i = 0
        try:
            for i, (example, sample) in enumerate(zip(examples, samples, strict=True)):
                query, answer, options = scored[i]
                if i % step == 0:  # compress the next group of contexts (and, batched, score its options)
                    t0 = time.perf_counter()
                    if batched:
                        memories = read_contexts(session, samples[i : i + step])
                    else:
                        read_context(session, example)
                        memories = [session.memory]
                    compress_seconds += time.perf_counter() - t0
                    held = [m.nbytes for m in memories]
                    # answer from the memory as a store holding it would give it back
                    if settings.memory_dtype is not None:
                        stored = [m.compact(settings.memory_dtype) for m in memories]
                        memories = [c.expanded() for c in stored]
                        held = [c.nbytes for c in stored]
                    if batched:
                        items = [(m, q, opts) for m, (q, _, opts) in zip(memories, scored[i : i + step], strict=True)]
                        group_scores = score_batch(
                            session.lm, session.method, items, reduce=settings.score, check=False
                        )  # memories just made by this session
                session.memory = memories[i % step]
                tokens.append(sum(len(c) for c in sample.chunks))
                slots.append(session.memory.num_slots)
                nbytes.append(held[i % step])
                reduce = settings.score if example.options else "sum"
                scores = group_scores[i % step] if batched else session.score_ids(query, options, reduce=reduce)
                if example.options:
                    correct.append(
                        float(example.options[max(range(len(scores)), key=scores.__getitem__)] == example.answer)
                    )
                    for name in groupings:  # an example without a grouping counts under "(none)", not nowhere
                        value = example.groups.get(name, NO_GROUP)
                        by_group.setdefault(name, {}).setdefault(value, []).append(correct[-1])
                    # the answer is one of the options; perplexity needs its summed log-likelihood
                    answer_at = example.options.index(example.answer)
                    answer_score = scores[answer_at] * (len(options[answer_at]) if settings.score == "mean" else 1)
                else:
                    answer_score = scores[0] * (len(answer) if batched and settings.score == "mean" else 1)
                nll.append(-answer_score)
                n_answer_tokens += len(options[example.options.index(example.answer)] if example.options else answer)
                if settings.generate:
                    text = generate_answer(session, example, query, settings.max_new_tokens)
                    if example.task == gsm8k.TASK:  # a worked solution: its final number is the answer
                        em.append(float(gsm8k.is_correct(text, example.answer)))
                    else:
                        em.append(float(exact_match(text, example.answer)))
                    contains.append(float(contains_answer(text, example.answer)))
                    rouge.append(rouge_l(text, example.answer))
                if progress:
                    progress(i + 1)
        except ContextTooLongError as err:
            first = i - i % step
            batch = examples[first : first + step]  # a batch's read or scoring names its row that did not fit
            which = batch[err.row].id if err.row is not None else ", ".join(e.id for e in batch)
            core = err.fact  # the Python caller's remedy (reset(), several add() calls) is no use here
            raise ContextTooLongError(
                f"{dataset}: example {which} does not fit ({core}); shorten or drop it, or evaluate with a "
                "method that keeps fewer positions",
                positions=err.positions,
            ) from None
    adapter, train_dataset = adapter_provenance(session)
    scored_some = 0 < len(correct) < len(examples)
    if scored_some:  # the row says examples: N, which its accuracy is not over
        logger.warning(
            "%s, %s: accuracy is over the %d of %d examples that have answer options; the other %d are in the "
            "perplexity and generation columns only",
            dataset, session.method.name, len(correct), len(examples), len(examples) - len(correct),
        )  # fmt: skip
    return EvalRow(
        method=session.method.name,
        model=session.lm.name,
        adapter=adapter,
        train_dataset=train_dataset,
        dataset=dataset,
        split=split,
        examples=len(examples),
        accuracy=_mean(correct),
        perplexity=math.exp(sum(nll) / n_answer_tokens) if n_answer_tokens else None,
        exact_match=_mean(em),
        contains=_mean(contains),
        rouge_l=_mean(rouge),
        memory_slots=sum(slots) / len(slots),
        memory_bytes=sum(nbytes) / len(nbytes),
        context_tokens=sum(tokens) / len(tokens),
        tokens_per_second=(
            round(sum(tokens) / compress_seconds, 1)
            if compress_seconds and sum(tokens) and session.method.reads_context
            else None  # nothing compressed (a GSM8K question has no context): no rate to report
        ),
        seconds=round(time.perf_counter() - started, 2),
        config_hash=settings.fingerprint(dataset, len(examples), session.lm.quantized),
        label=label,
        extra={
            **({"stage1": session.lm.stage1} if session.lm.stage1 else {}),
            **({"weights": session.lm.quantized} if session.lm.quantized else {}),
            **({"score": settings.score} if settings.score != "sum" else {}),
            **({"memory_dtype": settings.memory_dtype} if settings.memory_dtype else {}),
            **({"data_path": settings.data_path} if settings.data_path else {}),
            **({"by": _group_accuracy(by_group)} if by_group else {}),
            **({"accuracy_examples": len(correct)} if scored_some else {}),
        },
        options=options_for(session.method.name, settings.method_options),
    )


def _group_accuracy(by_group: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{"distance": {"2-4": {"accuracy": 0.8, "n": 25}}}``: accuracy within each group of examples."""
    return {
        name: {value: {"accuracy": sum(flags) / len(flags), "n": len(flags)} for value, flags in sorted(values.items())}
        for name, values in by_group.items()
    }


def compare(
    lm: LoadedModel,
    methods: Sequence[str],
    examples: Sequence[MemoryExample],
    *,
    dataset: str,
    split: str = "test",
    settings: EvalSettings | None = None,
    adapters: dict[str, Path] | None = None,
    label: str = "",
    out: Path | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> Iterator[EvalRow]:
    """Every method on the same examples with one shared model; rows are appended to ``out`` as they finish."""
    settings = settings or EvalSettings()
    adapters = adapters or {}
    check_options_apply(methods, settings.method_options)
    check_adapters(lm.name, methods, settings.method_options, adapters)
    whole = next((name for name in methods[1:] if method_class(name).holds_every_token), None)
    if whole is not None:  # a method that runs after others and cannot fit: said before they run
        check_whole_context_fits(lm, whole, examples, dataset=dataset, settings=settings)
    for name in methods:
        options = options_for(name, settings.method_options)
        session = load(lm, method=name, adapter=adapters.get(name), system_prompt=settings.system, **options)
        if session.adapter is not None and (note := session.adapter.system_note(settings.system)):
            logger.warning("%s: %s", name, note)  # every method keeps the run's prompt: comparable rows
        row = evaluate(
            session,
            examples,
            dataset=dataset,
            split=split,
            settings=settings,
            label=label,
            progress=functools.partial(progress, name) if progress else None,
        )
        if out is not None:
            append_row(out, row)
        yield row


def check_whole_context_fits(
    lm: LoadedModel, name: str, examples: Sequence[MemoryExample], *, dataset: str, settings: EvalSettings
) -> None:
    """Refuse, before the methods ahead of it run, an example too long for method ``name``, which holds every
    token (:attr:`Method.holds_every_token`): its context and what is read after it (the answer or longest
    option; with ``generate``, the answer's tokens) must fit the model's positions, where other methods may
    compress the context to fit."""
    limit = lm.max_positions
    if limit is None or lm.is_encoder_decoder:
        return
    for example in examples:
        sample = to_sample(lm.tokenizer, example, system=settings.system)
        longest = max((len(lm.tokenizer.encode(o, add_special_tokens=False)) for o in example.options), default=0)
        after = max(len(sample.tail), sample.answer_start + longest) - 1  # the last token is predicted, not read
        if settings.generate:
            after = max(after, sample.answer_start + settings.max_new_tokens)
        need = len(sample.sink) + sum(len(c) for c in sample.chunks) + after
        if need > limit:
            raise ContextTooLongError(
                f"{dataset}: example {example.id} needs {need} positions with {name} (the whole context), but the "
                f"model allows {limit}; drop {name} from --methods, or shorten or drop the example",
                positions=limit,
            )


def check_adapters(
    model_name: str, methods: Sequence[str], options: dict[str, Any], adapters: dict[str, Path] | None = None
) -> None:
    """Refuse, before any method runs, an adapter (given, or shipped for ``model_name``) that is unreadable, made
    for another method, or trained with an option that ``options`` contradicts (``-O recurrent=false`` against
    a recurrent adapter): otherwise the methods before it ran and wrote their rows first."""
    from ccmem.adapter import adapter_path, options_with_adapter, read_adapter

    unused = sorted(set(adapters or {}) - set(methods))
    if unused:
        raise OptionError(
            f"--adapter names {', '.join(unused)}, which this run does not run (methods: {', '.join(methods)}); "
            "add it to --methods or drop that --adapter"
        )
    for name in methods:
        path = adapter_path(model_name, name, (adapters or {}).get(name))
        if path is not None and method_class(name).trainable:
            options_with_adapter(name, read_adapter(path), options_for(name, options))


def append_row(path: Path, row: Any) -> None:
    """Append one result row (a dataclass) as a JSON line. A write that fails (a full disk) is taken back, so the
    file keeps whole rows only; a row that an earlier crash cut short at the end of the file is dropped first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(_finite(asdict(row))) + "\n").encode("utf-8")
    with path.open("ab") as f:
        end = f.seek(0, os.SEEK_END)
        whole = _whole_rows_end(path, end)
        if whole != end:
            logger.warning("%s: its last row was cut short (a crash while writing it); dropped", path)
            f.truncate(whole)
            f.seek(whole)
        try:
            f.write(data)
            f.flush()
        except OSError as err:
            with contextlib.suppress(OSError):
                f.truncate(whole)
            raise OSError(err.errno, f"could not add a row to {path} ({err.strerror}); the file is as it was") from None


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None: JSON has no NaN, and strict parsers refuse the rows otherwise."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _whole_rows_end(path: Path, end: int) -> int:
    """Where the file's whole lines end: ``end``, or just after its last line break when the last line is cut."""
    if end == 0:
        return 0
    with path.open("rb") as f:
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return end
        f.seek(max(0, end - (1 << 20)))
        tail = f.read()
    cut = tail.rfind(b"\n")
    return end - len(tail) + cut + 1 if cut >= 0 else (0 if end <= (1 << 20) else end)


def read_rows(paths: Sequence[Path]) -> list[EvalRow]:
    """Rows from JSONL files written by ``ccmem eval``; a malformed line names its file and line."""
    rows = []
    fields = dataclasses.fields(EvalRow)
    names = {f.name for f in fields}
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for path in paths:
        for where, record in result_records(path, "results file"):
            missing = [k for k in required if k not in record]
            if missing:
                raise DatasetFormatError(f"{where}: not a ccmem eval row (missing field {', '.join(missing[:4])})")
            problem = _row_problem(record)
            if problem:
                raise DatasetFormatError(f"{where}: not a ccmem eval row ({problem})")
            rows.append(EvalRow(**{k: v for k, v in record.items() if k in names}))
    return rows


def _row_problem(record: dict[str, Any]) -> str | None:
    """What in a row's fields has a type that :class:`EvalRow` does not hold (``memory_slots: null``, ``extra``
    a list, a group of ``extra.by`` without its accuracy), or ``None``: the report would fail on it later."""

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    checks: dict[str, tuple[Callable[[Any], bool], str]] = {
        "str": (lambda v: isinstance(v, str), "text"),
        "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
        "float": (number, "a number"),
        "float | None": (lambda v: v is None or number(v), "a number or null"),
        "dict[str, Any]": (lambda v: isinstance(v, dict), "an object"),
    }
    for f in dataclasses.fields(EvalRow):
        if f.name in record and str(f.type) in checks:
            ok, kind = checks[str(f.type)]
            if not ok(record[f.name]):
                return f"field {f.name!r} must be {kind}, got {record[f.name]!r}"
    by = record.get("extra", {}).get("by", {})
    if not isinstance(by, dict) or not all(isinstance(groups, dict) for groups in by.values()):
        return "extra.by must map each grouping to its groups"
    for name, groups in by.items():
        for value, got in groups.items():
            if not isinstance(got, dict) or not number(got.get("accuracy")) or not number(got.get("n")):
                return f"extra.by.{name}.{value} must hold a numeric 'accuracy' and 'n', got {got!r}"
    return None


def result_records(path: Path, what: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The records of a JSONL file that :func:`append_row` writes, as :func:`jsonl_records` gives them; a last row
    that a crash cut short is left out with a warning (the next :func:`append_row` drops it)."""
    size = path.stat().st_size if path.is_file() else 0
    last_line = path.read_bytes().count(b"\n") + 1 if size and _whole_rows_end(path, size) != size else None
    try:
        yield from jsonl_records(path, what=what)
    except DatasetFormatError as err:
        if last_line is None or not str(err).startswith(f"{path}:{last_line}: not valid JSON"):
            raise
        logger.warning("%s: its last row was cut short (a crash while writing it); it is left out", path)
