"""GSM8K: the real file format, answer extraction, step boundaries, and the offline arithmetic generator."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest

from ccmem.data.gsm8k import (
    GENERATOR_VERSION,
    TEMPLATES,
    DatasetFormatError,
    accuracy,
    extract_answer,
    generate,
    is_correct,
    normalise_number,
    read_jsonl,
    read_split,
    split_of,
    step_boundaries,
    strip_calculator,
    write_jsonl,
)

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "gsm8k"
ANNOTATION = re.compile(r"<<([^<>=]+)=([^<>=]+)>>")


def _check_annotations(text: str) -> int:
    """Verify every ``<<expr=result>>`` with Python's own arithmetic; return how many there are."""
    found = ANNOTATION.findall(text)
    assert text.count("<<") == text.count(">>") == len(found)
    for expr, result in found:
        assert re.fullmatch(r"[\d.+\-*/() ]+", expr), expr
        assert eval(expr, {"__builtins__": {}}) == pytest.approx(float(result)), f"{expr} != {result}"
    return len(found)


# ------------------------------------------------------------------------------------------ the real format


def test_reads_official_files_splitting_solution_from_normalised_answer():
    problems = read_jsonl(FIXTURE / "test.jsonl")
    assert [p.answer for p in problems] == ["360", "1250", "12", "33", "30"]  # "#### 1,250" -> "1250"
    first = problems[0]
    assert first.id == "test-0" and first.split == "test" and first.version == ""
    assert first.question.startswith("A bakery sells muffins")
    assert first.solution.endswith("So it made 120*3 = $<<120*3=360>>360.")
    assert all("####" not in p.solution for p in problems)
    for p in problems:
        _check_annotations(p.solution)
        assert is_correct(p.answer_text, p.answer)


def test_read_split_holds_out_the_last_of_train_for_validation(tmp_path):
    train = read_jsonl(FIXTURE / "train.jsonl")
    parts = {s: read_split(FIXTURE, s, n_validation=2) for s in ("train", "validation", "test")}
    assert [p.question for p in parts["train"]] == [p.question for p in train[:3]]
    assert [p.question for p in parts["validation"]] == [p.question for p in train[3:]]
    assert [p.id for p in parts["validation"]] == ["train-3", "train-4"]  # traceable to train.jsonl's records
    assert all(p.split == s for s, ps in parts.items() for p in ps)
    assert len(parts["test"]) == 5
    # The official repository's layout, one folder up, is found too. A single file is read whole for test, and
    # split for training: it never validates on the problems it trains on.
    shutil.copytree(FIXTURE, tmp_path / "grade_school_math" / "data")
    assert read_split(tmp_path, "test") == parts["test"]
    assert [p.question for p in read_split(FIXTURE / "train.jsonl", "test")] == [p.question for p in train]
    sides = [read_split(FIXTURE / "train.jsonl", s) for s in ("train", "validation")]
    assert [len(s) for s in sides] == [4, 1] and not {p.question for p in sides[0]} & {p.question for p in sides[1]}
    assert [p.split for p in sides[1]] == ["validation"]
    assert len(read_split(FIXTURE / "train.jsonl", "train", n_validation=0)) == 5  # validated on another file
    with pytest.raises(ValueError, match="too few to hold out 500"):
        read_split(FIXTURE, "train")
    with pytest.raises(ValueError, match="split must be one of"):
        read_split(FIXTURE, "dev")


def test_train_ratio_holds_out_a_seeded_share_of_train_jsonl_never_a_question_on_both_sides(tmp_path):
    """The fork's ``data.train_ratio``: that share of train.jsonl trains, the rest validates; test is untouched."""
    questions = [p.question for p in read_jsonl(FIXTURE / "train.jsonl")]
    parts = {s: read_split(FIXTURE, s, train_ratio=0.6, seed=0) for s in ("train", "validation", "test")}
    assert (len(parts["train"]), len(parts["validation"])) == (3, 2)
    train, validation = ({p.question for p in parts[s]} for s in ("train", "validation"))
    assert not train & validation and train | validation == set(questions)
    assert all(p.split == s for s, ps in parts.items() for p in ps)
    assert [p.id for p in parts["train"]] == sorted(p.id for p in parts["train"])  # file order kept on each side
    assert parts["test"] == read_split(FIXTURE, "test")
    assert read_split(FIXTURE, "train", train_ratio=0.6, seed=0) == parts["train"]  # the same seed, the same draw
    draws = {tuple(p.id for p in read_split(FIXTURE, "train", train_ratio=0.6, seed=seed)) for seed in range(8)}
    assert len(draws) > 1  # data.seed draws it
    # A single file is split as train.jsonl would be (read whole without a ratio, as before).
    assert read_split(FIXTURE / "train.jsonl", "validation", train_ratio=0.6, seed=0) == parts["validation"]
    # A question repeated in the file (spacing aside) stays on one side with its twin.
    rows = [json.loads(line) for line in (FIXTURE / "train.jsonl").read_text().splitlines()]
    rows.append({**rows[0], "question": "  " + rows[0]["question"].replace(" ", "  ")})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for seed in range(8):
        sides = [{p.id for p in read_split(tmp_path, s, train_ratio=0.5, seed=seed)} for s in ("train", "validation")]
        assert not sides[0] & sides[1] and len(sides[0] | sides[1]) == 6
        assert any({"train-0", "train-5"} <= side for side in sides)


@pytest.mark.parametrize(
    ("ratio", "message"),
    [(0.0, r"must be in \(0, 1\)"), (1.0, r"must be in \(0, 1\)"), (0.05, "leaves no training problem"),
     (0.95, "leaves no validation problem")],
)  # fmt: skip
def test_train_ratio_outside_0_1_or_leaving_a_side_empty_is_refused(ratio, message):
    with pytest.raises(ValueError, match=message):
        read_split(FIXTURE, "train", train_ratio=ratio)


def test_train_ratio_on_generated_problems_holds_out_part_of_the_generated_training_set():
    from ccmem.data.loaders import load_examples
    from ccmem.train.config import DataConfig

    cfg = DataConfig(dataset="gsm8k", n_train=20, n_eval=3, train_ratio=0.75, seed=4)
    parts = {s: load_examples(cfg, s) for s in ("train", "validation", "test")}
    assert [len(parts[s]) for s in ("train", "validation", "test")] == [15, 3, 3]  # validation: at most n_eval
    pool = {p.question for p in generate(20, "train", seed=4)}
    train, validation, test = ({e.query for e in parts[s]} for s in ("train", "validation", "test"))
    assert len(train) == 15 and train | validation <= pool and not train & validation and not test & pool
    assert [e.query for e in load_examples(cfg, "train")] == [e.query for e in parts["train"]]  # seeded
    # Without the ratio: as before, the generator's own train and validation splits.
    plain = DataConfig(dataset="gsm8k", n_train=20, n_eval=3, seed=4)
    assert [e.query for e in load_examples(plain, "train")] == [p.question for p in generate(20, "train", seed=4)]
    assert [e.query for e in load_examples(plain, "validation")] == [
        p.question for p in generate(3, "validation", seed=4)
    ]


def test_too_small_a_train_jsonl_without_train_ratio_says_to_set_it():
    from ccmem.data.loaders import load_examples
    from ccmem.train.config import DataConfig

    with pytest.raises(ValueError, match=r"too few to hold out 500.*data.train_ratio=0.8") as refused:
        load_examples(DataConfig(dataset="gsm8k", path=str(FIXTURE)), "validation")
    assert "ccmem eval gsm8k --split test" in str(refused.value)  # what helps where no config can be set


def test_the_forks_train_ratio_override_is_a_config_key_for_gsm8k_only():
    from ccmem.train.config import ConfigError, load_config

    config = load_config("gsm8k-ccm-reason", ["data.train_ratio=0.8"])  # the fork's own example
    assert config.data.train_ratio == 0.8
    assert config.fingerprint() != load_config("gsm8k-ccm-reason").fingerprint()
    assert load_config("gsm8k-full").fingerprint() == "fdbbaf820adf"  # unset: the hash the shipped stage 1 records
    for bad in ("1.5", "0", "-0.2", "nan"):
        with pytest.raises(ConfigError, match=r"data.train_ratio must be in \(0, 1\)"):
            load_config("gsm8k-ccm-reason", [f"data.train_ratio={bad}"])
    with pytest.raises(ConfigError, match=r"applies to dataset gsm8k only.*dataset 'persona' has its own"):
        load_config("persona-ccm-concat", ["data.train_ratio=0.8"])
    with pytest.raises(ConfigError, match=r"data\.eval_path names a validation file: set one of them"):
        load_config("gsm8k-ccm-reason", ["data.train_ratio=0.8", "data.eval_path=val.jsonl"])


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"answer": "1+1 = <<1+1=2>>2\n#### 2"}, "field 'question' must be a non-empty string"),
        ({"question": "How many?"}, "field 'answer' must be a non-empty string"),
        ({"question": "How many?", "answer": 7}, "field 'answer' must be a non-empty string"),
        (
            {"question": "How many?", "answer": "1+1 = <<1+1=2>>2"},
            "field 'answer' must end with a '#### <number>' line",
        ),
        ({"question": "How many?", "answer": "#### 2\nextra line"}, "field 'answer' must end with a '#### <number>'"),
        ({"question": "How many?", "answer": "Two.\n#### two"}, "field 'answer' has a final answer 'two' that is not"),
        (
            {"question": "How many?", "answer": "#### 12,34"},
            "field 'answer' has a final answer '12,34' that is not one number",
        ),
        ({"question": "How many?", "answer": "#### 2", "split": 3}, "field 'split' must be a string"),
        (
            {"question": "How much?", "answer": "#### 3/0"},
            "field 'answer' has a final answer '3/0' that is not one number (a number and a unit",
        ),
        ({"question": "Which?", "answer": "#### 5 or 6"}, "field 'answer' has a final answer '5 or 6' that is not"),
    ],
)
def test_malformed_records_name_file_line_and_field(tmp_path, record, message):
    path = tmp_path / "bad.jsonl"
    good = {"question": "How many?", "answer": "1+1 = <<1+1=2>>2\n#### 2"}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(DatasetFormatError, match=rf"bad\.jsonl:3: {re.escape(message)}"):
        read_jsonl(path)


def test_a_final_answer_with_a_unit_is_read_as_its_number(tmp_path):
    """Users' own problems end '#### 60 km/h' or '#### 15%': they were refused; the number is the answer."""
    path = tmp_path / "mine.jsonl"
    rows = [{"question": "How fast?", "answer": "120/2 = 60\n#### 60 km/h"}, {"question": "Tax?", "answer": "#### 15%"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p.answer for p in read_jsonl(path)] == ["60", "15"]


@pytest.mark.parametrize(
    ("final", "value"),
    [
        ("- 5", "-5"),
        ("+ 5", "5"),
        ("3/4 cup", "0.75"),
        ("1 1/2 cups", "1.5"),
        ("5 1/2 hours", "5.5"),
        ("$ 12", "12"),
        ("€7.50", "7.5"),
        ("£ 3", "3"),
        ("¥1,200", "1200"),
        ("-€4", "-4"),
    ],
)
def test_a_reference_reads_as_a_generated_answer_does(tmp_path, final, value):
    """A final answer that scoring read from a model's solution was refused in the user's own file."""
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"question": "How much?", "answer": f"Worked out.\n#### {final}"}) + "\n")
    assert [p.answer for p in read_jsonl(path)] == [value]
    assert extract_answer(f"So the answer is\n#### {final}") == value


def test_a_final_answer_written_as_a_fraction_is_read_as_its_value(tmp_path):
    """'#### 3/4' was refused; a fraction is an answer of its own, equal to its decimal when that ends."""
    path = tmp_path / "mine.jsonl"
    answers = ["#### 3/4", "#### 2/6", "#### -1/2", "#### 8 / 2"]
    path.write_text("".join(json.dumps({"question": "How much?", "answer": a}) + "\n" for a in answers))
    assert [p.answer for p in read_jsonl(path)] == ["0.75", "1/3", "-0.5", "4"]
    assert is_correct("So each gets 3/4.\n#### 0.75", "3/4") and is_correct("#### 3/4", "0.75")
    assert is_correct("#### 1/3 of the cake", "2/6") and not is_correct("#### 0.33", "1/3")
    assert not is_correct("#### 3", "3/4")  # the numerator alone is not the answer


def test_a_mixed_number_is_read_whole(tmp_path):
    """'#### 1 1/2' was read as 1 (its whole part) and 'takes 2 3/4 hours' as 0.75 (its fraction), so a right
    answer written as a mixed number was scored wrong; a file's '#### 1 1/2' was refused as no number."""
    assert extract_answer("#### 1 1/2") == "1.5" and extract_answer("#### -2 1/4 cups") == "-2.25"
    assert extract_answer("So it takes 2 3/4 hours.") == "2.75" and extract_answer("He ate 1 1/3") == "4/3"
    assert is_correct("#### 1 1/2", "1.5") and is_correct("#### 1.5", "1 1/2") and not is_correct("#### 1 1/2", "1")
    assert normalise_number("3 1/2") == "3.5" and normalise_number("5 apples") is None
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"question": "How much?", "answer": "3/2 = 1 1/2\n#### 1 1/2"}) + "\n")
    assert [p.answer for p in read_jsonl(path)] == ["1.5"]


def test_missing_file_and_invalid_json_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GSM8K file"):
        read_jsonl(tmp_path / "absent.jsonl")
    (tmp_path / "x.jsonl").write_text("{oops\n")
    with pytest.raises(DatasetFormatError, match=r"x\.jsonl:1: not valid JSON"):
        read_jsonl(tmp_path / "x.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    for split in ("train", "test"):  # training said "train_ratio=0.9 of 0 distinct questions leaves no problem"
        with pytest.raises(DatasetFormatError, match=r"empty\.jsonl holds no GSM8K problem"):
            read_split(tmp_path / "empty.jsonl", split)


# ------------------------------------------------------------------------------------------ answers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
        ("#### -3", "-3"),
        ("#### 1,234", "1234"),
        ("####1250", "1250"),
        ("#### $1,250.00.", "1250"),
        ("The answer is $1,250.00.", "1250"),
        ("So she has 12.0 apples left.", "12"),
        ("It costs $3.50.", "3.5"),
        ("The temperature fell to -4 degrees.", "-4"),
        ("He owes -$15 now.", "-15"),
        ("Ages 3-4", "4"),  # a range's hyphen is no minus sign
        ("It is .5 of the cake.", "0.5"),
        ("1,2345 grains", "2345"),  # not a thousands grouping
        ("Values 3,4,5", "5"),
        ("I don't know.", None),
        ("", None),
        ("#### 7\n\nQuestion: Ann has 5 pens.\n#### 5", "7"),  # the first final answer counts
        ("The total is 18.\n####", "18"),  # an empty final line falls back to the last number
        ("It took 90 minutes, that is 1.5 hours.", "1.5"),
        ("#### 3/4", "0.75"),
        ("#### 1/3 of a pie", "1/3"),
        ("#### 3/4/5", "3"),  # no fraction: read as before
        ("48/2 = 24 apples", "24"),
        ("Each friend gets 3/4.", "0.75"),  # without '####' too, a fraction is not its denominator
        ("So she ate -1/3 of the pie", "-1/3"),
        ("Ages 3-4 and 1/0", "0"),  # no fraction: the last number
        ("#### - 5", "-5"),  # a minus apart from its number, after '####'
        ("#### - 3/4", "-0.75"),
        ("He had 10 - 5 = 5 left", "5"),  # in running text a minus between numbers is subtraction
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("72", "72"),
        (" 1,234 ", "1234"),
        ("$1,250.00", "1250"),
        ("12.0", "12"),
        ("3.50", "3.5"),
        ("-3", "-3"),
        ("+5", "5"),  # '#### +5' in a data file was refused as no number, while extract_answer reads 5
        ("+ 1/2", "0.5"),
        ("-0.0", "0"),
        ("0.25", "0.25"),
        ("7.", "7"),
        ("12,34", None),
        ("3/4", "0.75"),
        ("10/4", "2.5"),
        ("4/2", "2"),
        ("1/0", None),
        ("seven", None),
        ("5 apples", None),
        ("", None),
    ],
)
def test_normalise_number(text, expected):
    assert normalise_number(text) == expected


def test_is_correct_and_accuracy_compare_numbers_not_strings():
    assert is_correct("The answer is $1,250.00.", "1250")
    assert is_correct("#### 3.50", "3.5") and is_correct("It is 12.0", "12")
    assert is_correct("so 5*3 = 15\n#### 15", "Three fives.\n#### 15")  # a whole GSM8K answer as reference
    assert not is_correct("#### 16", "15") and not is_correct("no idea", "15")
    assert not is_correct("#### 15", "fifteen")
    assert accuracy(["#### 1", "#### 2", "3", "none"], ["1", "2", "4", "5"]) == 0.5
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        accuracy(["1", "2"], ["1"])
    with pytest.raises(ValueError, match="no predictions"):
        accuracy([], [])


def test_strip_calculator_removes_only_annotations():
    text = "She earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nSo <<0.2*50=10>>10 in total."
    assert strip_calculator(text) == "She earns 12/60 = $0.2 per minute.\nSo 10 in total."
    assert strip_calculator("1 < 2 and 3 > 2") == "1 < 2 and 3 > 2"


# ------------------------------------------------------------------------------------------ boundaries


def test_step_boundaries_follow_results_sentences_and_lines():
    text = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nIt was sunny. So she sold 48+24 = <<48+24=72>>72 in all."
    first_result = text.index("24 clips") + 2
    first_line = text.index("May.") + 4
    second_result = text.index("72 in") + 2
    assert step_boundaries(text) == [
        first_result,  # the result after '='
        first_line,  # the sentence holding '=' ends
        first_line + 1,  # the newline
        # "It was sunny." states no conclusion: not a boundary.
        second_result,
        len(text),  # the conclusion sentence and the end of the text
    ]
    plain = strip_calculator(text)
    may = plain.index("May.") + 4
    assert step_boundaries(plain) == [plain.index("24 clips") + 2, may, may + 1, plain.index("72 in") + 2, len(plain)]


def test_step_boundaries_handle_money_results_and_never_land_inside_annotations():
    text = "He earns 12/60 = $<<12/60=0.2>>0.2 each minute, <<0.2*50=10>>10 in all"
    assert step_boundaries(text) == [text.index("0.2 each") + 3, text.index("10 in") + 2, len(text)]
    assert step_boundaries("Total <<2+3=5>> apples. Thus done.") == [len("Total <<2+3=5>> apples."), 34]
    assert step_boundaries("") == [] and step_boundaries("no steps") == [8]
    for p in generate(100, "train", seed=3):
        spans = [m.span() for m in re.finditer(r"<<[^<>]*>>", p.solution)]
        offsets = step_boundaries(p.solution)
        assert offsets == sorted(set(offsets)) and offsets[0] > 0 and offsets[-1] == len(p.solution)
        assert not [i for i in offsets for start, end in spans if start < i < end]
        assert offsets == step_boundaries(p.solution)  # deterministic
        assert len(offsets) >= 3 * p.solution.count("\n")  # each line: a result, its sentence, its newline


# ------------------------------------------------------------------------------------------ generator


def test_same_seed_same_problems_other_seed_differs(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", generate(50, "train", seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", generate(50, "train", seed=1))
    c = write_jsonl(tmp_path / "c.jsonl", generate(50, "train", seed=2))
    assert a.read_text() == b.read_text() != c.read_text()


def test_test_questions_never_appear_in_train_or_validation():
    train = {p.question for seed in (0, 1) for p in generate(2000, "train", seed=seed)}
    validation = {p.question for p in generate(300, "validation")}
    test = [p.question for p in generate(300, "test", seed=7)]
    assert len(set(test)) == len(test) == 300  # distinct within a split too
    assert not set(test) & train and not set(test) & validation and not validation & train
    assert {split_of(q) for q in test} == {"test"} and {split_of(q) for q in train} == {"train"}


def test_generated_arithmetic_is_correct_and_answers_extract():
    problems = [p for split in ("train", "validation", "test") for p in generate(70, split, seed=11)][:200]
    assert len(problems) == 200
    for p in problems:
        steps = _check_annotations(p.solution)
        assert 2 <= steps <= 5 and steps == len(p.solution.split("\n"))
        assert re.fullmatch(r"\d+", p.answer), p.answer  # whole, non-negative answers
        assert extract_answer(p.answer_text) == p.answer
        assert p.answer_text.endswith(f"\n#### {p.answer}")
        # The number written after each annotation is the annotation's result.
        for result, shown in re.findall(r"=([^<>=]+)>>(\d+)", p.solution):
            assert result == shown


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_template_takes_two_to_five_exact_steps(name):
    assert len(TEMPLATES) >= 8
    rng = random.Random(name)
    questions = set()
    for _ in range(60):
        question, steps, answer = TEMPLATES[name](rng)
        questions.add(question)
        assert 2 <= len(steps) <= 5 and all(_check_annotations(s) == 1 for s in steps)
        assert isinstance(answer, int) and answer >= 0
        assert steps[-1].rstrip(".").split(" = ")[-1].split(">>")[-1].split()[0] == str(answer)
    assert len(questions) > 50  # names and numbers vary


def test_write_then_read_gives_the_same_problems_in_the_official_format(tmp_path):
    problems = generate(40, "test", seed=5)
    path = write_jsonl(tmp_path / "gsm" / "test.jsonl", problems)
    assert read_jsonl(path) == problems
    for line in path.read_text().splitlines():
        record = json.loads(line)
        assert list(record)[:2] == ["question", "answer"]
        assert re.search(r"\n#### \d+$", record["answer"])
    assert not list(path.parent.glob("*.tmp"))
    assert (problems[0].id, problems[0].split, problems[0].version) == ("test-0", "test", GENERATOR_VERSION)
    # Generated files feed the same folder reader as the download.
    write_jsonl(tmp_path / "gsm" / "train.jsonl", generate(30, "train"))
    assert len(read_split(tmp_path / "gsm", "validation", n_validation=10)) == 10


def test_generate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        generate(3, "dev")
    with pytest.raises(ValueError, match="must not be negative"):
        generate(-1, "train")
    assert generate(0, "test") == []


def test_eval_path_holds_the_validation_and_test_problems():
    """``data.eval_path`` was ignored by the gsm8k loader: validation came from train.jsonl whatever it said."""
    from ccmem.data.loaders import load_examples
    from ccmem.train.config import DataConfig

    cfg = DataConfig(dataset="gsm8k", path=str(FIXTURE), eval_path=str(FIXTURE / "test.jsonl"))
    test_questions = [p.question for p in read_jsonl(FIXTURE / "test.jsonl")]
    assert [e.query for e in load_examples(cfg, "validation")] == test_questions
    assert [e.query for e in load_examples(cfg, "test")] == test_questions
    # validation is elsewhere, so the whole training file trains (5 problems: too few to hold 500 out of)
    train_questions = [p.question for p in read_jsonl(FIXTURE / "train.jsonl")]
    assert [e.query for e in load_examples(cfg, "train")] == train_questions
    with pytest.raises(ValueError, match="too few to hold out 500"):
        load_examples(DataConfig(dataset="gsm8k", path=str(FIXTURE)), "train")


def test_fields_a_gsm8k_file_holds_beside_its_own_are_named_as_ignored(tmp_path, caplog):
    """A user's 'rationale' or 'difficulty' field was dropped without a word; the official files say nothing."""
    read_jsonl(FIXTURE / "test.jsonl")
    assert "ignored" not in caplog.text
    record = {"question": "How many?", "answer": "2+2 = 4\n#### 4", "difficulty": "easy", "source": "mine"}
    (tmp_path / "mine.jsonl").write_text(json.dumps(record) + "\n")
    assert len(read_jsonl(tmp_path / "mine.jsonl")) == 1
    assert "fields difficulty, source are not part of the GSM8K format and were ignored" in caplog.text
