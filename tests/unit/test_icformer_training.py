"""IC-Former's data (Pile and PwC files, the offline PwC-style generator) and its presets on the training harness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ccmem.adapter import read_adapter
from ccmem.api import load
from ccmem.data import passages, pwc
from ccmem.data.loaders import load_examples
from ccmem.fileio import DatasetFormatError
from ccmem.train.config import ConfigError, DataConfig, load_config
from ccmem.train.trainer import train
from tests.conftest import tiny_model

FIXTURES = "tests/fixtures"
TINY = [
    "model=tiny",
    "method.num_query_tokens=4",
    "method.num_hidden_layers=1",
    "train.batch_size=2",
    "train.max_steps=2",
    "train.eval_steps=2",
    "train.save_steps=2",
    "train.logging_steps=1",
]


def test_pwc_and_pile_files_are_read_in_their_own_format():
    train_set = load_examples(DataConfig(dataset="pwc", path=f"{FIXTURES}/pwc", n_train=0), "train")
    assert len(train_set) == 4 and not train_set[0].chat
    first = train_set[0]
    assert first.context[0].startswith("Marie Curie") and first.query == "Summarize the text in one sentence.\n"
    assert len(load_examples(DataConfig(dataset="pwc", path=f"{FIXTURES}/pwc"), "test")) == 2
    pile = load_examples(DataConfig(dataset="pile", path=f"{FIXTURES}/pile", n_train=0), "train")
    assert len(pile) == 4 and pile[1].context[0].startswith("def parse_header")
    assert len(load_examples(DataConfig(dataset="pile", path=f"{FIXTURES}/pile"), "validation")) == 2  # val.jsonl
    answers = [r["answer"] for r in pwc.read_pwc(Path(f"{FIXTURES}/pwc/test.jsonl"))]
    assert answers == ["As early as the 7th century BC.", "In the leaves of plants."]


def test_a_pwc_file_s_unknown_fields_are_named_not_silently_dropped(tmp_path, caplog):
    """As the persona reader does: a user's ``meta`` field was ignored by eval and generate without a word."""
    path = tmp_path / "mine.jsonl"
    records = [
        {"input": "Zoë lives in Bogotá.", "prompt": "Where?", "answer": "Bogotá", "meta": {"src": "crm"}},
        {"id": "b", "input": "Tom is 40.", "prompt": "Age?", "answer": "40", "options": ["40", "14"], "unknown": 1},
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    for read in (lambda: pwc.read_pwc(path), lambda: load_examples(DataConfig(dataset="pwc", path=str(path)), "test")):
        caplog.clear()
        assert len(read()) == 2
        said = [r.getMessage() for r in caplog.records if "not part of the PwC format" in r.getMessage()]
        assert len(said) == 1 and "fields meta, unknown are not part" in said[0], said
    caplog.clear()
    pwc.read_pwc(Path(f"{FIXTURES}/pwc/test.jsonl"))
    assert not [r for r in caplog.records if "not part of the PwC format" in r.getMessage()]


def test_a_single_pwc_file_is_read_whole_for_test_and_split_for_training(tmp_path):
    records = [{"input": f"context {i}", "prompt": f"q{i}?", "answer": f"a{i}"} for i in range(40)]
    path = tmp_path / "one.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    test = load_examples(DataConfig(dataset="pwc", path=str(path), n_eval=100), "test")
    assert [e.answer for e in test] == [r["answer"] for r in records]  # every record is evaluated
    sides = [load_examples(DataConfig(dataset="pwc", path=str(path), n_train=0, n_eval=100), s)
             for s in ("train", "validation")]  # fmt: skip
    assert len(sides[0]) + len(sides[1]) == 40 and sides[1] and len(sides[1]) < len(sides[0])
    assert not {e.answer for e in sides[0]} & {e.answer for e in sides[1]}


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"input": "text", "prompt": "q?"}, "bad.jsonl:2: missing field 'answer'"),
        ({"input": "", "prompt": "q?", "answer": "a"}, "bad.jsonl:2: field 'input' must be a non-empty string"),
        ({"input": "text", "prompt": 3, "answer": "a"}, "bad.jsonl:2: field 'prompt' must be a non-empty string"),
        (
            {"input": "t", "prompt": "q?", "answer": "a", "options": ["b", "c"]},
            "bad.jsonl:2: field 'options' must contain the answer 'a'",
        ),
        ({"input": "t", "prompt": "q?", "answer": "a", "options": "a"}, "bad.jsonl:2: field 'options' must be a list"),
        ({"input": "t", "prompt": "q?", "answer": "a", "options": ["a"]}, "at least two different options"),
        ({"input": "t", "prompt": "q?", "answer": "a", "options": ["a", "b", "a"]}, "at least two different options"),
    ],
)
def test_a_bad_pwc_record_is_named_by_file_line_and_field(tmp_path, record, message):
    good = {"input": "text", "prompt": "q?", "answer": "a"}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DatasetFormatError, match=message):
        pwc.read_pwc(path)


def test_a_pile_line_without_text_is_named(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"meta": {}}) + "\n")
    with pytest.raises(DatasetFormatError, match=r"train.jsonl:2: missing field 'text'"):
        load_examples(DataConfig(dataset="pile", path=str(tmp_path)), "train")


def test_an_empty_pile_document_is_left_out_with_a_word_not_the_whole_file_refused(tmp_path, caplog):
    """One empty document (the Pile holds some) refused a whole file of them."""
    lines = [{"text": "a first document"}, {"text": "  "}, {"text": "a second document"}, {"text": 7}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines[:3]))
    read = load_examples(DataConfig(dataset="pile", path=str(tmp_path), n_train=0), "train")
    assert [e.context[0] for e in read] == ["a first document", "a second document"]
    assert "1 empty documents are left out (first: " in caplog.text and "train.jsonl:2" in caplog.text
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(DatasetFormatError, match=r"train.jsonl:4: field 'text' must be a non-empty string"):
        load_examples(DataConfig(dataset="pile", path=str(tmp_path), n_train=0), "train")


def test_the_generator_is_seeded_and_its_splits_share_no_context(tmp_path):
    a, b = pwc.generate(40, "train", seed=3), pwc.generate(40, "train", seed=3)
    assert a == b and a != pwc.generate(40, "train", seed=4)
    assert all(r["input"] and r["prompt"] and r["answer"] for r in a)
    test = pwc.generate(40, "test", seed=3)
    assert not {r["input"] for r in a} & {r["input"] for r in test}
    kinds = {r["prompt"] for r in a}
    assert len(kinds) > 4  # several kinds of prompt
    assert pwc.read_pwc(pwc.write_jsonl(test, tmp_path / "test.jsonl")) == test
    made = load_examples(DataConfig(dataset="pwc", n_train=5, seed=3), "train")  # no path: generated
    assert [e.answer for e in made] == [r["answer"] for r in a[:5]]


def test_generated_records_carry_the_answer_among_distractors_of_its_kind():
    records = pwc.generate(60, "test", seed=1)
    titles = {a["title"] for a in passages.articles()}
    for r in records:
        assert len(r["options"]) == pwc.N_OPTIONS == len(set(r["options"])) and r["answer"] in r["options"]
        if r["prompt"] in pwc.PROMPTS["title"]:
            assert set(r["options"]) <= titles
        if r["prompt"].startswith(("Which words come", "Continue the quote")):  # runs of the same article
            assert all(o in " ".join(r["input"].split()) for o in r["options"])
    assert len({r["options"].index(r["answer"]) for r in records}) == pwc.N_OPTIONS  # the answer is not always first
    examples = load_examples(DataConfig(dataset="pwc", n_train=5, seed=1), "test")
    assert all(e.options and e.answer in e.options for e in examples)


def test_reference_option_names_point_to_the_harness_keys():
    with pytest.raises(ConfigError, match=r"'max_epoch' is the IC-Former scripts' name: use 'train\.max_steps'"):
        load_config("icformer-finetune", ["max_epoch=2"])
    with pytest.raises(ConfigError, match=r"'icformer_path' is the IC-Former scripts' name: use 'init_from'"):
        load_config("icformer-finetune", ["icformer_path=x"])
    config = load_config("icformer-pretrain", [])
    assert (config.method.objective, config.method.num_query_tokens, config.train.lr) == ("pretrain", 128, 1e-4)


def test_icformer_finetune_preset_trains_two_steps_and_its_adapter_loads(tmp_path):
    config = load_config("icformer-finetune", [f"output_dir={tmp_path}", f"data.path={FIXTURES}/pwc", *TINY])
    result = train(config, lm=tiny_model(positions=512))
    assert result.steps == 2 and result.eval_loss is not None
    adapter = read_adapter(result.output)
    assert adapter.method == "icformer" and adapter.options["num_query_tokens"] == 4
    session = load(tiny_model(positions=512), "icformer", adapter=result.output, system_prompt=None)
    assert session.adapter_trained
    session.add("A short context to compress.")
    assert session.memory.num_slots == 4 + 1


def test_icformer_pretrain_preset_trains_on_the_pile_format(tmp_path):
    config = load_config(
        "icformer-pretrain",
        [f"output_dir={tmp_path}", "data.dataset=pile", f"data.path={FIXTURES}/pile", "method.max_seq_len=200", *TINY],
    )
    result = train(config, lm=tiny_model(positions=512))
    assert result.steps == 2 and read_adapter(result.output).options["objective"] == "pretrain"
    # the finetune preset on the same text: refused before training, with the objective to use (it failed at
    # step 0 with "this batch has no target tokens to train on")
    finetune = load_config(
        "icformer-finetune",
        [f"output_dir={tmp_path}/ft", "data.dataset=pile", f"data.path={FIXTURES}/pile", *TINY],
    )
    with pytest.raises(
        ConfigError, match=r"no train sample of pile has a token to train on.*method.objective=pretrain"
    ):
        train(finetune, lm=tiny_model(positions=512))


def test_a_context_over_max_seq_len_names_its_record_in_training_and_in_eval(tmp_path):
    """Training and eval said "the context has N tokens, more than max_seq_len", and not which record has it."""
    from ccmem.api import ContextTooLongError
    from ccmem.eval.harness import evaluate

    config = load_config(
        "icformer-finetune", [f"output_dir={tmp_path}", f"data.path={FIXTURES}/pwc", "method.max_seq_len=6", *TINY]
    )
    with pytest.raises(ConfigError, match=r"train example tests/fixtures/pwc/train.jsonl:\d+: the context has \d+ "
                       r"tokens, more than max_seq_len=6; set use_chunk=true"):  # fmt: skip
        train(config, lm=tiny_model(positions=512))
    session = load(tiny_model(positions=512), "icformer", system_prompt=None, num_query_tokens=4, max_seq_len=6)
    examples = load_examples(DataConfig(dataset="pwc", path=f"{FIXTURES}/pwc"), "test")
    with pytest.raises(ContextTooLongError, match=r"pwc: example tests/fixtures/pwc/test.jsonl:1 does not fit .*"
                       r"more than max_seq_len=6"):  # fmt: skip
        evaluate(session, examples, dataset="pwc", split="test")


def test_generate_answers_every_pwc_record_into_the_output_file(tmp_path):
    from ccmem.eval.generate import generate_file

    session = load(tiny_model(positions=512), "icformer", system_prompt=None, num_query_tokens=4)
    records = pwc.read_pwc(Path(f"{FIXTURES}/pwc/test.jsonl"))
    rows = generate_file(session, records, tmp_path / "out" / "answers.jsonl", max_new_tokens=5)
    written = [json.loads(line) for line in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert written == rows and [r["answer"] for r in rows] == [r["answer"] for r in records]
    assert all(0 <= r["rouge_l"] <= 1 and r["memory_slots"] == 4 + 1 for r in rows)
    assert [r["id"] for r in rows] == [0, 1]  # the fixture's records carry no id: their place in the file


def test_generate_refuses_a_record_too_long_before_answering_any(tmp_path, monkeypatch):
    from ccmem.eval import generate

    session = load(tiny_model(positions=512), "icformer", system_prompt=None, num_query_tokens=4, max_seq_len=40)
    answered = []
    monkeypatch.setattr(session, "stream_ids", lambda *a, **kw: answered.append(1) or iter([5, 6]))
    ok = {"input": "w1 w2 w3", "prompt": "w4", "answer": "w5"}
    records = [ok | {"id": "q-17"}, ok | {"id": 3}, ok | {"input": "w " * 60}]  # the last: over max_seq_len
    with pytest.raises(ValueError, match=r"record 3 \(id 2\): .*max_seq_len=40") as refused:
        generate.generate_file(session, records, tmp_path / "answers.jsonl", max_new_tokens=2)
    assert not answered and not (tmp_path / "answers.jsonl").exists() and "answers before it" not in str(refused.value)


def test_generate_keeps_record_ids_and_the_answers_before_a_record_that_fails(tmp_path, monkeypatch):
    from ccmem.eval import generate

    session = load(tiny_model(positions=512), "icformer", system_prompt=None, num_query_tokens=4, max_seq_len=40)
    ok = {"input": "w1 w2 w3", "prompt": "w4", "answer": "w5"}
    records = [ok | {"id": "q-17"}, ok | {"id": 3}, ok | {"input": "w " * 60}]  # the last: over max_seq_len
    monkeypatch.setattr(generate, "_length", lambda tokenizer, record: -len(record["input"]))  # the check misses it
    with pytest.raises(ValueError, match=r"record 3 \(id 2\): .*max_seq_len=40.*\(the 2 answers before it are in"):
        generate.generate_file(session, records, tmp_path / "answers.jsonl", max_new_tokens=2)
    written = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [r["id"] for r in written] == ["q-17", 3]


def test_pile_documents_are_evaluated_as_continuations(monkeypatch, capsys, tmp_path, tiny_model_dir):
    from tests.unit.test_cli import run_cli

    examples = pwc.pile(Path(f"{FIXTURES}/pile/train.jsonl"), "test")  # a single file: all of it tests
    records = [json.loads(line)["text"] for line in Path(f"{FIXTURES}/pile/train.jsonl").read_text().splitlines()]
    assert len(examples) == len(records)
    for e, text in zip(examples, records, strict=True):
        assert text.startswith(e.context[0] + e.query + e.answer) and e.answer.strip() and not e.options
        assert len(e.context[0]) <= pwc.PILE_CONTEXT_CHARS and len(e.answer) <= pwc.PILE_ANSWER_CHARS
    out = tmp_path / "rows.jsonl"
    code, text = run_cli(monkeypatch, capsys, "eval", "pile", "--path", f"{FIXTURES}/pile/train.jsonl", "--model",
                         str(tiny_model_dir), "--methods", "none,full", "--n", "4", "--out", str(out))  # fmt: skip
    assert code == 0, text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["none", "full"] and all(r["perplexity"] > 1 for r in rows)
    assert all(r["examples"] == 4 and r["accuracy"] is None for r in rows)


def test_pile_documents_too_short_to_score_are_left_out_with_a_warning(tmp_path, caplog):
    """They were dropped silently: `ccmem eval pile --n 100` on short documents scored fewer with no word why."""
    lines = [{"text": "one two three four five six seven eight nine ten " * 4}, {"text": "too short"}, {"text": "x"}]
    path = tmp_path / "pile.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with caplog.at_level("WARNING", logger="ccmem.data.pwc"):
        examples = pwc.pile(path, "test")
    assert len(examples) == 1
    assert "2 of 3 documents are too short" in caplog.text and f"{path}:2" in caplog.text


def test_continuations_without_a_query_are_scored_and_documents_without_an_answer_refused(tmp_path):
    """``ccmem eval pretrain``: the next segment has no query before it (its first token is read as one); a pile
    document of the training split has no answer at all (said, not a torch error)."""
    from ccmem.eval.harness import evaluate

    session = load(tiny_model(positions=2048), "full", system_prompt=None)
    every = load_examples(DataConfig(dataset="pretrain", path=f"{FIXTURES}/pretrain", k=2), "train")
    examples = [e for e in every if e.query == ""][:3]  # the plain-text documents' (the dialogs have a query)
    assert len(examples) == 3
    row = evaluate(session, examples, dataset="pretrain", split="train")
    assert row.perplexity is not None and row.perplexity > 1 and row.examples == 3
    documents = pwc.pile(Path(f"{FIXTURES}/pile/train.jsonl"), "train")
    with pytest.raises(ValueError, match=r"has no answer to score .*--split test"):
        evaluate(session, documents, dataset="pile", split="train")


def test_eval_of_an_empty_split_is_refused_before_the_model_loads(monkeypatch, capsys, tmp_path):
    from tests.unit.test_cli import run_cli

    (tmp_path / "test.jsonl").write_text("")
    code, text = run_cli(monkeypatch, capsys, "eval", "pwc", "--path", str(tmp_path), "--model", "no-such-model")
    assert code == 2 and "pwc has no test example at" in " ".join(text.split()) and "no-such-model" not in text


def test_ccmem_generate_command_writes_the_output_file(monkeypatch, capsys, tmp_path, tiny_model_dir):
    from tests.unit.test_cli import run_cli

    test_file = tmp_path / "test.jsonl"
    pwc.write_jsonl([{"input": "w1 w2 w3 w4 w5", "prompt": "w6 w7", "answer": "w8"}] * 2, test_file)
    out = tmp_path / "answers.jsonl"
    code, text = run_cli(
        monkeypatch, capsys, "generate", str(test_file), "--model", str(tiny_model_dir), "--method", "icformer",
        "-O", "num_query_tokens=2", "--max-new-tokens", "3", "-o", str(out),
    )  # fmt: skip
    assert code == 0, text
    assert "2 answers" in text and len(out.read_text().splitlines()) == 2
    (tmp_path / "empty.jsonl").write_text("")
    code, text = run_cli(monkeypatch, capsys, "generate", str(tmp_path / "empty.jsonl"), "--model", "no-such-model")
    assert code == 2 and "empty.jsonl holds no record" in " ".join(text.split())
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input": "w1", "prompt": "w2"}) + "\n")
    code, text = run_cli(monkeypatch, capsys, "generate", str(bad), "--model", str(tiny_model_dir))
    assert code != 0 and "bad.jsonl:1: missing field 'answer'" in " ".join(text.split())


def test_ccmem_data_pwc_writes_the_generated_records_that_eval_and_train_read(monkeypatch, capsys, tmp_path):
    """`ccmem generate` needs a PwC file, and eval's help sends users to `ccmem data` for the generated datasets,
    but `ccmem data pwc` was 'unknown generator': the offline PwC-style data could not be written to files."""
    from tests.unit.test_cli import run_cli

    code, text = run_cli(monkeypatch, capsys, "data", "pwc", "-o", str(tmp_path), "--n-train", "6", "--n-test", "3")
    assert code == 0, text
    assert "pwc-wiki-v1" in text
    for split, n in (("train", 6), ("validation", 3), ("test", 3)):
        written = pwc.read_pwc(tmp_path / f"{split}.jsonl")
        assert written == pwc.generate(n, split), split  # the records eval and training generate with this seed
    examples = load_examples(DataConfig(dataset="pwc", path=str(tmp_path)), "test")
    assert [e.answer for e in examples] == [e.answer for e in pwc.generated(3, "test")]
    code, text = run_cli(monkeypatch, capsys, "data", "pwc", "-o", str(tmp_path / "k"), "--k", "2")
    assert code == 2 and "a pwc record holds one or two articles" in " ".join(text.split())


def test_max_epoch_and_save_interval_count_contexts_per_optimizer_step_with_grad_accum(tmp_path):
    """A step is one optimizer update, batch_size x grad_accum contexts; --show-keys divided by batch_size alone,
    so save_interval and max_epoch came out grad_accum times too many contexts apart."""
    from ccmem.train.config import REFERENCE_KEYS

    for key in ("max_epoch", "save_interval"):
        assert "(train.batch_size x train.grad_accum)" in REFERENCE_KEYS[key][1], key
    steps = ["train.batch_size=1", "train.grad_accum=2", "train.eval_steps=1", "train.save_steps=1"]
    config = load_config("icformer-finetune", [f"output_dir={tmp_path}", f"data.path={FIXTURES}/pwc", *TINY, *steps])
    result = train(config, lm=tiny_model(positions=512))
    log = [json.loads(line) for line in (result.output.parent / "log.jsonl").read_text().splitlines()]
    # 4 training contexts: epochs x n_train / (batch_size x grad_accum) = 1 x 4 / (1 x 2) = 2 steps make one epoch
    assert [row["epoch"] for row in log if "eval_loss" in row] == [0.5, 1.0]
