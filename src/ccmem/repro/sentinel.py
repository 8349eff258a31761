"""``ccmem repro sentinel ppl|generate``: the two claims of the sentinel-token reproduction, one table each.

Seed ``004`` reproduces Ren et al. (EMNLP 2023): after LoRA finetuning at compression ratio ``r`` in
{0.1, ..., 0.9},

* claim 1: sentinel-token KV compression reaches a WikiText-2 test perplexity about as low as (or lower than)
  local and scattered attention;
* claim 2: continuations sampled (nucleus) from prefixes of C4 documents are closer to the real text (ROUGE-L,
  BERTScore) and more natural (a second LM's perplexity) with sentinel compression than with local attention.

This recipe trains every (method, ratio) through ``ccmem train`` (presets ``sentinel-clm``, ``local-clm``,
``scattered-clm``; a finished run is reused, an interrupted one resumes), then measures and writes JSONL rows,
markdown tables in the seed's shape (method x ratio) and a PNG per metric. Rows name the data, models, encoder
and budgets they used. ``full`` (the model without finetuning, ratio 0) is the reference row.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ccmem.data.samples import Sample
from ccmem.fileio import atomic_path
from ccmem.loading import LoadedModel
from ccmem.methods.sparse import SparseMethod

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CLAIM1_METHODS = ("sentinel", "local", "scattered")
CLAIM2_METHODS = ("sentinel", "local")
REFERENCE = "full"  # the model as it is, reading everything

Progress = Callable[[str], None]


@dataclass
class ReproSettings:
    """Everything that shapes the two tables (defaults sized for a 2-core CPU; the paper's in brackets)."""

    model: str = "smollm2-135m"  # [RedPajama-INCITE-Base-3B]
    attn: str = "sdpa"  # attention kernel of the model and the judge (sentinel/local/scattered: sdpa or eager)
    methods: Sequence[str] = CLAIM1_METHODS
    ratios: Sequence[float] = RATIOS
    wikitext: str | None = None  # a WikiText-2 raw download; None: the packaged Wikipedia stand-in
    c4: str | None = None  # C4 json.gz shards (file, folder or glob); None: the packaged news stand-in
    block_size: int = 128  # [256] tokens per test block
    test_blocks: int = 16  # [all of WikiText-2 test]
    train_steps: int = 12  # [3 epochs of WikiText-2 train at batch 12]
    batch_size: int = 4
    lr: float = 3e-4  # [5e-5]
    n_docs: int = 12  # [200]
    prefix_tokens: int = 96
    continuation_tokens: int = 24
    top_p: float = 0.9
    judge: str = "gemma3-270m"  # [Pythia-1B]
    encoder: str | None = None  # BERTScore encoder; None: the packaged all-MiniLM-L6-v2 [roberta-large]
    seed: int = 0
    runs_dir: str = "runs"
    adapters: dict[str, str] = field(default_factory=dict)  # "method@ratio" -> adapter file, instead of training

    def check(self) -> None:
        if not self.ratios or not self.methods:
            raise ValueError(f"{'ratios' if not self.ratios else 'methods'} names none; give at least one")
        for r in self.ratios:
            if not 0 <= r < 1:
                raise ValueError(f"ratios are compression ratios in [0, 1), got {r}")
        unknown = [m for m in self.methods if m not in CLAIM1_METHODS]
        if unknown:
            raise ValueError(f"methods of this reproduction: {', '.join(CLAIM1_METHODS)}; got {', '.join(unknown)}")
        cells = {f"{m}@{r:g}" for m in self.methods for r in self.ratios}
        stray = [k for k in self.adapters if k not in cells]
        if stray:
            raise ValueError(
                f"--adapter {stray[0]} matches no cell of this run (methods {', '.join(self.methods)} at ratios "
                f"{', '.join(f'{r:g}' for r in self.ratios)})"
            )
        missing = [p for p in self.adapters.values() if not Path(p).is_file()]
        if missing:
            raise ValueError(f"--adapter: no adapter file at {missing[0]}")
        for name in ("block_size", "test_blocks", "train_steps", "batch_size", "n_docs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def run_id(self, method: str, ratio: float) -> str:
        return f"repro-{method}-r{ratio:g}"

    @property
    def wikitext_name(self) -> str:
        return f"WikiText-2 raw at {self.wikitext}" if self.wikitext else "packaged Wikipedia summaries (stand-in)"

    @property
    def c4_name(self) -> str:
        return f"C4 at {self.c4}" if self.c4 else "gensim's Lee news corpus (stand-in for C4)"


# ---------------------------------------------------------------------------- training


def adapter_for(lm: LoadedModel, settings: ReproSettings, method: str, ratio: float, progress: Progress) -> Path:
    """The adapter of ``method`` finetuned at ``ratio``: given, finished before, or trained now (resumable)."""
    given = settings.adapters.get(f"{method}@{ratio:g}")
    if given:
        return Path(given)
    from ccmem.train.config import ConfigError, load_config
    from ccmem.train.trainer import train

    overrides = [
        f"model={settings.model}",
        f"attn={settings.attn}",
        f"method.compression_ratio={ratio}",
        f"train.max_steps={settings.train_steps}",
        f"train.batch_size={settings.batch_size}",
        f"train.lr={settings.lr}",
        f"train.eval_steps={settings.train_steps}",
        f"train.save_steps={settings.train_steps}",
        f"data.n_train={settings.train_steps * settings.batch_size}",
        "data.n_eval=4",
        f"run_id={settings.run_id(method, ratio)}",
        f"output_dir={settings.runs_dir}",
    ]
    if settings.wikitext:
        overrides.append(f"data.path={settings.wikitext}")
    config = load_config(f"{method}-clm", overrides)
    progress(f"train {method} at r={ratio:g} ({settings.train_steps} steps)")
    try:
        return train(config, lm=lm).output
    except ConfigError as err:  # the run ids are this recipe's own: the user chooses their folder, not their names
        if not str(err).startswith(f"run {config.run_id!r}"):  # not a run made with other settings: as it is
            raise
        raise ConfigError(
            f"{err} Here: --runs-dir DIR finetunes every cell anew in another folder (or rerun with the "
            f"--train-steps, --batch-size, --lr and --wikitext the runs in {settings.runs_dir} were made with)"
        ) from None


def _session(lm: LoadedModel, method: str, ratio: float, adapter: Path | None) -> Any:
    import ccmem

    if adapter is None:  # the reference: the model as it is, reading everything (= local at ratio 0, untrained)
        return ccmem.load(lm, "local", system_prompt=None, compression_ratio=0.0)
    return ccmem.load(lm, method, adapter=adapter, system_prompt=None, compression_ratio=ratio)


# ---------------------------------------------------------------------------- claim 1


def test_blocks(lm: LoadedModel, settings: ReproSettings) -> list[list[int]]:
    """The first ``test_blocks`` blocks of ``block_size`` tokens of the test split (``run_clm``'s grouping)."""
    from ccmem.data import wikitext

    if settings.wikitext:
        lines = wikitext.wikitext_lines(settings.wikitext, "test")
    else:
        chars = settings.test_blocks * settings.block_size * 8
        lines = wikitext.packaged_text("test", max_chars=chars).splitlines(keepends=True)
    blocks = wikitext.blocks(wikitext.clm_token_ids(lm.tokenizer, lines), settings.block_size)
    if len(blocks) < settings.test_blocks:
        raise ValueError(
            f"the test split gives {len(blocks)} blocks of {settings.block_size} tokens; ask for fewer test blocks"
        )
    return blocks[: settings.test_blocks]


def perplexity(lm: LoadedModel, method: SparseMethod, blocks: list[list[int]]) -> dict[str, Any]:
    """Perplexity of ``blocks`` read with the method's mask (one masked forward per block, every real token after
    the first scored, sentinel spans seeded per block so every run sees the same), and the entries it keeps."""
    total, count, kept = 0.0, 0, 0
    with torch.no_grad():
        for i, block in enumerate(blocks):
            sample = Sample([block], [])
            rng = random.Random(f"ppl-{i}")
            layout = method.sample_layout(sample, rng)
            method._rng = random.Random(f"ppl-{i}")
            nll, n = method.nll(lm, method.make_batch([sample]))
            total += float(nll)
            count += n
            kept += int(layout.kept_after().sum())
    return {"perplexity": math.exp(total / count), "tokens": count, "kept_share": kept / sum(len(b) for b in blocks)}


def run_ppl(lm: LoadedModel, settings: ReproSettings, progress: Progress) -> list[dict[str, Any]]:
    """Claim 1's rows: one per (method, ratio), plus the reference."""
    settings.check()
    blocks = test_blocks(lm, settings)
    rows = []
    full_bytes = 0
    cells = [(REFERENCE, 0.0)] + [(m, r) for m in settings.methods for r in settings.ratios]
    for method, ratio in cells:
        started = time.perf_counter()
        adapter = None if method == REFERENCE else adapter_for(lm, settings, method, ratio, progress)
        progress(f"perplexity: {method} at r={ratio:g}")
        session = _session(lm, method, ratio, adapter)
        measured = perplexity(lm, session.method, blocks)
        session.add_ids(blocks[0])  # the memory really kept after one block, in bytes
        full_bytes = full_bytes or session.memory.nbytes  # (the reference, first, keeps everything)
        measured |= {"kv_bytes": session.memory.nbytes, "kv_bytes_share": session.memory.nbytes / full_bytes}
        rows.append(
            _row(settings, "ppl", method, ratio, adapter)
            | measured
            | {"blocks": len(blocks), "block_size": settings.block_size, "data": settings.wikitext_name}
            | {"seconds": round(time.perf_counter() - started, 1)}
        )
    return rows


# ---------------------------------------------------------------------------- claim 2


@dataclass
class Document:
    prefix: list[int]
    continuation: list[int]


def documents(lm: LoadedModel, settings: ReproSettings) -> list[Document]:
    """``n_docs`` documents long enough for a prefix and a continuation, drawn reproducibly."""
    from ccmem.data import c4

    pool = (
        c4.read_c4(settings.c4, None, settings.seed)
        if settings.c4
        else c4.packaged_documents("test", None, settings.seed)
    )
    need = settings.prefix_tokens + settings.continuation_tokens
    out = []
    for doc in pool:
        ids = [int(t) for t in lm.tokenizer.encode(doc.text, add_special_tokens=False)]
        if len(ids) >= need:
            prefix, rest = c4.prefix_and_continuation(ids, settings.prefix_tokens, settings.continuation_tokens)
            out.append(Document(prefix, rest))
        if len(out) == settings.n_docs:
            return out
    raise ValueError(
        f"only {len(out)} documents of {settings.c4_name} hold {need} tokens; ask for fewer documents or "
        "shorter prefixes/continuations"
    )


def continuations(session: Any, docs: list[Document], settings: ReproSettings) -> list[list[int]]:
    """Nucleus-sampled continuations: each prefix (all but its last token) is compressed into the memory, its last
    token is the query; document ``i`` samples with seed ``seed + i`` whatever the method (paired samples)."""
    out = []
    for i, doc in enumerate(docs):
        session.reset()
        session.add_ids(doc.prefix[:-1])
        tokens = session.stream_ids(
            doc.prefix[-1:],
            settings.continuation_tokens,
            temperature=1.0,
            top_p=settings.top_p,
            seed=settings.seed + i,
            stop_ids=set(),
        )
        out.append(list(tokens))
    return out


def run_generate(lm: LoadedModel, settings: ReproSettings, progress: Progress) -> list[dict[str, Any]]:
    """Claim 2's rows: one per (method, ratio) of ``sentinel`` and ``local``, plus the reference."""
    from ccmem.eval.textmetrics import bertscore, bertscore_encoder, judge_perplexity, rouge_l
    from ccmem.loading import load_model

    settings.check()
    docs = documents(lm, settings)
    # the judge and the encoder are loaded before any cell is finetuned or generated: a judge that is not
    # installed, or an encoder that does not load, is said at once, not after every cell's work
    progress(f"judge: loading {settings.judge}")
    judge = load_model(settings.judge, attn_implementation=settings.attn)
    encoder = bertscore_encoder(settings.encoder)  # its label, the same for every row

    def decode(ids: list[int]) -> str:
        return str(lm.tokenizer.decode(ids))

    references = [decode(d.continuation) for d in docs]
    generated: dict[tuple[str, float], tuple[list[str], Path | None, float]] = {}
    methods = [m for m in settings.methods if m in CLAIM2_METHODS]
    for method, ratio in [(REFERENCE, 0.0)] + [(m, r) for m in methods for r in settings.ratios]:
        adapter = None if method == REFERENCE else adapter_for(lm, settings, method, ratio, progress)
        progress(f"generate: {method} at r={ratio:g}")
        started = time.perf_counter()
        texts = [decode(t) for t in continuations(_session(lm, method, ratio, adapter), docs, settings)]
        generated[method, ratio] = (texts, adapter, time.perf_counter() - started)
    prefixes = [decode(d.prefix) for d in docs]
    rows = []
    for (method, ratio), (texts, adapter, seconds) in generated.items():
        progress(f"score: {method} at r={ratio:g}")
        scored = [i for i, t in enumerate(texts) if t.strip()]
        # a cell whose every continuation is empty has no BERTScore or perplexity (None: "-" in the report), and
        # must not cost the rows of every other cell
        bert = (
            bertscore([texts[i] for i in scored], [references[i] for i in scored], encoder=settings.encoder)
            if scored
            else None
        )
        naturalness = (
            judge_perplexity([texts[i] for i in scored], judge, contexts=[prefixes[i] for i in scored])
            if scored
            else None
        )
        rows.append(
            _row(settings, "generate", method, ratio, adapter)
            | {
                "rouge_l": sum(rouge_l(texts[i], references[i]) for i in scored) / len(docs),
                "bertscore_f1": bert.f1 if bert else None,
                "judge_perplexity": naturalness.overall if naturalness else None,
                "docs": len(docs),
                "empty": len(docs) - len(scored),
                "prefix_tokens": settings.prefix_tokens,
                "continuation_tokens": settings.continuation_tokens,
                "top_p": settings.top_p,
                "data": settings.c4_name,
                "encoder": encoder,
                "judge": judge.name,
                "seconds": round(seconds, 1),
                "sample": texts[0][:200],
            }
        )
    return rows


# ---------------------------------------------------------------------------- rows and reports


def _row(settings: ReproSettings, claim: str, method: str, ratio: float, adapter: Path | None) -> dict[str, Any]:
    return {
        "claim": claim,
        "method": method,
        "ratio": ratio,
        "model": settings.model,
        "adapter": str(adapter) if adapter else "none (not finetuned)",
        "train_steps": settings.train_steps if adapter else 0,
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "seed": settings.seed,
    }


def write_rows(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def settings_json(settings: ReproSettings) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()}
