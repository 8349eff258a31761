"""Readers for the file formats the seed datasets are downloaded in, turned into :class:`MemoryExample`.

Each reader takes what users actually have on disk:

* **MetaICL** (``data/<task>/<task>_<k>_<seed>_<split>.jsonl``, records ``{"input", "output", "options"}``):
  ``k`` demonstrations are the context segments, a test input is the query, options are scored.
* **LaMP-2** (``<split>_questions.json`` + ``<split>_outputs.json``): the user's first ``k`` profile items
  (movie ``description``/``tag``, or news ``title``/``text``/``category``) are the context segments.
* **DailyDialog** (the HF ``dialog`` column as jsonl/json/parquet, or the original ``dialogues_*.txt`` with
  ``__eou__`` separators) and **SODA** (the HF ``dialogue`` column): earlier turns are the context, the last
  utterance is the answer to the one before it.
* **pretrain**: plain ``.txt`` documents (earlier segments compressed, the next one predicted) mixed
  with dialog files.

Every error names the file, the line (or record) and the field.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ccmem.data.recordfiles import SPLIT_NAMES, records
from ccmem.data.records import MemoryExample
from ccmem.fileio import DatasetFormatError, jsonl_records, read_utf8, say_ignored_fields

logger = logging.getLogger(__name__)

LAMP2_MOVIE_TAGS = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy", "classic",
    "psychology", "fantasy", "romance", "thought-provoking", "social commentary", "violence", "true story",
)  # fmt: skip


# ---------------------------------------------------------------------------- generic record files


def read_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for each record of a .jsonl, .json (a list, {"data": [...]}, or JSON lines) or .parquet
    file."""
    if not path.is_file():
        raise FileNotFoundError(f"no dataset file at {path}")
    if path.suffix in (".parquet", ".json"):
        yield from records(path)  # a damaged parquet file: one line naming it, not pyarrow's traceback
        return
    yield from jsonl_records(path)


def field_of(record: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value: Any = record.get(key)
    if not isinstance(value, kind) or (isinstance(value, list) and not all(isinstance(v, str) for v in value)):
        what = "a list of strings" if kind is list else f"a {kind.__name__}"
        raise DatasetFormatError(f"{where}: field {key!r} must be {what}")
    return value


def split_file(folder: Path, split: str, suffixes: tuple[str, ...] = (".jsonl", ".json", ".parquet", ".txt")) -> Path:
    """The file for ``split`` in ``folder``: names like train.jsonl, validation-00000.parquet, dialogues_dev.txt, or
    else a split folder (Hugging Face's default/test/0000.parquet). DailyDialog's annotation files beside the
    dialogues (dialogues_act_test.txt, dialogues_emotion_test.txt) are never taken for them."""
    if folder.is_file():
        return folder
    names = SPLIT_NAMES[split]
    candidates = [
        p
        for p in folder.rglob("*")
        if p.suffix in suffixes and p.is_file() and not re.search(r"(^|_)(act|emotion)_", p.name)
    ]

    def named(text: str) -> bool:
        return any(re.search(rf"(^|[_\-/.]){n}([_\-./]|$)", text) for n in names)

    found = sorted(p for p in candidates if named(p.name)) or sorted(
        p for p in candidates if named(p.relative_to(folder).as_posix())
    )
    if not found:
        hint = (
            "; add one, or name a held-out file with data.eval_path=FILE (ccmem eval: --path FILE)"
            if split == "validation"
            else ""
        )
        raise FileNotFoundError(f"no {split} file ({'/'.join(names)} with {', '.join(suffixes)}) in {folder}{hint}")
    if len(found) > 1:
        logger.warning(
            "%s: %d files could be the %s split (%s); reading %s only: pass the file itself to choose",
            folder, len(found), split, ", ".join(p.name for p in found[:4]), found[0].name,
        )  # fmt: skip
    return found[0]


# ---------------------------------------------------------------------------- MetaICL


#: The seed MetaICL evaluates with by default: the files a folder with several seeds is read from, unless asked.
METAICL_DEFAULT_SEED = 100


def _metaicl_train_file(task_dir: Path, seed: int | None, split: str = "train") -> tuple[Path, int | None]:
    """The ``<task>_<k>_<seed>_train.jsonl`` of ``task_dir`` to read: the one of ``seed``; else the only one; else
    MetaICL's default seed 100 (or the smallest seed), whose number is returned too (``None`` when no choice was
    made), so that the caller says it once for all tasks. Of one seed's files of several ``k`` (a task both
    meta-trained on, ``_16384_100_train.jsonl``, and tested, ``_16_100_{train,dev,test}.jsonl``), the one with
    ``split``'s own file is read, the largest ``k`` first (it was the first in name order, whose test file may not
    exist: "16384" sorts before "16_")."""
    pattern = re.compile(rf"{re.escape(task_dir.name)}_(\d+)_(\d+)_train\.jsonl")
    found: dict[int, list[Path]] = {}
    for path in task_dir.glob(f"{task_dir.name}_*_train.jsonl"):
        match = pattern.fullmatch(path.name)
        found.setdefault(int(match.group(2)) if match else -1, []).append(path)
    if not found:
        raise FileNotFoundError(f"{task_dir}: no {task_dir.name}_<k>_<seed>_train.jsonl")
    wanted = {"train": (), "validation": ("dev", "test"), "test": ("test",)}[split]

    def rank(path: Path) -> tuple[bool, int]:
        match = pattern.fullmatch(path.name)
        prefix = path.name.removesuffix("_train.jsonl")
        has_split = not wanted or any((task_dir / f"{prefix}_{s}.jsonl").is_file() for s in wanted)
        return has_split, int(match.group(1)) if match else -1

    def best(paths: list[Path]) -> Path:
        return max(sorted(paths), key=rank)  # max keeps the first in name order among equals

    if seed is not None and seed in found:
        return best(found[seed]), None
    if len(found) == 1:
        return best(next(iter(found.values()))), None
    chosen = METAICL_DEFAULT_SEED if METAICL_DEFAULT_SEED in found else min(found)
    return best(found[chosen]), chosen


def metaicl(folder: Path, split: str, k: int, seed: int | None = None) -> list[MemoryExample]:
    """Every task folder under ``folder``: ``k`` train demonstrations as context, each test record as a query
    (the train/dev/test files of ``seed``, see :func:`_metaicl_train_file`)."""
    # a folder that Jupyter or an archive tool leaves beside the tasks (.ipynb_checkpoints, __MACOSX) is none
    found = folder.iterdir() if folder.is_dir() else []
    tasks = sorted(p for p in found if p.is_dir() and not p.name.startswith((".", "__")))
    if not tasks:
        raise FileNotFoundError(
            f"{folder}: expected one folder per MetaICL task (data/<task>/<task>_16_100_train.jsonl)"
        )
    examples = []
    chosen: dict[int, list[str]] = {}  # seed read instead of ``seed`` -> the tasks it was read for
    for task_dir in tasks:
        train_file, fallback = _metaicl_train_file(task_dir, seed, split)
        if fallback is not None:
            chosen.setdefault(fallback, []).append(task_dir.name)
        demos = _metaicl_file(train_file)
        if split == "train":  # each training record is the query once, with k other records as demonstrations
            if len(demos) - 1 < k:
                logger.warning(
                    "%s: %d training records, so each training example has %d demonstrations, not k=%d",
                    train_file, len(demos), max(len(demos) - 1, 0), k,
                )  # fmt: skip
            for i, (query, answer, options) in enumerate(demos):
                others = [d for j, d in enumerate(demos) if j != i]
                turn = i % max(1, len(others))
                context = [_demo(x, y) for x, y, _ in (others[turn:] + others[:turn])[:k]]  # each one once
                examples.append(
                    MemoryExample(f"{task_dir.name}-train-{i}", context, query, answer, options, False, task_dir.name)
                )
            continue
        prefix = train_file.name.removesuffix("_train.jsonl")
        wanted = ("dev", "test") if split == "validation" else ("test",)
        target = next(
            (task_dir / f"{prefix}_{s}.jsonl" for s in wanted if (task_dir / f"{prefix}_{s}.jsonl").is_file()), None
        )
        if target is None:
            raise FileNotFoundError(f"{task_dir}: no {prefix}_{'/'.join(wanted)}.jsonl")
        if split == "validation" and target.name.endswith("_test.jsonl"):
            logger.warning("%s: no %s_dev.jsonl, so the test file validates (early stopping sees it)", task_dir, prefix)
        if len(demos) < k:
            logger.warning(
                "%s: %d training records, so each test query has %d demonstrations, not k=%d",
                train_file, len(demos), len(demos), k,
            )  # fmt: skip
        context = [_demo(x, y) for x, y, _ in demos[:k]]
        records = _metaicl_file(target)
        with_options = sum(bool(options) for _, _, options in records)
        if 0 < with_options < len(records):
            logger.warning(
                "%s: %d of %d records have options: accuracy (option scoring) covers only those; perplexity all",
                target, with_options, len(records),
            )  # fmt: skip
        for i, (query, answer, options) in enumerate(records):
            examples.append(
                MemoryExample(f"{task_dir.name}-{split}-{i}", context, query, answer, options, False, task_dir.name)
            )
    for read, names in sorted(chosen.items()):
        logger.warning(
            "%s: %d task folder(s) (%s) have files of several seeds, none of seed %s; read seed %d's (MetaICL's "
            "default; --seed or data.seed chooses another)",
            folder, len(names), ", ".join(names[:3]) + (", ..." if len(names) > 3 else ""), seed, read,
        )  # fmt: skip
    return examples


#: What a MetaICL record may hold: ``task`` is read from the folder (MetaICL's files repeat it in every record).
METAICL_FIELDS = ("input", "output", "options", "task")


def _metaicl_file(path: Path) -> list[tuple[str, str, list[str]]]:
    """Every record of one MetaICL file as ``(query, answer, options)``; fields it does not read are named."""
    found: set[str] = set()
    out = []
    for where, record in read_records(path):
        found |= set(record)
        out.append(_metaicl_record(record, where))
    say_ignored_fields(path, found, METAICL_FIELDS, "MetaICL")
    return out


def _metaicl_record(record: dict[str, Any], where: str) -> tuple[str, str, list[str]]:
    x = field_of(record, "input", str, where)
    y = field_of(record, "output", str, where)
    options = field_of(record, "options", list, where) if record.get("options") else []
    if options and not all(isinstance(o, str) and o.strip() for o in options):
        raise DatasetFormatError(f"{where}: field 'options' must be a list of non-empty strings, got {options!r}")
    if options and (len(options) < 2 or len(set(options)) < len(options)):
        raise DatasetFormatError(
            f"{where}: field 'options' must hold at least two different options (one option, or the same twice, "
            f"is always chosen right or ties), got {options!r}; leave it out to score the output alone"
        )
    if options and y not in options:
        raise DatasetFormatError(f"{where}: field 'output' ({y!r}) is not one of 'options'")
    return f"{x}\n", y, options


def _demo(x: str, y: str) -> str:
    return f"{x}{y}\n\n"


# ---------------------------------------------------------------------------- LaMP-2


def lamp2(folder: Path, split: str, k: int) -> list[MemoryExample]:
    """LaMP-2 questions with their gold outputs; the first ``k`` profile items are the context."""
    name = {"train": "train", "validation": "dev", "test": "test"}[split]
    questions = folder / f"{name}_questions.json"
    outputs = folder / f"{name}_outputs.json"
    for p in (questions, outputs):
        if not p.is_file():
            hint = (
                "; LaMP does not publish test outputs: evaluate --split validation (its dev files)"
                if split == "test"
                else ""
            )
            raise FileNotFoundError(f"LaMP-2 needs {p.name} in {folder} (as downloaded from the LaMP benchmark){hint}")
    try:
        gold_doc = json.loads(read_utf8(outputs))
    except json.JSONDecodeError as err:
        raise DatasetFormatError(f"{outputs}:{err.lineno}: not valid JSON ({err.msg})") from None
    golds_list = gold_doc.get("golds") if isinstance(gold_doc, dict) else None
    if not isinstance(golds_list, list):
        raise DatasetFormatError(f"{outputs}: field 'golds' must be a list of {{'id', 'output'}}")
    golds: dict[str, Any] = {}
    for i, g in enumerate(golds_list):
        if isinstance(g, dict):
            gid = str(g.get("id"))
            if gid in golds and golds[gid] != g.get("output"):
                raise DatasetFormatError(
                    f"{outputs}: golds record {i + 1}: id {gid!r} appears twice, with outputs {golds[gid]!r} and "
                    f"{g.get('output')!r}; ids must be unique (which output is right cannot be told)"
                )
            golds[gid] = g.get("output")
    examples, asked = [], set()
    for where, record in read_records(questions):
        qid = str(record.get("id"))
        if qid in asked:
            raise DatasetFormatError(f"{where}: question id {qid!r} appears twice; ids must be unique")
        asked.add(qid)
        text = field_of(record, "input", str, where)
        profile = record.get("profile")
        if not isinstance(profile, list) or not all(isinstance(p, dict) for p in profile):
            raise DatasetFormatError(f"{where}: field 'profile' must be a list of objects")
        if qid not in golds or not isinstance(golds[qid], str):
            raise DatasetFormatError(f"{where}: question id {qid!r} has no string output in {outputs.name}")
        options = _lamp_options(text)
        answer = str(golds[qid])
        if answer not in options:
            options = [*options, answer]
        context = [_profile_item(p, f"{where} profile item {i + 1}") for i, p in enumerate(profile[:k])]
        examples.append(MemoryExample(qid, context, f"{text}\nAnswer: ", answer, options, False, "LaMP-2"))
    return examples


def _lamp_options(text: str) -> list[str]:
    match = re.search(r"(?:tags|categories):\s*\[([^\]]+)\]", text)
    if match:
        return [t.strip() for t in match.group(1).split(",") if t.strip()]
    return list(LAMP2_MOVIE_TAGS)


def _profile_item(item: dict[str, Any], where: str) -> str:
    if "tag" in item:
        return f"Movie: {field_of(item, 'description', str, where)}\nTag: {field_of(item, 'tag', str, where)}\n\n"
    if "category" in item:
        title = item.get("title") or ""
        return f"Article: {title} {field_of(item, 'text', str, where)}".strip() + (
            f"\nCategory: {field_of(item, 'category', str, where)}\n\n"
        )
    raise DatasetFormatError(f"{where}: a LaMP-2 profile item needs 'description' and 'tag' (or 'text' and 'category')")


# ---------------------------------------------------------------------------- dialogs


def dialogs(path: Path, split: str, key: str, k: int, task: str) -> list[MemoryExample]:
    """Dialog records (``key`` holds the utterances) as chat examples: the last utterance answers the one before."""
    file = split_file(path, split)
    examples: list[MemoryExample] = []
    records: Iterator[tuple[str, dict[str, Any]]]
    if file.suffix == ".txt":  # the original DailyDialog release: one dialog per line, utterances end in __eou__
        records = (
            (f"{file}:{i}", {key: [u.strip() for u in line.split("__eou__") if u.strip()]})
            for i, line in enumerate(read_utf8(file).splitlines(), start=1)
            if line.strip()
        )
    else:
        records = read_records(file)
    short = cut = 0
    for where, record in records:
        # Hugging Face's daily_dialog keeps the spaces around each utterance ("Say , Jim ... ? "): stripped, as the
        # original text release is read, so that no turn or answer carries them
        utterances = [u.strip() for u in field_of(record, key, list, where) if u.strip()]
        if len(utterances) % 2:  # keep user/assistant pairs: drop the first utterance
            utterances = utterances[1:]
        if len(utterances) < 4:  # no earlier turn to remember
            short += 1
            continue
        pairs = [(utterances[i], utterances[i + 1]) for i in range(0, len(utterances) - 2, 2)]
        cut += len(pairs) > k
        examples.append(
            MemoryExample(f"{task}-{split}-{len(examples)}", pairs[-k:], utterances[-2], utterances[-1], task=task)
        )
    if short and not examples:
        raise DatasetFormatError(
            f"{file}: none of its {short} dialogs has the 4 utterances an example needs (an earlier exchange to "
            "remember, then a question and its answer)"
        )
    if short or cut:
        logger.warning(
            "%s: %d dialogs with fewer than 4 utterances skipped; %d cut to their last %d exchanges before the "
            "question (k / --k sets how many are kept)",
            file, short, cut, k,
        )  # fmt: skip
    return examples


# ---------------------------------------------------------------------------- pretrain mix


def document_split(name: str) -> str:
    """Stable split of a document by its name: 1 in 10 validation, 1 in 10 test, never shared."""
    bucket = zlib.crc32(name.encode()) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def pretrain(
    folder: Path, split: str, k: int, words_per_segment: int = 64, *, held_out: bool = False
) -> list[MemoryExample]:
    """Plain-text documents (``*.txt``): up to ``k`` segments compressed, the next predicted; plus dialog files
    (``*.jsonl`` with a ``dialogue`` or ``dialog`` column) as chat examples. ``held_out``: ``folder`` holds only
    documents of ``split`` (a validation file or folder, ``data.eval_path``), read whole."""
    if folder.is_dir():
        texts, chats = (sorted(p for p in folder.rglob(f"*{suffix}") if p.is_file()) for suffix in (".txt", ".jsonl"))
    else:  # one file: a dialog file, or a text document whatever its name
        texts, chats = ([], [folder]) if folder.suffix == ".jsonl" else ([folder], [])
    examples = []
    for doc in texts:
        if document_split(doc.name) != split and not held_out:
            continue
        words = doc.read_text(encoding="utf-8-sig", errors="replace").split()
        segments = [" ".join(words[i : i + words_per_segment]) + " " for i in range(0, len(words), words_per_segment)]
        for start in range(0, max(0, len(segments) - 1), k + 1):
            window = segments[start : start + k + 1]
            if len(window) >= 2:
                examples.append(
                    MemoryExample(f"{doc.stem}-{start}", window[:-1], "", window[-1], chat=False, task="text")
                )
    chat = []
    for file in chats:
        first = next(read_records(file), None)
        key = "dialogue" if first and "dialogue" in first[1] else "dialog"
        every = dialogs(file, split, key, k, "chat")  # a single file holds all splits: split it by record
        chat += [e for j, e in enumerate(every) if held_out or document_split(f"{file.name}:{j}") == split]
    mixed = []  # interleave text and chat so every batch sees both
    for i in range(max(len(examples), len(chat))):
        mixed += examples[i : i + 1] + chat[i : i + 1]
    if not mixed:
        raise FileNotFoundError(
            f"{folder}: no .txt document or dialog .jsonl record falls in the {split} split (documents are assigned to "
            "splits by a hash of their file name, 1 in 10 to validation and 1 in 10 to test; give more documents)"
        )
    return mixed
