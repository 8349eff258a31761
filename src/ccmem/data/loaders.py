"""Dataset name -> loader. Every loader returns :class:`~ccmem.data.records.MemoryExample` records.

``load_examples(config, split)`` is what ``ccmem train`` and ``ccmem eval`` call. Loaders that read
files take ``config.path`` in the format users download; generators (``persona``, ``icl``) need no
file and never share items between splits.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ccmem.data import dialogs, formats, gsm8k, icl, news, passages, persona, pwc, text, wikitext
from ccmem.data.records import MemoryExample

if TYPE_CHECKING:
    from ccmem.train.config import DataConfig

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
Loader = Callable[["DataConfig", str], list[MemoryExample]]


class UnknownDatasetError(ValueError):
    """A dataset name with no loader."""


def _dialog_records(cfg: DataConfig, split: str) -> list[persona.PersonaDialog]:
    """The records of ``split`` at ``data.path`` in the dialog format persona, dialogs and passages share: the file,
    or the split's ``.jsonl`` / ``.json`` file in a folder."""
    return persona.read_jsonl(formats.split_file(_path(cfg, split), split, (".jsonl", ".json")))


def _persona(cfg: DataConfig, split: str) -> list[MemoryExample]:
    if cfg.path:  # a .jsonl file (eval_path for the held-out splits) or a folder written by `ccmem data persona`
        dialogs = _dialog_records(cfg, split)
    else:
        n = cfg.n_train if split == "train" else cfg.n_eval
        facts, chatter = min(cfg.k, len(persona.FACTS)), min(cfg.small_talk, len(persona.SMALL_TALK))
        # Training and validation draw up to k facts and small_talk chatter turns per dialog; the test split
        # uses exactly that many, so a benchmark controls how long the dialogs are.
        ranges = split != "test"
        dialogs = list(
            persona.generate(
                n,
                split,
                seed=cfg.seed,
                facts_per_dialog=(1, facts) if ranges else facts,
                small_talk=(0, chatter) if ranges else chatter,
            )
        )
    return [persona_example(d) for d in dialogs]


def persona_example(d: persona.PersonaDialog, task: str = "persona") -> MemoryExample:
    return MemoryExample(
        d.id,
        [tuple(t) for t in d.turns],
        d.question,
        d.answer,
        list(d.options),
        chat=True,
        task=task,
        groups=dict(d.groups),
    )


def _dialogs(cfg: DataConfig, split: str) -> list[MemoryExample]:
    if cfg.path:  # a .jsonl file of dialogs (persona's record format)
        found = _dialog_records(cfg, split)
    else:
        n = cfg.n_train if split == "train" else cfg.n_eval
        try:
            facts, turns = dialogs.split_shape(split, min(cfg.k, 6), cfg.turns or dialogs.DEFAULT_TURNS, cfg.min_turns)
        except ValueError as err:
            raise ValueError(f"data.min_turns and data.turns: {err}") from None
        found = list(dialogs.generate(n, split, seed=cfg.seed, facts=facts, turns=turns, templates=cfg.templates))
    return [persona_example(d, "dialogs") for d in found]


def _passages(cfg: DataConfig, split: str) -> list[MemoryExample]:
    if cfg.path:  # a .jsonl file of passages as turns with a question (persona's record format, `ccmem data`)
        made = _dialog_records(cfg, split)
    else:
        n = cfg.n_train if split == "train" else cfg.n_eval
        made = passages.generate(n, split, seed=cfg.seed, k=min(cfg.k, 8), source=cfg.source)
    return [persona_example(d, "passages") for d in made]


#: Each family's settings inside a mixture (its own k and lengths; data.k and friends set the single datasets).
MIXTURE_DEFAULTS: dict[str, dict[str, Any]] = {
    "dialogs": {"k": 6, "turns": dialogs.DEFAULT_TURNS, "min_turns": 0},
    "persona": {"k": 3, "small_talk": 5},
    "icl": {"k": 8},
    "passages": {"k": 3},
    "text": {},
    "pwc": {},  # generated PwC-style questions (IC-Former's finetuning data)
}


class MixtureError(ValueError):
    """A mixture that cannot be built (an unknown family, a weight with no data)."""


#: What ``data.families`` may set for a family (the DataConfig fields the family loaders read).
FAMILY_SETTINGS = ("k", "turns", "min_turns", "small_talk")


def check_mixture(
    weights: dict[str, float] | None, families: dict[str, dict[str, int]] | None = None
) -> dict[str, float]:
    """The weights of ``data.mixture`` if they can make a mixture (known families, none negative, not all zero),
    and ``data.families`` if it only sets known settings of families in it, to values of at least 1 (0 for
    ``small_talk`` and ``min_turns``), with ``min_turns`` no more than ``turns``."""
    if not weights:
        raise MixtureError("dataset 'mixture' needs data.mixture, e.g. {dialogs: 0.6, icl: 0.2, text: 0.2}")
    for family, weight in weights.items():
        if family not in MIXTURE_DEFAULTS:
            raise MixtureError(f"data.mixture: unknown family {family!r}; families: {', '.join(MIXTURE_DEFAULTS)}")
        if weight < 0:
            raise MixtureError(f"data.mixture: weight of {family!r} must not be negative, got {weight}")
    if sum(weights.values()) <= 0:
        raise MixtureError("data.mixture: the weights sum to zero")
    for family, settings in (families or {}).items():
        if family not in weights:
            raise MixtureError(f"data.families: {family!r} is not in data.mixture ({', '.join(weights)})")
        for key, value in settings.items():
            if key not in FAMILY_SETTINGS:
                raise MixtureError(
                    f"data.families.{family}: unknown setting {key!r}; settings: {', '.join(FAMILY_SETTINGS)}"
                )
            if key == "min_turns" and family != "dialogs":
                raise MixtureError(
                    f"data.families.{family}.min_turns: only the dialogs family reads min_turns (generated dialogs)"
                )
            least = 0 if key in ("small_talk", "min_turns") else 1
            if value < least:
                raise MixtureError(f"data.families.{family}.{key} must be at least {least}, got {value}")
        shape = MIXTURE_DEFAULTS[family] | settings
        if family == "dialogs" and shape["min_turns"] > shape["turns"]:  # the only family with min_turns
            raise MixtureError(
                f"data.families.{family}: min_turns ({shape['min_turns']}) must not exceed turns ({shape['turns']})"
            )
    return weights


def _mixture(cfg: DataConfig, split: str) -> list[MemoryExample]:
    """Families drawn by weight (``data.mixture``), shuffled together with the data seed."""
    weights = check_mixture(cfg.mixture, cfg.families)
    total = sum(weights.values())
    n = cfg.n_train if split == "train" else cfg.n_eval
    mixed: list[MemoryExample] = []
    for family, weight in weights.items():
        if weight == 0:
            continue
        share = max(1, round(n * weight / total))
        sub = dataclasses.replace(
            cfg,
            dataset=family,
            path=None,
            eval_path=None,
            mixture=None,
            families=None,
            n_train=share,
            n_eval=share,
            **(MIXTURE_DEFAULTS[family] | (cfg.families or {}).get(family, {})),
        )
        try:
            found = LOADERS[family](sub, split)
        except (OSError, ValueError) as err:
            raise MixtureError(f"data.mixture: family {family!r} has weight {weight} but no data: {err}") from None
        if not found:
            raise MixtureError(f"data.mixture: family {family!r} has weight {weight} but produced no {split} examples")
        mixed += found[:share]
    random.Random(f"mixture-{split}-{cfg.seed}").shuffle(mixed)
    return mixed


def _held(cfg: DataConfig) -> bool:
    """Whether ``data.path`` is a held-out file of a held-out split (``data.eval_path``, :func:`load_examples`):
    every document in it belongs to the split."""
    return cfg.eval_path is not None and cfg.path == cfg.eval_path


def _path(cfg: DataConfig, split: str) -> Path:
    if not cfg.path:
        raise ValueError(
            f"dataset {cfg.dataset!r} is read from files: give the downloaded folder (--path, or data.path in training)"
        )
    return Path(cfg.eval_path if split != "train" and cfg.eval_path else cfg.path)


def _unified(cfg: DataConfig, split: str) -> list[MemoryExample]:
    """MetaICL and SODA mixed (``data.path`` holds ``metaicl/`` and ``soda/``), alternating so batches see both."""
    root = _path(cfg, split)
    icl = formats.metaicl(root / "metaicl", split, cfg.k, cfg.seed)
    chat = formats.dialogs(root / "soda", split, "dialogue", cfg.k, "soda")
    mixed: list[MemoryExample] = []
    for i in range(max(len(icl), len(chat))):
        mixed += icl[i : i + 1] + chat[i : i + 1]
    return mixed


def _icl(cfg: DataConfig, split: str) -> list[MemoryExample]:
    if cfg.path:
        return formats.metaicl(_path(cfg, split), split, cfg.k, cfg.seed)
    n = cfg.n_train if split == "train" else cfg.n_eval
    return icl.examples(n, split, k=cfg.k, seed=cfg.seed)


def _pwc(cfg: DataConfig, split: str) -> list[MemoryExample]:
    """PwC jsonl files (``data.path``), or PwC-style records generated from packaged text (``data.source``)."""
    if cfg.path:
        return pwc.pwc(_path(cfg, split), split, held_out=_held(cfg))
    return pwc.generated(cfg.n_train if split == "train" else cfg.n_eval, split, seed=cfg.seed, source=cfg.source)


def _gsm8k(cfg: DataConfig, split: str) -> list[MemoryExample]:
    """GSM8K files at data.path (train.jsonl/test.jsonl), or arithmetic word problems generated in its format.

    ``data.train_ratio`` (the fork's option) trains on that share of the training problems and holds out the rest
    for validation (:func:`ccmem.data.gsm8k.hold_out`, drawn with ``data.seed``): of ``train.jsonl`` for files,
    of the ``data.n_train`` generated training problems otherwise; at most ``data.n_eval`` of them are evaluated.
    Without it, validation is the last 500 problems of ``train.jsonl``, or generated problems of its own split.
    ``data.eval_path`` (a GSM8K jsonl file, or a folder as ``data.path``) holds the validation and test problems
    instead, as for the other datasets read from files, and then all of ``train.jsonl`` trains.
    """
    if cfg.eval_path:
        if split != "train":  # a file: all of it validates and tests (read_split splits a file only for training)
            whole = split if Path(cfg.eval_path).is_dir() else "test"
            return gsm8k.examples([dataclasses.replace(p, split=split) for p in gsm8k.read_split(cfg.eval_path, whole)])
        if cfg.path:  # validation is read from eval_path: every problem of train.jsonl trains
            return gsm8k.examples(gsm8k.read_split(cfg.path, split, n_validation=0))
    if cfg.path:
        return gsm8k.examples(gsm8k.read_split(cfg.path, split, train_ratio=cfg.train_ratio, seed=cfg.seed))
    if cfg.train_ratio is None or split == "test":
        return gsm8k.examples(gsm8k.generate(cfg.n_train if split == "train" else cfg.n_eval, split, seed=cfg.seed))
    train, validation = gsm8k.hold_out(gsm8k.generate(cfg.n_train, "train", seed=cfg.seed), cfg.train_ratio, cfg.seed)
    return gsm8k.examples(train if split == "train" else validation[: cfg.n_eval])


#: Loaders that read ``data.eval_path`` themselves (GSM8K's validation and test come whole from it).
READS_EVAL_PATH = ("gsm8k",)

LOADERS: dict[str, Loader] = {
    "persona": _persona,
    "icl": _icl,
    "metaicl": lambda cfg, split: formats.metaicl(_path(cfg, split), split, cfg.k, cfg.seed),
    "lamp2": lambda cfg, split: formats.lamp2(_path(cfg, split), split, cfg.k),
    "dailydialog": lambda cfg, split: formats.dialogs(_path(cfg, split), split, "dialog", cfg.k, "dailydialog"),
    "soda": lambda cfg, split: formats.dialogs(_path(cfg, split), split, "dialogue", cfg.k, "soda"),
    "unified": _unified,
    "dialogs": _dialogs,
    "passages": _passages,
    "mixture": _mixture,
    "pretrain": lambda cfg, split: formats.pretrain(_path(cfg, split), split, cfg.k, held_out=_held(cfg)),
    "pwc": _pwc,
    "pile": lambda cfg, split: pwc.pile(_path(cfg, split), split, held_out=_held(cfg)),
    "text": lambda cfg, split: text.examples(
        cfg.n_train if split == "train" else cfg.n_eval, split, seed=cfg.seed, path=cfg.path, held_out=_held(cfg)
    ),
    # Text read block by block as `ccmem stream` reads it, every block trained on (streaming compression).
    "text-stream": lambda cfg, split: text.stream_examples(
        cfg.n_train if split == "train" else cfg.n_eval, split, seed=cfg.seed, path=cfg.path, held_out=_held(cfg)
    ),
    "gsm8k": _gsm8k,
    # WikiText-2 raw (a download at data.path) or its packaged stand-in, as passages for causal-LM finetuning.
    "wikitext": lambda cfg, split: wikitext.examples(
        cfg.n_train if split == "train" else cfg.n_eval, split, seed=cfg.seed, path=cfg.path
    ),
}


def data_version(cfg: DataConfig) -> str:
    """What the examples came from: a generator version, or the files read."""
    if cfg.path:
        return f"files:{cfg.path}"
    versions = {
        "persona": persona.GENERATOR_VERSION,
        "icl": icl.GENERATOR_VERSION,
        "text": text.GENERATOR_VERSION,
        "text-stream": text.STREAM_VERSION,
        # named by the bank the records themselves name (a path to a packaged file reads as that bank)
        "dialogs": (
            dialogs.bank_version(dialogs.load_bank(cfg.templates)) if cfg.templates else dialogs.GENERATOR_VERSION
        ),
        "passages": passages.VERSIONS.get(cfg.source, passages.GENERATOR_VERSION),
        "pwc": pwc.VERSIONS.get(cfg.source, pwc.GENERATOR_VERSION),
        "wikitext": wikitext.GENERATOR_VERSION,
        "gsm8k": gsm8k.GENERATOR_VERSION,
    }
    if cfg.dataset == "mixture" and cfg.mixture:
        return "+".join(f"{versions.get(f, f)}:{w:g}" for f, w in cfg.mixture.items())
    return versions.get(cfg.dataset, cfg.dataset)


#: The generators that ask about packaged text and read ``data.source`` (its Wikipedia summaries or news).
SOURCE_DATASETS = ("passages", "pwc")


def check_source(cfg: DataConfig) -> None:
    """Refuse a ``data.source`` that names no source, or that no generator of ``cfg`` would read."""
    news.check_source(cfg.source, "data.source")
    if cfg.source == news.SOURCES[0]:
        return
    families = list(cfg.mixture or {}) if cfg.dataset == "mixture" else [cfg.dataset]
    if not any(f in SOURCE_DATASETS for f in families):
        raise ValueError(
            f"data.source={cfg.source!r} chooses the text of the {' and '.join(SOURCE_DATASETS)} generators; "
            f"dataset {cfg.dataset!r} has none of them"
        )
    if cfg.path:
        raise ValueError(f"data.source={cfg.source!r} chooses generated text, but data.path reads files")


def check_templates(cfg: DataConfig) -> None:
    """Refuse a ``data.templates`` that names no template bank, or that no generator of ``cfg`` would read."""
    if cfg.templates is None:
        return
    families = list(cfg.mixture or {}) if cfg.dataset == "mixture" else [cfg.dataset]
    if "dialogs" not in families:
        has = "data.mixture has no dialogs family" if cfg.dataset == "mixture" else f"dataset {cfg.dataset!r} has none"
        raise ValueError(f"data.templates={cfg.templates!r} chooses the wordings of the dialogs generator; {has}")
    if cfg.path:
        raise ValueError(f"data.templates={cfg.templates!r} shapes generated dialogs, but data.path reads files")
    dialogs.load_bank(cfg.templates)  # a missing file or a bad line, named before the model loads


#: The datasets whose validation split ``data.train_ratio`` can carve out of the training problems.
TRAIN_RATIO_DATASETS = ("gsm8k",)


def check_train_ratio(cfg: DataConfig) -> None:
    """Refuse a ``data.train_ratio`` outside (0, 1), or one that the dataset of ``cfg`` would not read."""
    if cfg.train_ratio is None:
        return
    gsm8k.check_train_ratio(cfg.train_ratio, "data.train_ratio")
    if cfg.dataset not in TRAIN_RATIO_DATASETS:
        raise ValueError(
            f"data.train_ratio applies to dataset {' and '.join(TRAIN_RATIO_DATASETS)} only (it holds out a share "
            f"of the training problems for validation); dataset {cfg.dataset!r} has its own validation split"
        )
    if cfg.eval_path:
        raise ValueError(
            "data.train_ratio holds the validation problems out of the training file, data.eval_path names a "
            "validation file: set one of them"
        )


def load_examples(cfg: DataConfig, split: str = "train") -> list[MemoryExample]:
    """The examples of ``cfg.dataset`` for ``split`` (train, validation or test)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    try:
        loader = LOADERS[cfg.dataset]
    except KeyError:
        close = difflib.get_close_matches(cfg.dataset, list(LOADERS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UnknownDatasetError(f"unknown dataset {cfg.dataset!r}; {hint}datasets: {', '.join(LOADERS)}") from None
    if cfg.path and not Path(cfg.path).exists():
        raise FileNotFoundError(f"{cfg.path} does not exist (the data path: --path, or data.path in training)")
    if cfg.path and cfg.dataset == "mixture":
        raise ValueError(
            "dataset 'mixture' draws from its families' generators and reads no data.path; read a file with its "
            "own dataset (e.g. dialogs, persona, pwc, text)"
        )
    if cfg.eval_path and not Path(cfg.eval_path).exists():
        raise FileNotFoundError(f"data.eval_path {cfg.eval_path} does not exist")
    if cfg.eval_path and cfg.dataset == "mixture":
        raise ValueError("dataset 'mixture' draws its validation examples from its generators: drop data.eval_path")
    check_source(cfg)
    check_train_ratio(cfg)
    if cfg.eval_path and split != "train" and cfg.dataset not in READS_EVAL_PATH:
        # The held-out splits are read from eval_path in the dataset's format, whether training data is a file
        # or generated; documents there are not split again.
        cfg = dataclasses.replace(cfg, path=cfg.eval_path, source=news.SOURCES[0], templates=None)
    examples = loader(cfg, split)
    limit = cfg.n_train if split == "train" else cfg.n_eval
    if not (limit and cfg.path and cfg.dataset not in ("text", "text-stream", "wikitext")):
        return examples
    if len(examples) > limit:  # said: a file's later records were left out without a word
        logger.warning(
            "%s: reading the first %d of its %d %s examples (%s; ccmem eval: --n)",
            cfg.path, limit, len(examples), split, "data.n_train" if split == "train" else "data.n_eval",
        )  # fmt: skip
    return examples[:limit]
