"""Scoring and ``ccmem eval`` / ``compare`` on an encoder-decoder model (a tiny random T5).

The decoder scores an answer while cross-attending to what the method gives it (:meth:`Method.encoder_states`);
with nothing in memory that is exactly T5's own log-likelihood of the answer given the query.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import ccmem
from ccmem.api import score_batch
from ccmem.data import icl
from ccmem.data.records import to_sample
from ccmem.eval.harness import EvalSettings, compare, evaluate
from ccmem.registry import get_method
from tests.conftest import randomize_lora, tiny_model
from tests.unit.test_cli import run_cli

QUERY = [40, 41, 42]
OPTIONS = [[50, 51, 52], [53], [54, 55]]
T5_METHODS = ["full", "none", "ccm-concat", "ccm-merge", "gist"]


def t5_log_likelihood(lm, query, option) -> torch.Tensor:
    """Per-token log-probabilities of ``option`` after ``query`` by T5's own forward (no ccmem code)."""
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([query]), labels=torch.tensor([option])).logits[0].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(option)[:, None])[:, 0]


@pytest.mark.parametrize("name", T5_METHODS)
def test_with_nothing_in_memory_scores_are_t5s_own_log_likelihood(name):
    lm = tiny_model("t5")
    session = ccmem.load(lm, name, system_prompt=None, **({"n_tok": 2} if name not in ("full", "none") else {}))
    expected = [t5_log_likelihood(lm, QUERY, o) for o in OPTIONS]
    summed = session.score_ids(QUERY, OPTIONS)
    mean = session.score_ids(QUERY, OPTIONS, reduce="mean")
    assert summed == pytest.approx([float(e.sum()) for e in expected], abs=1e-4)
    assert mean == pytest.approx([float(e.mean()) for e in expected], abs=1e-4)


@pytest.mark.parametrize("name", ["full", "ccm-concat", "gist"])
def test_scores_read_the_memory_and_batches_equal_one_at_a_time(name):
    lm = tiny_model("t5")
    options = {} if name == "full" else {"n_tok": 2}
    method = get_method(name, **options)
    if name != "full":
        randomize_lora(method, lm, scale=0.5)
    memories = []
    for context in ([10, 11, 12, 13], [20, 21, 22, 23], [10, 11, 12, 14]):
        session = ccmem.load(lm, name, system_prompt="Hi.", **options)
        session.method = method  # the same (random) trained state for every session
        session.add_ids(context)
        memories.append(session.memory)
    items = [(m, QUERY, OPTIONS) for m in memories]
    batched = score_batch(lm, method, items)
    for item, scores in zip(items, batched, strict=True):
        assert score_batch(lm, method, [item])[0] == pytest.approx(scores, abs=1e-5)
    assert all(math.isfinite(s) for row in batched for s in row)
    # One changed context token changes the scores: the decoder reads the context through the memory.
    assert max(abs(a - b) for a, b in zip(batched[0], batched[2], strict=True)) > 1e-4


def test_none_on_t5_ignores_the_context_and_full_keeps_all_of_it():
    lm = tiny_model("t5")
    rows = {}
    for name in ("none", "full"):
        scores = []
        for context in ("my dog is biscuit", "my cat is pepper"):
            session = ccmem.load(lm, name, system_prompt="Hi.")
            session.add(context)
            scores.append(session.score_ids(QUERY, OPTIONS))
            rows[name] = session.memory
        assert (scores[0] == pytest.approx(scores[1], abs=1e-6)) == (name == "none")
    sink = rows["none"].sink
    assert rows["none"].num_slots == sink and rows["none"].state["encoder_out"].shape[1] == sink
    assert rows["full"].num_slots == sink + len("my cat is pepper") == rows["full"].state["encoder_out"].shape[1]


def test_an_empty_query_reads_the_memory_alone_and_nothing_at_all_is_refused():
    lm = tiny_model("t5")
    session = ccmem.load(lm, "full", system_prompt=None)
    with pytest.raises(ValueError, match="the decoder has nothing to read"):
        session.score_ids([], [[5]])
    session.add_ids([5, 6, 7])
    assert math.isfinite(session.score_ids([], [[5]])[0])


@pytest.mark.parametrize("batch_size", [1, 8])
def test_compare_on_t5_gives_finite_rows_for_every_method_that_runs_there(batch_size):
    lm = tiny_model("t5")
    examples = icl.examples(4, "test", k=2, seed=1)
    settings = EvalSettings(system="Hi.", generate=True, max_new_tokens=3, batch_size=batch_size)
    settings.method_options = {"n_tok": 2}
    rows = {r.method: r for r in compare(lm, T5_METHODS, examples, dataset="icl", settings=settings)}
    assert list(rows) == T5_METHODS
    for row in rows.values():
        assert row.accuracy is not None and 0 <= row.accuracy <= 1
        assert row.perplexity is not None and math.isfinite(row.perplexity) and row.perplexity > 1
        assert row.exact_match is not None and row.rouge_l is not None
    sink = len(to_sample(lm.tokenizer, examples[0], system="Hi.").sink)
    assert rows["none"].memory_slots == sink
    assert rows["full"].memory_slots == sink + rows["full"].context_tokens
    assert rows["ccm-concat"].memory_slots == sink + 2 * 2  # n_tok slots per demonstration
    assert rows["ccm-merge"].memory_slots == rows["gist"].memory_slots == sink + 2


def test_eval_of_an_encoder_decoder_model_equals_its_option_scores_by_hand():
    """The harness's accuracy is the choice of the decoder's summed log-likelihood, with full on T5 too."""
    lm = tiny_model("t5")
    examples = icl.examples(6, "test", k=2, seed=3)
    row = evaluate(ccmem.load(lm, "full", system_prompt="Hi."), examples, dataset="icl", settings=EvalSettings("Hi."))
    correct = 0
    for example in examples:
        session = ccmem.load(lm, "full", system_prompt="Hi.")
        sample = to_sample(lm.tokenizer, example, system="Hi.")
        for chunk in sample.chunks:
            session.add_ids(chunk)
        options = [lm.tokenizer.encode(o) for o in example.options]
        scores = session.score_ids(sample.tail[: sample.answer_start], options)
        correct += example.options[max(range(len(scores)), key=scores.__getitem__)] == example.answer
    assert row.accuracy == pytest.approx(correct / len(examples))


def test_full_refuses_stage1_finetuning_on_t5():
    with pytest.raises(NotImplementedError, match=r"stage-1 LoRA\) is for decoder-only models.*encoder-decoder"):
        get_method("full").module_for(tiny_model("t5"))


def test_ccmem_eval_runs_on_a_t5_folder(monkeypatch, capsys, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "tiny-t5"
    tiny_model("t5").model.save_pretrained(folder)
    vocab = {"<pad>": 0, "</s>": 1, "[UNK]": 2} | {f"w{i}": i + 3 for i in range(50)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.save_pretrained(folder)
    out = tmp_path / "eval.jsonl"
    code, text = run_cli(
        monkeypatch, capsys, "eval", "icl", "--model", str(folder), "--n", "2", "--k", "2",
        "--methods", "full,none,ccm-concat,gist", "--out", str(out),
    )  # fmt: skip
    assert code == 0, text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["full", "none", "ccm-concat", "gist"]
    assert all(math.isfinite(r["perplexity"]) and r["accuracy"] is not None for r in rows)
    code, text = run_cli(
        monkeypatch, capsys, "eval", "icl", "--model", str(folder), "--n", "2", "--methods", "snapkv",
        "--out", str(tmp_path / "no.jsonl"),
    )  # fmt: skip
    assert code != 0 and "works on decoder-only models" in " ".join(text.split())
