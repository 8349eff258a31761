"""In-context classification tasks, generated offline (seeded, versioned), in MetaICL's format.

Each task sorts words of two or three categories (animals, fruits, ...) under labels that are
arbitrary for that task ("wug", "dax", ...), so the label of a query can only come from the
demonstrations in the context. Every fifth word of each category is held out for the test split, so
test queries never appear in training. ``write_metaicl`` lays tasks out exactly like MetaICL's
``data/<task>/<task>_<k>_<seed>_<split>.jsonl``, so the ``metaicl`` loader reads them too.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from ccmem.data.records import MemoryExample
from ccmem.fileio import atomic_path

GENERATOR_VERSION = "icl-v1"
CATEGORIES: dict[str, tuple[str, ...]] = {
    "animal": ("horse", "tiger", "rabbit", "eagle", "salmon", "camel", "otter", "spider", "parrot", "wolf"),
    "fruit": ("apple", "mango", "cherry", "banana", "peach", "lemon", "grape", "papaya", "plum", "melon"),
    "country": ("France", "Peru", "Japan", "Kenya", "Canada", "Norway", "Chile", "Egypt", "India", "Spain"),
    "instrument": ("violin", "trumpet", "piano", "drum", "flute", "cello", "harp", "guitar", "oboe", "banjo"),
    "vehicle": ("truck", "bicycle", "canoe", "tram", "scooter", "ferry", "tractor", "jeep", "glider", "van"),
    "tool": ("hammer", "wrench", "saw", "drill", "chisel", "pliers", "shovel", "rake", "axe", "ladder"),
}
LABELS = ("wug", "dax", "blick", "fep", "toma", "zorp", "kiki", "lune")
HELD_OUT_EVERY = 5


def split_items(category: str, split: str) -> list[str]:
    items = CATEGORIES[category]
    test = [w for i, w in enumerate(items) if i % HELD_OUT_EVERY == 0]
    return test if split == "test" else [w for w in items if w not in test]


def _task(rng: random.Random) -> dict[str, str]:
    """A task: category -> its arbitrary label."""
    cats = rng.sample(sorted(CATEGORIES), rng.choice((2, 3)))
    return dict(zip(cats, rng.sample(LABELS, len(cats)), strict=True))


def _pairs(rng: random.Random, task: dict[str, str], n: int) -> list[tuple[str, str]]:
    """``n`` (word, label) demonstrations drawn from training words only."""
    pool = [(w, label) for cat, label in task.items() for w in split_items(cat, "train")]
    return [rng.choice(pool) for _ in range(n)]


def examples(n: int, split: str, *, k: int = 8, seed: int = 0) -> list[MemoryExample]:
    """``n`` examples, each a fresh task: ``k`` demonstrations (training words), then a query word of ``split``."""
    rng = random.Random(f"{GENERATOR_VERSION}-{split}-{seed}")
    out = []
    for i in range(n):
        task = _task(rng)
        demos = _pairs(rng, task, k)
        cat = rng.choice(sorted(task))
        word = rng.choice(split_items(cat, split))
        options = sorted(task.values())
        context = [f"{w}\n{label}\n\n" for w, label in demos]
        out.append(MemoryExample(f"icl-{split}-{i}", context, f"{word}\n", task[cat], options, chat=False, task="icl"))
    return out


def write_metaicl(
    folder: str | os.PathLike[str], n_tasks: int, *, k: int = 16, n_test: int = 20, seed: int = 100
) -> Path:
    """Write ``n_tasks`` tasks in MetaICL's layout (train = the k demonstrations; dev/test = queries)."""
    root = Path(folder)
    rng = random.Random(f"{GENERATOR_VERSION}-metaicl-{seed}")
    for t in range(n_tasks):
        task = _task(rng)
        name = f"icl{t}"
        options = sorted(task.values())
        rows = {
            "train": _pairs(rng, task, k),
            "dev": _pairs(rng, task, n_test),
            "test": [(w, task[c]) for c in task for w in split_items(c, "test")],
        }
        for split, pairs in rows.items():
            path = root / name / f"{name}_{k}_{seed}_{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
                for w, label in pairs:
                    f.write(json.dumps({"task": name, "input": w, "output": label, "options": options}) + "\n")
    return root
