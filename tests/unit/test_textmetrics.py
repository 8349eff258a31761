"""ROUGE-L (rouge-score), BERTScore (bert-score, packaged encoder) and perplexity under a judge LM."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from ccmem.eval import textmetrics
from ccmem.eval.harness import rouge_l as answer_rouge_l
from ccmem.fileio import package_dir
from tests.conftest import tiny_model

# ---------------------------------------------------------------------------- ROUGE-L


def test_rouge_l_identical_is_one_and_disjoint_is_zero():
    assert textmetrics.rouge_l("The cat sat on the mat.", "the cat sat on the mat") == 1.0
    assert textmetrics.rouge_l("dogs bark loudly", "the cat sat on the mat") == 0.0
    assert textmetrics.rouge_l("", "the cat") == 0.0


def test_rouge_l_matches_lins_worked_example():
    # Lin (2004), section 3.1: S2 shares "police ... the gunman" (LCS 3 of 4) with the reference, S3 only
    # "the gunman" (LCS 2 of 4): ROUGE-L 0.75 and 0.5.
    reference = "police killed the gunman"
    assert textmetrics.rouge_l("police kill the gunman", reference) == pytest.approx(0.75)
    assert textmetrics.rouge_l("the gunman kill police", reference) == pytest.approx(0.5)


def test_rouge_l_hand_computed_unequal_lengths():
    # LCS "the cat was under the bed" = 6 words; P = 6/7, R = 6/6, F = 2PR/(P+R) = 12/13.
    score = textmetrics.rouge_l("The cat was found under the bed.", "the cat was under the bed")
    assert score == pytest.approx(12 / 13)


def test_rouge_l_stemming_and_tokenizer_are_options():
    assert textmetrics.rouge_l("cats running", "cat runs") == 0.0
    assert textmetrics.rouge_l("cats running", "cat runs", use_stemmer=True) == 1.0
    assert textmetrics.rouge_l("東京 大阪", "東京 大阪") == 0.0  # rouge-score keeps ASCII letters and digits only
    assert textmetrics.rouge_l("東京 大阪", "東京 京都", tokenize=str.split) == pytest.approx(0.5)


def test_harness_rouge_l_keeps_answer_normalisation():
    assert answer_rouge_l("The cat sat.", "cat sat on the mat") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert answer_rouge_l(".", "") == 1.0  # nothing left of either answer: they agree
    assert answer_rouge_l("The.", "a") == 0.0  # an answer of an article alone is compared with its article kept
    assert answer_rouge_l("Biscuit", "") == 0.0


def test_missing_metric_package_names_the_extra():
    with pytest.raises(textmetrics.MetricPackageError, match=r"pip install 'ccmem\[eval\]'"):
        textmetrics._require("ccmem_no_such_metric_package", "no-such-metric")


def test_importing_ccmem_and_the_metrics_imports_no_metric_package():
    code = (
        "import sys, ccmem, ccmem.eval.harness, ccmem.eval.textmetrics\n"
        "print(sorted(m for m in ('bert_score', 'rouge_score', 'nltk') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------- BERTScore

needs_encoder = pytest.mark.skipif(
    package_dir(textmetrics.ENCODER_PACKAGE) is None,
    reason=f"the packaged encoder is not installed ({textmetrics.ENCODER_HINT})",
)


@needs_encoder
def test_bertscore_packaged_encoder_ranks_paraphrase_above_unrelated():
    references = ["The meeting was moved to Friday afternoon.", "He bought three apples at the market."]
    paraphrases = ["The meeting has been rescheduled to Friday afternoon.", "At the market he purchased three apples."]
    unrelated = ["Stock prices fell sharply on Tuesday.", "The mountain trail is closed in winter."]
    close = textmetrics.bertscore(paraphrases, references, device="cpu")
    far = textmetrics.bertscore(unrelated, references, device="cpu")
    assert all(c > f + 0.3 for c, f in zip(close.f1_per_item, far.f1_per_item, strict=True))
    assert close.f1 == pytest.approx(sum(close.f1_per_item) / 2)
    assert 0 < close.precision <= 1 and 0 < close.recall <= 1
    assert close.encoder == textmetrics.PACKAGED_ENCODER and close.num_layers == 6
    assert "L6" in close.setting and "all-MiniLM-L6-v2" in close.setting
    assert textmetrics.bertscore(["same words"], ["same words"], device="cpu").f1 == pytest.approx(1.0, abs=1e-5)


@needs_encoder
def test_bertscore_local_encoder_needs_a_valid_layer():
    folder = textmetrics.packaged_encoder()
    with pytest.raises(ValueError, match="pass num_layers"):
        textmetrics.bertscore(["a"], ["a"], encoder=folder)
    with pytest.raises(ValueError, match="num_layers should be between 0 and 6"):
        textmetrics.bertscore(["a"], ["a"], encoder=folder, num_layers=9, device="cpu")
    result = textmetrics.bertscore(["a cat"], ["a dog"], encoder=folder, num_layers=3, device="cpu")
    assert result.encoder == str(folder) and result.num_layers == 3


def test_bertscore_refuses_mismatched_or_empty_lists():
    with pytest.raises(ValueError, match="2 candidates but 1 references"):
        textmetrics.bertscore(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no candidates"):
        textmetrics.bertscore([], [])


# ---------------------------------------------------------------------------- judge perplexity


def _nll_by_hand(lm, ids: list[int], first: int) -> tuple[float, int]:
    """Summed NLL of ids[first:], one forward per prefix: each token given exactly the tokens before it."""
    total = 0.0
    for t in range(first, len(ids)):
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([ids[:t]])).logits[0, -1]
        total -= float(torch.log_softmax(logits.double(), dim=-1)[ids[t]])
    return total, len(ids) - first


def test_judge_perplexity_is_exp_of_mean_nll_per_text_and_overall():
    lm = tiny_model("llama-gqa")
    texts = ["the cat sat on the mat", "a judge reads this too"]
    result = textmetrics.judge_perplexity(texts, lm)
    by_hand = [_nll_by_hand(lm, lm.tokenizer.encode(t), 1) for t in texts]  # no BOS: the first token is context
    assert result.tokens == [n for _, n in by_hand] == [len(t) - 1 for t in texts]
    for ppl, (nll, n) in zip(result.per_text, by_hand, strict=True):
        assert ppl == pytest.approx(math.exp(nll / n), rel=1e-5)
    total_nll, total_n = sum(n for n, _ in by_hand), sum(c for _, c in by_hand)
    assert result.overall == pytest.approx(math.exp(total_nll / total_n), rel=1e-5)
    assert result.judge == "tiny-llama-gqa"


def test_judge_perplexity_given_contexts_scores_every_text_token():
    lm = tiny_model("gemma3")
    result = textmetrics.judge_perplexity(["continues here"], lm, contexts=["A prefix that "])
    ids = lm.tokenizer.encode("A prefix that ") + lm.tokenizer.encode("continues here")
    nll, n = _nll_by_hand(lm, ids, len("A prefix that "))
    assert result.tokens == [n] == [len("continues here")]
    assert result.per_text[0] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_judge_loads_a_model_spec_through_ccmem_loading(tiny_model_dir):
    result = textmetrics.judge_perplexity(["w1 w2 w3 w4"], str(tiny_model_dir))
    assert result.tokens == [3] and result.judge == str(tiny_model_dir) and result.overall > 1


@pytest.mark.parametrize(
    ("texts", "message"),
    [([], "no texts"), (["fine text", "  "], "text 1 is empty"), (["x"], "text 0 .* no token after the first")],
)
def test_judge_perplexity_refuses_texts_it_cannot_score(texts, message):
    with pytest.raises(ValueError, match=message):
        textmetrics.judge_perplexity(texts, tiny_model())


def test_judge_perplexity_refuses_texts_longer_than_the_judge_reads():
    with pytest.raises(ValueError, match="more than tiny-llama-gqa reads"):
        textmetrics.judge_perplexity(["x" * 40], tiny_model(positions=32))
