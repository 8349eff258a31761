"""The offline persona-fact generator: seeded, held-out values, strict loader, training samples."""

from __future__ import annotations

import json

import pytest

from ccmem.data.persona import FACTS, SPLITS, DatasetFormatError, generate, read_jsonl, split_values, write_jsonl
from ccmem.data.samples import chat_sample
from tests.conftest import TinyTokenizer


def test_same_seed_same_dialogs_and_other_seed_differs(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", generate(20, "train", seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", generate(20, "train", seed=1))
    c = write_jsonl(tmp_path / "c.jsonl", generate(20, "train", seed=2))
    assert a.read_text() == b.read_text() != c.read_text()


def test_test_dialogs_ask_only_values_never_seen_in_training():
    train_values = {w.strip(".") for d in generate(300, "train") for turn in d.turns for w in turn[0].split()}
    for dialog in generate(100, "test"):
        assert dialog.answer not in train_values
        assert dialog.answer in dialog.options and len(set(dialog.options)) == 4
        assert any(dialog.answer in user for user, _ in dialog.turns)
    for kind in FACTS.values():
        assert not set(split_values(kind, "test")) & set(split_values(kind, "train"))


def test_roundtrip_and_errors_name_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", generate(3, "test"))
    assert [d.answer for d in read_jsonl(path)] == [d.answer for d in generate(3, "test")]
    lines = path.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["options"] = "Biscuit"
    path.write_text("\n".join([lines[0], json.dumps(bad)]) + "\n")
    with pytest.raises(DatasetFormatError, match=r"d\.jsonl:2: field 'options' must be a list"):
        read_jsonl(path)
    path.write_text("{not json\n")
    with pytest.raises(DatasetFormatError, match=r"d\.jsonl:1: not valid JSON"):
        read_jsonl(path)
    path.write_text(json.dumps(json.loads(lines[0]), indent=2) + "\n")  # pretty-printed: the usual mistake
    with pytest.raises(DatasetFormatError, match=r"d\.jsonl:1: not valid JSON .*one whole object per line"):
        read_jsonl(path)
    records = [json.loads(line) for line in lines]
    for listed in (json.dumps(records), json.dumps(records, indent=2)):  # a JSON list, as many tools export
        path.write_text(listed)
        assert [d.answer for d in read_jsonl(path)] == [d.answer for d in generate(3, "test")]
    path.write_text(json.dumps(records[0]) + "\n" + json.dumps(records[1:]) + "\n")
    with pytest.raises(DatasetFormatError, match=r"d\.jsonl:2: .*got list \(one object per line, or the whole"):
        read_jsonl(path)
    path.write_text(json.dumps([records[0], "x"]))
    with pytest.raises(DatasetFormatError, match=r"d\.jsonl: item 2: expected a JSON object, got str"):
        read_jsonl(path)
    # found when the file is read, not after the model loaded and earlier methods ran
    for change, message in [
        ({"answer": "", "options": ["", "x"]}, "field 'answer' is empty"),
        ({"options": [3, 4], "answer": "3"}, r"field 'options' must be a list of non-empty strings, got \[3, 4\]"),
        ({"answer": "Oslo "}, r"field 'answer' \('Oslo '\) is not one of 'options'"),
        ({"turns": [["hi"]]}, r"field 'turns' must hold \[user, assistant\] string pairs \(turn 1 .*or chat messages"),
        ({"options": ["Oslo"], "answer": "Oslo"}, "field 'options' must hold at least two different options"),
        ({"options": ["Oslo", "Oslo", "Rome"], "answer": "Oslo"}, "field 'options' must hold at least two"),
        (
            {"turns": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]},
            r"field 'turns' given as messages must alternate user and assistant .*\['user', 'user'\]",
        ),
        (  # which turn, and what to do with an unanswered last one
            {"turns": [["I live in Oslo.", "Nice!"], ["Anyway."]]},
            r"field 'turns' must hold .* pairs \(turn 2 is \[\"Anyway\.\"\]; an unanswered last user turn needs",
        ),
        (
            {"turns": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hi"}]},
            r"field 'turns' given as messages .*roles here: \['system', 'user'\]\); a system message is not part",
        ),
        ({"options": None} | {"answer": 42}, r"field 'answer' must be a str, got 42 \(write it as \"42\"\)"),
    ]:
        path.write_text(json.dumps({**json.loads(lines[0]), **change}) + "\n")
        with pytest.raises(DatasetFormatError, match=rf"d\.jsonl:1: {message}"):
            read_jsonl(path)
    record = json.loads(lines[0])
    path.write_text(json.dumps({k: v for k, v in record.items() if k != "options"}) + "\n")
    with pytest.raises(DatasetFormatError, match=r"d\.jsonl:1: field 'options' is missing; every record needs"):
        read_jsonl(path)
    # chat logs in OpenAI's message shape read as the same pairs, whatever the case of their roles

    roles = ("user", "assistant")
    messages = [{"role": r, "content": t} for pair in record["turns"] for r, t in zip(roles, pair, strict=True)]
    path.write_text(json.dumps({**record, "turns": messages}) + "\n")
    assert read_jsonl(path)[0].turns == [tuple(pair) for pair in record["turns"]]
    path.write_text(json.dumps({**record, "turns": [m | {"role": m["role"].title()} for m in messages]}) + "\n")
    assert read_jsonl(path)[0].turns == [tuple(pair) for pair in record["turns"]]


def test_fields_the_format_does_not_have_are_named_as_ignored(tmp_path, caplog):
    """A per-record system prompt was dropped without a word."""
    path = write_jsonl(tmp_path / "d.jsonl", generate(2, "test"))
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[1] |= {"system": "You are a pirate.", "source": "chat log"}
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert len(read_jsonl(path)) == 2
    assert "fields source, system are not part of the persona format and were ignored" in caplog.text


def test_optional_fields_written_as_null_are_absent(tmp_path, caplog):
    """pandas writes a gap as null: "id": null named two records 'None' (said as a repeated id), and
    "groups": null was refused as not mapping names to strings."""
    path = tmp_path / "mine.jsonl"
    record = {"turns": [], "question": "Q?", "answer": "b", "options": ["a", "b"], "id": None, "groups": None}
    path.write_text(json.dumps(record) + "\n" + json.dumps(record | {"id": 7}) + "\n")
    dialogs = read_jsonl(path)
    assert [d.id for d in dialogs] == ["line-1", "7"] and dialogs[0].groups == {}
    assert "more than once" not in caplog.text


def test_an_answer_that_differs_from_its_option_only_in_unicode_form_is_said(tmp_path):
    """'Zoë' typed on a Mac (NFD) against the option 'Zoë' (NFC) was refused as 'not one of options' while both
    printed the same."""
    path = tmp_path / "mine.jsonl"
    record = {"turns": [], "question": "Name?", "answer": "Zoe\u0308", "options": ["Zo\u00eb", "Chlo\u00e9"]}
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DatasetFormatError, match=r"mine.jsonl:1: .*looks like option 'Zo\u00eb'.*the other NFD"):
        read_jsonl(path)


def test_chat_sample_labels_only_the_answer():
    tok = TinyTokenizer()
    sample = chat_sample(tok, [("I live in Oslo.", "Noted!")], "Where do I live?", "Oslo", system="Be brief.")
    assert sample.sink == tok.encode("System: Be brief.\n")
    assert sample.chunks == [tok.encode("User: I live in Oslo.\nAssistant: Noted!\n")]
    question = tok.encode("User: Where do I live?\nAssistant:")
    assert sample.tail[: sample.answer_start] == question
    # no chat template: the answer follows "Assistant:" after a space, as in every rendered turn; it ends with EOS,
    # since this tokenizer cannot write the line break that ends a turn (test_real_model: one that can ends there)
    assert sample.tail[sample.answer_start :] == [*tok.encode(" Oslo"), tok.eos_token_id]


def test_chat_sample_tokenizes_exactly_like_inference():
    from ccmem.api import CompressedLM
    from ccmem.registry import get_method
    from tests.conftest import tiny_model

    turns = [("I live in Oslo.", "Noted!"), ("I work as a pilot.", "Cool.")]
    sample = chat_sample(TinyTokenizer(), turns, "Where do I live?", "Oslo", system="Be brief.")
    session = CompressedLM(tiny_model(), get_method("full"), system_prompt="Be brief.")
    for user, assistant in turns:
        session.remember(user, assistant)
    assert session.memory.next_position == len(sample.sink) + sum(len(c) for c in sample.chunks)
    assert session.query_ids("Where do I live?")[0].tolist() == sample.tail[: sample.answer_start]


def test_small_talk_and_fact_ranges_and_the_validation_split():
    from ccmem.data.persona import SMALL_TALK

    chatter = {u for u, _ in SMALL_TALK}
    dialogs = list(generate(200, "train", facts_per_dialog=(1, 3), small_talk=(0, 2)))
    facts = [sum(u not in chatter for u, _ in d.turns) for d in dialogs]
    talk = [sum(u in chatter for u, _ in d.turns) for d in dialogs]
    assert set(facts) == {1, 2, 3} and set(talk) == {0, 1, 2}
    exact = list(generate(20, "test", facts_per_dialog=3, small_talk=2))
    assert all(len(d.turns) == 5 for d in exact)
    values = {split: {v for k in FACTS.values() for v in split_values(k, split)} for split in SPLITS}
    assert not values["train"] & values["validation"] and not values["validation"] & values["test"]
    for split in SPLITS:  # answers and every option come from the split's own values
        assert all({d.answer, *d.options} <= values[split] for d in generate(50, split, facts_per_dialog=(1, 7)))
    with pytest.raises(ValueError, match=r"small_talk must be a number or a \(min, max\) range"):
        next(generate(1, "train", small_talk=(2, 1)))


def test_the_cli_prints_a_format_error_whole(monkeypatch, capsys, tmp_path):
    """The console read '[user, assistant]' in the message as markup and dropped it: 'must hold  string pairs'."""
    from tests.unit.test_cli import run_cli

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"turns": [["hi"]], "question": "q?", "answer": "a", "options": ["a", "b"]}) + "\n")
    code, text = run_cli(monkeypatch, capsys, "eval", "dialogs", "--path", str(path), "--methods", "none")
    assert code == 2 and "must hold [user, assistant] string pairs" in " ".join(text.split())


def test_a_group_that_is_not_a_string_is_named_with_its_value(tmp_path):
    """'field groups must map names to strings' named neither the grouping at fault nor its value."""
    path = tmp_path / "mine.jsonl"
    record = {"turns": [], "question": "Q?", "answer": "b", "options": ["a", "b"], "groups": {"kind": "x", "hops": 3}}
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DatasetFormatError, match=r"mine.jsonl:1: .*'hops' is int 3 \(write it as a string: \"3\"\)"):
        read_jsonl(path)
    path.write_text(json.dumps(record | {"groups": ["kind", "x"]}) + "\n")
    with pytest.raises(DatasetFormatError, match=r"e\.g\. \{\"distance\": \"2-4\"\}; got list \['kind', 'x'\]"):
        read_jsonl(path)
