"""Dataset name -> loader. Every loader returns :class:`~ccmem.data.records.MemoryExample` records.

``load_examples(config, split)`` is what ``ccmem train`` and ``ccmem eval`` call. Loaders that read
files take ``config.path`` in the format users download; generators (``persona``, ``icl``) need no
file and never share items between splits.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ccmem.data import formats, icl, persona, text
from ccmem.data.records import MemoryExample

if TYPE_CHECKING:
    from ccmem.train.config import DataConfig

SPLITS = ("train", "validation", "test")
Loader = Callable[["DataConfig", str], list[MemoryExample]]


class UnknownDatasetError(ValueError):
    """A dataset name with no loader."""


def _persona(cfg: DataConfig, split: str) -> list[MemoryExample]:
    if cfg.path:  # a .jsonl file (eval_path for the held-out splits) or a folder written by `ccmem data persona`
        dialogs = persona.read_jsonl(formats.split_file(_path(cfg, split), split, (".jsonl",)))
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


def persona_example(d: persona.PersonaDialog) -> MemoryExample:
    return MemoryExample(
        d.id, [tuple(t) for t in d.turns], d.question, d.answer, list(d.options), chat=True, task="persona"
    )


def _path(cfg: DataConfig, split: str) -> Path:
    if not cfg.path:
        raise ValueError(f"dataset {cfg.dataset!r} is read from files: set data.path to the downloaded folder")
    return Path(cfg.eval_path if split != "train" and cfg.eval_path else cfg.path)


def _unified(cfg: DataConfig, split: str) -> list[MemoryExample]:
    """MetaICL and SODA mixed (``data.path`` holds ``metaicl/`` and ``soda/``), alternating so batches see both."""
    root = _path(cfg, split)
    icl = formats.metaicl(root / "metaicl", split, cfg.k)
    chat = formats.dialogs(root / "soda", split, "dialogue", cfg.k, "soda")
    mixed: list[MemoryExample] = []
    for i in range(max(len(icl), len(chat))):
        mixed += icl[i : i + 1] + chat[i : i + 1]
    return mixed


def _icl(cfg: DataConfig, split: str) -> list[MemoryExample]:
    if cfg.path:
        return formats.metaicl(_path(cfg, split), split, cfg.k)
    n = cfg.n_train if split == "train" else cfg.n_eval
    return icl.examples(n, split, k=cfg.k, seed=cfg.seed)


LOADERS: dict[str, Loader] = {
    "persona": _persona,
    "icl": _icl,
    "metaicl": lambda cfg, split: formats.metaicl(_path(cfg, split), split, cfg.k),
    "lamp2": lambda cfg, split: formats.lamp2(_path(cfg, split), split, cfg.k),
    "dailydialog": lambda cfg, split: formats.dialogs(_path(cfg, split), split, "dialog", cfg.k, "dailydialog"),
    "soda": lambda cfg, split: formats.dialogs(_path(cfg, split), split, "dialogue", cfg.k, "soda"),
    "unified": _unified,
    "pretrain": lambda cfg, split: formats.pretrain(_path(cfg, split), split, cfg.k),
    "text": lambda cfg, split: text.examples(
        cfg.n_train if split == "train" else cfg.n_eval, split, seed=cfg.seed, path=cfg.path
    ),
}


def data_version(cfg: DataConfig) -> str:
    """What the examples came from: a generator version, or the files read."""
    if cfg.path:
        return f"files:{cfg.path}"
    versions = {"persona": persona.GENERATOR_VERSION, "icl": icl.GENERATOR_VERSION, "text": text.GENERATOR_VERSION}
    return versions.get(cfg.dataset, cfg.dataset)


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
        raise FileNotFoundError(f"data.path {cfg.path} does not exist")
    examples = loader(cfg, split)
    limit = cfg.n_train if split == "train" else cfg.n_eval
    return examples[:limit] if limit and cfg.path and cfg.dataset != "text" else examples
