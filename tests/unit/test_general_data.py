"""The general training data: template files, varied fact dialogs, passage QA and mixtures."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ccmem.data import dialogs, passages
from ccmem.data.loaders import MixtureError, data_version, load_examples
from ccmem.data.templates import DEFAULT_FILE, TemplateError, parse_templates
from ccmem.train.config import ConfigError, DataConfig, load_config

SMALL = """\
ack: Got it.
ack: Thanks!
lead: Long day today.
tail: Anyway, how are you?
kind: city
values: Lisbon | Oslo | Nairobi | Lima | Osaka | Denver | Krakow | Hanoi | Dublin | Cairo | Porto | Bergen
say: I live in {value}.
say: Home for me is {value} these days.
say@validation: My flat is in {value}.
say@test: These days I wake up in {value}.
fix: Actually, I moved to {value}; I left {old}.
fix@validation: Scratch that, I live in {value} now.
fix@test: Update: {value} is home now, not {old}.
ask: In which city do I live?
ask@validation: Where is my home?
ask@test: Which city am I based in?
answer: You live in {value}.
answer@test: You are based in {value}.
kind: pet @test
values: Biscuit | Max | Luna | Rocky | Pepper | Mochi
say: My dog is called {value}.
ask: What is my dog's name?
"""


def write(tmp_path: Path, text: str, name: str = "facts.txt") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_small_bank_parses_with_splits_and_held_out_kind(tmp_path):
    bank = parse_templates(write(tmp_path, SMALL))
    city, pet = bank.kinds["city"], bank.kinds["pet"]
    assert [t.text for t in city.for_split("say", "train")] == [
        "I live in {value}.",
        "Home for me is {value} these days.",
    ]
    assert [t.text for t in city.for_split("say", "test")] == ["These days I wake up in {value}."]
    assert pet.held_out and pet.for_split("say", "train") == [] and len(pet.for_split("say", "test")) == 1
    assert [k.name for k in bank.kinds_for("train")] == ["city"]
    assert [k.name for k in bank.kinds_for("test")] == ["city", "pet"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("say: I live in {town}.", "unknown placeholder {town}"),
        ("ask: Where is {value}?", "unknown placeholder {value}"),
        ("say: I live here.", "must contain {value} exactly once"),
        ("say@later: I live in {value}.", "unknown split '@later'"),
        ("sya: I live in {value}.", "unknown key 'sya'"),
        ("say: I live in {value.", "unbalanced brace"),
    ],
)
def test_bad_template_line_names_file_line_and_problem(tmp_path, line, message):
    lines = SMALL.splitlines()
    at = lines.index("ask: In which city do I live?")
    lines.insert(at, line)
    path = write(tmp_path, "\n".join(lines))
    with pytest.raises(TemplateError, match=message) as err:
        parse_templates(path)
    assert f"{path}:{at + 1}:" in str(err.value)


def test_test_split_sharing_a_training_wording_is_refused(tmp_path):
    text = SMALL.replace("say@test: These days I wake up in {value}.", "say@test: I live in {value}.")
    with pytest.raises(TemplateError, match="also used by the train split"):
        parse_templates(write(tmp_path, text))


def test_kind_without_a_test_question_is_refused(tmp_path):
    with pytest.raises(TemplateError, match="no ask@test template"):
        parse_templates(write(tmp_path, SMALL.replace("ask@test: Which city am I based in?\n", "")))


def test_packaged_templates_are_valid_and_varied():
    bank = parse_templates(DEFAULT_FILE)
    seen = [k for k in bank.kinds.values() if not k.held_out]
    held = [k for k in bank.kinds.values() if k.held_out]
    assert len(seen) >= 15 and len(held) >= 3
    for kind in seen:
        assert len(kind.for_split("say", "train")) >= 4, kind.name
        assert kind.for_split("say", "test") and kind.for_split("ask", "test"), kind.name
        assert len(dialogs.split_values(kind, "test")) >= 5, kind.name


def test_dialog_splits_share_no_values_wordings_or_held_out_kinds():
    bank = parse_templates(DEFAULT_FILE)

    def answered_from(dialog, split):
        """Kinds whose ``split`` values (bare or in an answer sentence) give this dialog's answer."""
        return {
            k.name
            for k in bank.kinds.values()
            for v in dialogs.split_values(k, split)
            if dialog.answer == v or any(t.render(value=v) == dialog.answer for t in k.templates["answer"])
        }

    questions = {
        split: {t.text for k in bank.kinds.values() for t in k.for_split("ask", split)} for split in dialogs.SPLITS
    }
    train = list(dialogs.generate(300, "train", seed=1))
    test = list(dialogs.generate(300, "test", seed=1))
    assert all(answered_from(d, "test") for d in test)
    assert not any(answered_from(d, "test") for d in train)  # no test value is ever a training answer
    assert {d.question for d in train} <= questions["train"]
    assert {d.question for d in test} <= questions["test"] and not questions["train"] & questions["test"]
    held_out = {k.name for k in bank.kinds.values() if k.held_out}
    assert any(answered_from(d, "test") & held_out for d in test)
    assert any(d.groups["kind"] == "held-out" for d in test)
    assert all(d.groups["kind"] == "seen" for d in train)


def test_dialogs_are_deterministic_and_follow_the_requested_shape():
    a = list(dialogs.generate(50, "train", seed=3, facts=(1, 6), turns=(1, 20)))
    b = list(dialogs.generate(50, "train", seed=3, facts=(1, 6), turns=(1, 20)))
    assert a == b
    assert all(1 <= len(d.turns) <= 20 for d in a) and max(len(d.turns) for d in a) >= 15
    fixed = list(dialogs.generate(20, "test", seed=0, facts=(1, 4), turns=10))
    assert all(len(d.turns) == 10 for d in fixed)
    assert all(d.answer in d.options and len(set(d.options)) == len(d.options) for d in a + fixed)


def test_corrections_ask_for_the_new_value_and_offer_the_old_one():
    found = [
        d
        for d in dialogs.generate(200, "train", seed=0, corrections=1.0, turns=(4, 12))
        if d.groups["corrected"] == "yes"
    ]
    assert len(found) > 10
    for d in found:
        assert len(set(d.options)) >= 2 and d.answer in d.options


def test_distance_counts_turns_since_the_asked_fact():
    for d in dialogs.generate(100, "validation", seed=0):
        assert d.groups["distance"] in {label for _, _, label in dialogs.DISTANCE_BUCKETS}


def test_passage_questions_can_only_be_answered_from_the_shared_articles():
    chats = passages.generate(40, "test", k=3)
    for chat in chats:
        assert len(chat.turns) == 3 and chat.answer in chat.options and len(chat.options) == 5
        shared = "\n".join(u for u, _ in chat.turns)
        if chat.groups["asks"] == "title":
            assert chat.answer in shared
    train_titles = {u.split("\n\n", 1)[1].split(":")[0] for c in passages.generate(200, "train") for u, _ in c.turns}
    test_titles = {u.split("\n\n", 1)[1].split(":")[0] for c in chats for u, _ in c.turns}
    assert not train_titles & test_titles


def test_mixture_shares_examples_by_weight_and_reports_versions():
    cfg = DataConfig(dataset="mixture", mixture={"dialogs": 0.5, "icl": 0.25, "passages": 0.25}, n_train=40)
    found = load_examples(cfg, "train")
    tasks = [e.task for e in found]
    assert tasks.count("dialogs") == 20 and tasks.count("icl") == 10 and tasks.count("passages") == 10
    assert tasks != sorted(tasks)  # shuffled together
    assert data_version(cfg) == "dialogs-v1:0.5+icl-v1:0.25+passages-v1:0.25"
    with_pwc = load_examples(DataConfig(dataset="mixture", mixture={"persona": 0.5, "pwc": 0.5}, n_train=8), "train")
    assert sorted(e.task for e in with_pwc) == ["persona"] * 4 + ["pwc"] * 4  # IC-Former's data mixes in too


def test_mixture_family_without_data_is_refused(tmp_path):
    only_held_out = write(tmp_path, "ack: Ok.\n" + SMALL[SMALL.index("kind: pet @test") :])
    cfg = DataConfig(dataset="mixture", mixture={"dialogs": 1.0, "icl": 0.5}, templates=str(only_held_out))
    with pytest.raises(
        MixtureError, match=r"family 'dialogs' has weight 1.0 but no data: .* no fact kind for the train"
    ):
        load_examples(cfg, "train")
    assert load_examples(cfg, "test")  # the held-out kind makes test dialogs
    with pytest.raises(ConfigError, match="unknown family 'chats'"):
        load_config("persona-ccm-concat", ["data.dataset=mixture", "data.mixture={chats: 1.0}"])
    with pytest.raises(ConfigError, match=r"needs data\.mixture"):
        load_config("persona-ccm-concat", ["data.dataset=mixture"])


def test_mixture_weight_on_the_command_line_is_a_mapping():
    config = load_config("persona-ccm-concat", ["data.dataset=mixture", "data.mixture={dialogs: 0.7, text: 0.3}"])
    assert config.data.mixture == {"dialogs": 0.7, "text": 0.3}
    with pytest.raises(ConfigError, match=r"data\.mixture\.text must be float"):
        load_config("persona-ccm-concat", ["data.dataset=mixture", "data.mixture={dialogs: 0.7, text: lots}"])


def test_mixture_family_settings_reach_that_family_only():
    mixture = {"dialogs": 0.5, "persona": 0.5}
    default = load_examples(DataConfig(dataset="mixture", mixture=mixture, n_train=120), "train")
    config = load_config(
        "persona-ccm-concat",
        ["data.dataset=mixture", "data.mixture={dialogs: 0.5, persona: 0.5}", "data.families={dialogs: {turns: 40}}"],
    )
    assert config.data.families == {"dialogs": {"turns": 40}}
    longer = load_examples(dataclasses.replace(config.data, n_train=120), "train")
    turns = {
        most: [len(e.context) for e in found if e.task == "dialogs"]
        for most, found in (("20", default), ("40", longer))
    }
    assert max(turns["20"]) <= 20 < max(turns["40"]) <= 40  # the generator's default is 1-20 turns
    persona = [[len(e.context) for e in found if e.task == "persona"] for found in (default, longer)]
    assert persona[0] == persona[1]  # the other family is drawn as before


def test_min_turns_trains_on_long_dialogs_only_and_leaves_the_test_split_alone():
    """data.min_turns (and a mixture's families.dialogs.min_turns): training and validation dialogs have at least
    that many turns, so most questions ask about facts many turns back; test dialogs keep exactly data.turns."""
    config = DataConfig(dataset="dialogs", n_train=60, n_eval=20, turns=16, min_turns=12)
    for split in ("train", "validation"):
        lengths = [len(e.context) for e in load_examples(config, split)]
        assert min(lengths) >= 12 and max(lengths) <= 16
    assert {len(e.context) for e in load_examples(config, "test")} == {16}
    default = [len(e.context) for e in load_examples(dataclasses.replace(config, min_turns=0), "train")]
    assert min(default) < 12  # without it, 1..turns
    mixed = load_config(
        "persona-ccm-concat",
        [
            "data.dataset=mixture",
            "data.mixture={dialogs: 0.5, persona: 0.5}",
            "data.families={dialogs: {turns: 30, min_turns: 25}}",
            "data.n_train=60",
        ],
    )
    found = load_examples(mixed.data, "train")
    assert min(len(e.context) for e in found if e.task == "dialogs") >= 25
    assert min(len(e.context) for e in found if e.task == "persona") < 25  # another family's own lengths


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["data.dataset=dialogs", "data.turns=10", "data.min_turns=12"], r"data\.min_turns \(12\) must not exceed"),
        (["data.dataset=dialogs", "data.min_turns=24"], r"data\.turns \(0, that is 20\)"),
        (["data.dataset=dialogs", "data.min_turns=-1"], r"data\.min_turns must not be negative"),
        (
            ["data.dataset=mixture", "data.mixture={dialogs: 1.0}", "data.families={dialogs: {min_turns: 30}}"],
            r"data\.families\.dialogs: min_turns \(30\) must not exceed turns \(20\)",
        ),
        (  # the mixture's dialogs keep their family's own min_turns: a top-level one was silently ignored
            ["data.dataset=mixture", "data.mixture={dialogs: 1.0}", "data.min_turns=15"],
            r"set data\.families=\{dialogs: \{min_turns: N\}\} instead",
        ),
        (["data.dataset=persona", "data.min_turns=5"], r"generated dialogs; dataset 'persona' has none"),
        (["data.dataset=dialogs", "data.path=x.jsonl", "data.min_turns=5"], r"data\.path is read as written"),
        (
            ["data.dataset=mixture", "data.mixture={dialogs: 0.5, text: 0.5}", "data.families={text: {min_turns: 5}}"],
            r"data\.families\.text\.min_turns: only the dialogs family reads min_turns",
        ),
    ],
)
def test_min_turns_above_the_most_turns_is_refused_before_training(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("persona-ccm-concat", overrides)


@pytest.mark.parametrize(
    ("families", "match"),
    [
        ("{chats: {turns: 30}}", r"'chats' is not in data\.mixture"),
        ("{dialogs: {length: 30}}", r"data\.families\.dialogs: unknown setting 'length'; settings: k, turns"),
        ("{dialogs: {turns: 0}}", r"data\.families\.dialogs\.turns must be at least 1, got 0"),
        ("{dialogs: {turns: many}}", r"data\.families\.dialogs\.turns must be int"),
    ],
)
def test_bad_family_settings_are_refused_by_name(families, match):
    with pytest.raises(ConfigError, match=match):
        load_config(
            "persona-ccm-concat", ["data.dataset=mixture", "data.mixture={dialogs: 1.0}", f"data.families={families}"]
        )


def test_family_settings_without_a_mixture_are_refused():
    with pytest.raises(ConfigError, match=r"data\.families sets families of a mixture"):
        load_config("persona-ccm-concat", ["data.families={persona: {k: 2}}"])


def test_data_command_writes_dialogs_the_loader_reads_back_and_names_a_bad_template_line(monkeypatch, capsys, tmp_path):
    from tests.unit.test_cli import run_cli

    code, text = run_cli(monkeypatch, capsys, "data", "dialogs", "-o", str(tmp_path / "d"), "--n-train", "12",
                         "--n-test", "4", "--turns", "6")  # fmt: skip
    assert code == 0 and "dialogs-v1" in text
    test = load_examples(DataConfig(dataset="dialogs", path=str(tmp_path / "d")), "test")
    assert len(test) == 4 and all(len(e.context) == 6 and e.groups["distance"] for e in test)
    bad = write(tmp_path, SMALL.replace("say: I live in {value}.", "say: I live in {town}."))
    code, text = run_cli(monkeypatch, capsys, "data", "dialogs", "-o", str(tmp_path / "e"), "--templates", str(bad))
    assert code != 0 and f"{bad}:7: unknown placeholder {{town}}" in " ".join(text.split())
    assert "Traceback" not in text


def test_data_command_min_turns_writes_long_training_dialogs_and_refuses_what_it_cannot_do(
    monkeypatch, capsys, tmp_path
):
    from tests.unit.test_cli import run_cli

    code, text = run_cli(monkeypatch, capsys, "data", "dialogs", "-o", str(tmp_path / "d"), "--n-train", "20",
                         "--n-test", "4", "--turns", "10", "--min-turns", "8")  # fmt: skip
    assert code == 0
    train = load_examples(DataConfig(dataset="dialogs", path=str(tmp_path / "d")), "train")
    assert min(len(e.context) for e in train) >= 8
    for args, says in (
        (["persona", "--min-turns", "3"], "--min-turns sets the length of dialogs; 'persona' does not read it"),
        (["dialogs", "--turns", "5", "--min-turns", "6"], "--min-turns (6) must not exceed --turns (5)"),
    ):
        code, text = run_cli(monkeypatch, capsys, "data", *args, "-o", str(tmp_path / "x"))
        assert code != 0 and says in " ".join(text.replace("│", " ").split()) and "Traceback" not in text
        assert not (tmp_path / "x").exists()


SHARED = """\
include: facts.txt
kind: parents_city
values: Quito | Tartu | Nagoya | Rabat | Perth | Graz | Leeds | Cusco | Fargo | Sapporo | Split | Ghent
say: My parents live in {value}.
say@validation: Mum and dad are in {value}.
say@test: My folks settled in {value}.
ask: Where do my parents live?
ask@validation: Which city are my parents in?
ask@test: Remind me where my folks live.
kind: colleague_city
values: Quito | Tartu | Nagoya | Rabat | Perth | Graz | Leeds | Cusco | Fargo | Sapporo | Split | Ghent
say: My colleague works from {value}.
say@validation: My coworker is based in {value}.
say@test: The colleague I sit next to on calls is in {value}.
ask: Where does my colleague work?
ask@validation: Which city is my coworker based in?
ask@test: Where is my colleague based again?
"""


def test_include_adds_another_files_kinds_and_globals_first(tmp_path):
    write(tmp_path, SMALL)
    bank = parse_templates(write(tmp_path, SHARED, "wide.txt"))
    assert list(bank.kinds) == ["city", "pet", "parents_city", "colleague_city"]
    assert bank.acks == ["Got it.", "Thanks!"] and bank.path == tmp_path / "wide.txt"
    assert bank.kinds["city"].where.startswith(f"{tmp_path / 'facts.txt'}:")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("include: missing.txt\n" + SMALL, "no template file missing.txt to include"),
        ("include: self.txt\n" + SMALL, "includes itself"),
        (SMALL + "include: facts.txt\n", "must come before the first 'kind:' line"),
        ("include: facts.txt\n" + SMALL, "kind 'city' is defined twice"),
        ("include: facts.txt\ninclude: ./facts.txt\nkind: x @test\n", "self.txt:2: ./facts.txt is already included"),
    ],
)
def test_bad_include_is_refused_by_line(tmp_path, text, message):
    write(tmp_path, SMALL)
    with pytest.raises(TemplateError, match=message) as err:
        parse_templates(write(tmp_path, text, "self.txt"))
    assert str(tmp_path) in str(err.value)


def test_options_offer_values_the_dialog_gave_another_kind_sharing_the_value_list(tmp_path):
    write(tmp_path, SMALL)
    bank = parse_templates(write(tmp_path, SHARED, "wide.txt"))
    both = 0
    for d in dialogs.generate(200, "train", seed=2, facts=(3, 3), turns=(3, 3), templates=bank, corrections=0.0):
        stated = {
            kind: v
            for kind in ("parents_city", "colleague_city")
            for v in bank.kinds[kind].values
            if any(t.render(value=v) == user for t in bank.kinds[kind].templates["say"] for user, _ in d.turns)
        }
        asked = "parents_city" if "parents" in d.question else "colleague_city" if "colleague" in d.question else None
        if asked and len(stated) == 2 and len(set(stated.values())) == 2:
            both += 1
            other = stated["colleague_city" if asked == "parents_city" else "parents_city"]
            assert d.answer == stated[asked] and other in d.options, d
    assert both >= 5


def test_packaged_wide_bank_is_named_and_versioned():
    wide = dialogs.load_bank("wide")
    default = dialogs.load_bank()
    assert set(default.kinds) < set(wide.kinds) and len(wide.kinds) >= len(default.kinds) + 15
    assert data_version(DataConfig(dataset="dialogs", templates="wide")) == "dialogs-v1:wide"
    packaged_path = str(dialogs.PACKAGED_BANKS["wide"])  # named as its records name it, not by its file name
    assert data_version(DataConfig(dataset="dialogs", templates=packaged_path)) == "dialogs-v1:wide"
    assert data_version(DataConfig(dataset="dialogs")) == "dialogs-v1"
    made = {templates: next(dialogs.generate(1, "train", templates=templates)).version for templates in (None, "wide")}
    assert made == {None: "dialogs-v1", "wide": "dialogs-v1:wide"}  # what `ccmem data dialogs` files record
    mixed = DataConfig(dataset="mixture", mixture={"dialogs": 0.5, "persona": 0.5}, templates="wide")
    assert data_version(mixed) == "dialogs-v1:wide:0.5+persona-v3:0.5"
    with pytest.raises(FileNotFoundError, match="packaged bank \\(default, wide\\)"):
        dialogs.load_bank("wdie")


def test_a_users_template_file_is_versioned_by_its_name_and_content(tmp_path):
    """Two files of one name in other folders, or one file edited between two runs, got one data_version."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    first = write(tmp_path / "a", SMALL, "mine.txt")
    same = write(tmp_path / "b", SMALL, "mine.txt")
    edited = write(tmp_path / "c", SMALL.replace("Got it.", "Noted."), "mine.txt")
    versions = [dialogs.bank_version(dialogs.parse_templates(p)) for p in (first, same, edited)]
    assert versions[0].startswith("dialogs-v1:mine.txt@") and len(versions[0]) == len("dialogs-v1:mine.txt@") + 8
    assert versions[0] == versions[1] != versions[2]
    assert data_version(DataConfig(dataset="dialogs", templates=str(first))) == versions[0]


def test_wide_bank_reaches_the_loader_and_eval_refuses_it_where_it_cannot_apply(monkeypatch, capsys, tmp_path):
    from tests.unit.test_cli import run_cli

    wide = dialogs.load_bank("wide")
    new_questions = {t.text for name in set(wide.kinds) - set(dialogs.load_bank().kinds)
                     for t in wide.kinds[name].for_split("ask", "test")}  # fmt: skip
    cfg = DataConfig(dataset="dialogs", templates="wide", n_eval=60, turns=8)
    asked = [e.query for e in load_examples(cfg, "test")]
    assert any(q in new_questions for q in asked)
    assert not any(
        q in new_questions for q in (e.query for e in load_examples(dataclasses.replace(cfg, templates=None), "test"))
    )
    for args, message in [
        (
            ["dialogs", "--templates", "wdie"],
            "--templates: no template file wdie: give a file's path or a packaged bank",
        ),
        (["persona", "--templates", "wide"], "--templates shapes generated dialogs only"),
    ]:
        code, text = run_cli(monkeypatch, capsys, "eval", *args, "--n", "2", "--methods", "none")
        assert code != 0 and message in " ".join(text.split()) and "Traceback" not in text
    code, text = run_cli(monkeypatch, capsys, "data", "persona", "-o", str(tmp_path / "x"), "--templates", "wide")
    assert code != 0 and "--templates chooses the wordings of dialogs" in text and "Traceback" not in text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.dataset=persona", "data.templates=wide"], "dialogs generator; dataset 'persona' has none"),
        (["data.dataset=mixture", "data.mixture={persona: 1}", "data.templates=wide"], "has no dialogs family"),
        (["data.dataset=dialogs", "data.path=x.jsonl", "data.templates=wide"], "but data.path reads files"),
        (["data.dataset=dialogs", "data.templates=wdie"], "no template file wdie: give a file's path or a packaged"),
    ],
)
def test_templates_that_no_generator_reads_are_refused_before_training(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_templates_reach_the_dialogs_of_a_mixture():
    config = load_config("unified-ccm-concat-wide", [])
    assert config.data.templates == "wide" and data_version(config.data).startswith("dialogs-v1:wide:0.6+")


def test_eval_rows_of_another_bank_are_labelled_with_it(monkeypatch, capsys, tmp_path, tiny_model_dir):
    """Two `ccmem eval dialogs` runs, one with --templates wide, read as the same table of identical-looking rows."""
    from ccmem.eval.harness import read_rows
    from tests.unit.test_cli import run_cli

    out = tmp_path / "rows.jsonl"
    for extra in ([], ["--templates", "wide"], ["--templates", "wide", "--label", "mine"]):
        code, text = run_cli(monkeypatch, capsys, "eval", "dialogs", "--n", "2", "--turns", "3", "--methods", "none",
                             "--model", str(tiny_model_dir), "-o", str(out), *extra)  # fmt: skip
        assert code == 0, text
    assert [r.label for r in read_rows([out])] == ["", "templates wide", "mine"]


@pytest.mark.parametrize("folder", ["heldout-qa", "heldout-qa2"])
def test_the_hand_written_held_out_sets_read_as_dialogs_eval_reads_them(folder):
    """benchmarks/heldout.sh evaluates every .jsonl file of these folders with `ccmem eval dialogs --path`: each must
    load through that loader (CRLF and BOM files too), with its groups, and no dialog may repeat in another file."""
    files = sorted((Path(__file__).parents[2] / "benchmarks" / "data" / folder).glob("*.jsonl"))
    assert len(files) == 4
    seen: set[str] = set()
    for path in files:
        examples = load_examples(DataConfig(dataset="dialogs", path=str(path)), "test")
        assert len(examples) >= 20, path
        for e in examples:
            assert e.answer in e.options and e.groups and len(e.context) >= 1
            key = e.query + "".join(user for user, _ in e.context)
            assert key not in seen, f"{path}: {e.id} repeats a dialog"
            seen.add(key)


def test_shape_settings_the_dataset_does_not_read_are_named_when_typed(tmp_path, caplog):
    # data.turns with a dialogs file, data.k with a persona file, data.small_talk with dialogs: read by nothing,
    # and said by nothing either (min_turns and templates were already refused).
    with caplog.at_level("WARNING", logger="ccmem.train.config"):
        load_config("persona-ccm-concat", ["data.dataset=dialogs", f"data.path={tmp_path}", "data.turns=30"])
        load_config("persona-ccm-concat", ["data.dataset=dialogs", "data.small_talk=4", "data.turns=30"])
        load_config("persona-ccm-concat", ["data.dataset=metaicl", f"data.path={tmp_path}", "data.k=4"])
    assert "data.turns=30 is not read: it shapes generated dialogs examples, and data.path is read" in caplog.text
    assert "data.small_talk=4 is not read: dataset 'dialogs' has no such setting (it is read by persona)" in caplog.text
    assert caplog.text.count("is not read") == 2  # generated dialogs read turns; metaicl files read k
    caplog.clear()
    with caplog.at_level("WARNING", logger="ccmem.train.config"):
        load_config("persona-ccm-concat", [f"data.path={tmp_path}"])  # the preset's own k and small_talk: not named
    assert "is not read" not in caplog.text


def test_a_mapping_written_without_a_space_after_the_colon_says_so():
    # {dialogs:0.5} is YAML for the key "dialogs:0.5" with no value: it was "data.mixture.dialogs:0.5 cannot be empty"
    with pytest.raises(ConfigError, match=r"YAML needs a space after the colon: \{dialogs: 0.5\}"):
        load_config("persona-ccm-concat", ["data.dataset=mixture", "data.mixture={dialogs:0.5}"])
