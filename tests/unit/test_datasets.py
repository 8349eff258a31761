"""Dataset loaders on small fixtures in each dataset's real download format, and the training collator."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from ccmem.data import icl
from ccmem.data.formats import document_split
from ccmem.data.loaders import UnknownDatasetError, load_examples
from ccmem.data.persona import DatasetFormatError
from ccmem.data.records import to_sample
from ccmem.methods.ccm import CCMConcat
from ccmem.train.config import DataConfig
from tests.conftest import TinyTokenizer

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

CASES = [
    ("metaicl", "metaicl", "train"),
    ("metaicl", "metaicl", "test"),
    ("lamp2", "lamp2", "train"),
    ("lamp2", "lamp2", "validation"),
    ("dailydialog", "dailydialog", "train"),  # HF jsonl
    ("dailydialog", "dailydialog", "validation"),  # HF parquet
    ("dailydialog", "dailydialog_raw", "test"),  # the original __eou__ text release
    ("soda", "soda", "train"),
    ("unified", "unified", "train"),
    ("pretrain", "pretrain", "train"),
    ("persona", None, "train"),
    ("icl", None, "test"),
]


def _config(dataset: str, folder: str | None, **kw) -> DataConfig:
    return DataConfig(dataset=dataset, path=str(FIXTURES / folder) if folder else None, k=4, n_train=6, n_eval=6, **kw)


@pytest.mark.parametrize(("dataset", "folder", "split"), CASES)
def test_collator_puts_comp_after_each_segment_and_labels_only_the_answer(dataset, folder, split):
    examples = load_examples(_config(dataset, folder), split)
    assert examples, f"{dataset}/{split} gave no examples"
    tok = TinyTokenizer()
    samples = [to_sample(tok, e, system="Be brief.") for e in examples]
    method = CCMConcat(n_tok=2)
    batch = method.make_batch(samples, pad_id=0)
    for b, (example, sample) in enumerate(zip(examples, samples, strict=True)):
        assert len(sample.chunks) == len(example.context) >= 1
        # <COMP> slots sit right after each context segment, n_tok of them.
        pos, expected_comp = len(sample.sink), []
        for chunk in sample.chunks:
            pos += len(chunk)
            expected_comp += [pos, pos + 1]
            pos += 2
        assert torch.nonzero(batch.comp[b]).flatten().tolist() == expected_comp
        # Labels: nothing before the answer (sink, context, <COMP>, query), the answer tokens after it.
        answer_at = batch.tail_start[b] + sample.answer_start
        assert (batch.labels[b, :answer_at] == -100).all()
        assert batch.labels[b, answer_at : batch.lengths[b]].tolist() == sample.tail[sample.answer_start :]
        assert example.answer and (not example.options or example.answer in example.options)


def test_unified_mixes_icl_and_dialogs_and_pretrain_mixes_text_and_chat():
    unified = load_examples(_config("unified", "unified"), "train")
    assert {e.chat for e in unified} == {True, False}
    pretrain = load_examples(_config("pretrain", "pretrain"), "train")
    assert {e.task for e in pretrain} == {"text", "chat"}


def test_lamp2_reads_options_from_the_question_and_profile_items_as_context():
    [ex] = load_examples(_config("lamp2", "lamp2"), "validation")
    assert ex.answer == "comedy" and len(ex.options) == 15
    assert ex.context[0].startswith("Movie: Two friends") and "Tag: comedy" in ex.context[0]


def test_metaicl_context_is_k_demonstrations_and_test_reads_test_file():
    examples = load_examples(_config("metaicl", "metaicl"), "test")
    sst = [e for e in examples if e.task == "sst2"]
    assert [e.answer for e in sst] == ["positive", "negative"]
    assert len(sst[0].context) == 4 and sst[0].context[0] == "a gripping, beautifully acted film\npositive\n\n"


def test_metaicl_passes_over_hidden_and_archive_folders_beside_its_tasks(tmp_path):
    """A Jupyter checkpoint or macOS archive folder beside the task folders refused the whole data folder as a task
    without files ("no .ipynb_checkpoints_<k>_<seed>_train.jsonl")."""
    meta = tmp_path / "meta"
    shutil.copytree(FIXTURES / "metaicl", meta)
    for stray in (".ipynb_checkpoints", "__MACOSX"):
        (meta / stray).mkdir()
        (meta / stray / "notes.txt").write_text("not a task")
    expected = load_examples(_config("metaicl", "metaicl"), "test")
    assert load_examples(DataConfig(dataset="metaicl", path=str(meta)), "test") == expected


def test_metaicl_reads_the_files_of_the_seed_asked_for_and_says_which_it_took(tmp_path, caplog):
    """The first file in name order was read whatever the seed ("100" sorts before "13"), and a test query with
    fewer demonstrations than k got no word."""
    task = tmp_path / "taskA"
    task.mkdir()
    for seed in (13, 100):
        record = {"input": f"seed {seed} demo", "output": "yes", "options": ["yes", "no"]}
        (task / f"taskA_16_{seed}_train.jsonl").write_text((json.dumps(record) + "\n") * 4)
        (task / f"taskA_16_{seed}_test.jsonl").write_text(json.dumps(record | {"input": f"seed {seed} q"}) + "\n")
    chosen = load_examples(DataConfig(dataset="metaicl", path=str(tmp_path), k=8, seed=13), "test")
    assert chosen[0].query.startswith("seed 13") and chosen[0].context[0].startswith("seed 13")
    assert "4 training records, so each test query has 4 demonstrations, not k=8" in caplog.text
    default = load_examples(DataConfig(dataset="metaicl", path=str(tmp_path), k=2, seed=0), "test")
    assert default[0].query.startswith("seed 100") and "none of seed 0; read seed 100's" in caplog.text


def test_a_metaicl_task_both_meta_trained_on_and_tested_reads_the_test_files_of_its_seed(tmp_path):
    """A task folder holding MetaICL's meta-training file (``_16384_100_train.jsonl``) beside its 16-shot test
    files was read at k=16384 ("16384" sorts before "16_"), and evaluating it stopped on a missing
    ``_16384_100_test.jsonl``."""
    task = tmp_path / "taskA"
    task.mkdir()
    for k in (16, 16384):
        record = {"input": f"k {k} demo", "output": "yes", "options": ["yes", "no"]}
        (task / f"taskA_{k}_100_train.jsonl").write_text((json.dumps(record) + "\n") * 3)
    record = {"input": "k 16 query", "output": "no", "options": ["yes", "no"]}
    (task / "taskA_16_100_test.jsonl").write_text(json.dumps(record) + "\n")
    found = load_examples(DataConfig(dataset="metaicl", path=str(tmp_path), k=2, seed=100), "test")
    assert [e.query for e in found] == ["k 16 query\n"] and found[0].context[0].startswith("k 16 demo")
    trained = load_examples(DataConfig(dataset="metaicl", path=str(tmp_path), k=2, seed=100), "train")
    assert trained[0].query.startswith("k 16384 demo")  # meta-training reads the meta-training file


@pytest.mark.parametrize("options", [["yes"], ["yes", "no", "yes"], ["yes", ""]])
def test_a_metaicl_record_whose_options_cannot_be_chosen_between_is_named(tmp_path, options):
    """One option, or the same twice, made accuracy 1.0 (or a tie) whatever the memory held."""
    task = tmp_path / "taskA"
    task.mkdir()
    good = {"input": "demo", "output": "yes", "options": ["yes", "no"]}
    (task / "taskA_16_13_train.jsonl").write_text((json.dumps(good) + "\n") * 2)
    (task / "taskA_16_13_test.jsonl").write_text(json.dumps(good | {"options": options}) + "\n")
    with pytest.raises(DatasetFormatError, match=r"taskA_16_13_test.jsonl:1: field 'options' must "):
        load_examples(DataConfig(dataset="metaicl", path=str(tmp_path), k=2, seed=13), "test")


def test_generated_splits_never_share_items_and_are_seeded(tmp_path):
    train_words = {e.query for e in icl.examples(200, "train", k=2)} | {
        c.split("\n")[0] for e in icl.examples(200, "test", k=4) for c in e.context
    }
    test = icl.examples(50, "test", k=4)
    assert not {e.query for e in test} & train_words
    assert [e.answer for e in icl.examples(5, "train", seed=3)] == [e.answer for e in icl.examples(5, "train", seed=3)]
    folder = icl.write_metaicl(tmp_path / "icl", 2, k=4)
    read = load_examples(DataConfig(dataset="metaicl", path=str(folder), k=4), "test")
    assert read and all(len(e.context) == 4 and e.answer in e.options for e in read)
    assert {document_split(f"doc{i}") for i in range(50)} == {"train", "validation", "test"}


def test_malformed_files_name_file_line_and_field(tmp_path):
    bad = tmp_path / "dd"
    bad.mkdir()
    rows = [{"dialog": ["a", "b"]}, {"dialog": "not a list"}]
    (bad / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DatasetFormatError, match=r"train\.jsonl:2: field 'dialog' must be a list of strings"):
        load_examples(DataConfig(dataset="dailydialog", path=str(bad)), "train")
    meta = tmp_path / "meta"
    shutil.copytree(FIXTURES / "metaicl", meta)
    with (meta / "sst2" / "sst2_4_100_train.jsonl").open("a") as f:
        f.write('{"input": "x", "output": "maybe", "options": ["negative", "positive"]}\n')
    with pytest.raises(DatasetFormatError, match=r"sst2_4_100_train\.jsonl:5: field 'output' \('maybe'\) is not one"):
        load_examples(DataConfig(dataset="metaicl", path=str(meta)), "train")
    lamp = tmp_path / "lamp"
    shutil.copytree(FIXTURES / "lamp2", lamp)
    (lamp / "dev_outputs.json").write_text(json.dumps({"task": "LaMP_2", "golds": []}))
    with pytest.raises(DatasetFormatError, match=r"dev_questions\.json:record 1: question id '200' has no"):
        load_examples(DataConfig(dataset="lamp2", path=str(lamp)), "validation")
    shutil.copy(FIXTURES / "lamp2" / "dev_outputs.json", lamp / "dev_outputs.json")
    golds = json.loads((lamp / "dev_outputs.json").read_text())
    first = golds["golds"][0]
    golds["golds"].append({"id": first["id"], "output": "romance" if first["output"] != "romance" else "comedy"})
    (lamp / "dev_outputs.json").write_text(json.dumps(golds))  # a duplicated id silently swapped the answer
    with pytest.raises(DatasetFormatError, match=rf"id '{first['id']}' appears twice, with outputs"):
        load_examples(DataConfig(dataset="lamp2", path=str(lamp)), "validation")


def test_split_problems_say_what_to_do(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="LaMP does not publish test outputs: evaluate --split validation"):
        load_examples(_config("lamp2", "lamp2"), "test")
    load_examples(_config("metaicl", "metaicl"), "validation")  # glue-rte has no _dev file: its test file validates
    assert "glue-rte: no glue-rte_4_100_dev.jsonl, so the test file validates" in caplog.text.replace(str(FIXTURES), "")
    (tmp_path / "one.txt").write_text("a few words " * 50)  # one document, hashed into the train split
    with pytest.raises(FileNotFoundError, match=r"falls in the validation split .* by a hash of their file name"):
        load_examples(DataConfig(dataset="pretrain", path=str(tmp_path), k=2), "validation")


def test_dialog_releases_are_found_in_their_own_folder_layouts(tmp_path):
    """DailyDialog's release: split folders with the dialogues beside their act and emotion annotations (which sort
    first); Hugging Face's parquet export: the split only in the folder name (default/test/0000.parquet)."""
    raw = (FIXTURES / "dailydialog_raw" / "dialogues_test.txt").read_text()
    release = tmp_path / "release" / "test"
    release.mkdir(parents=True)
    (release / "dialogues_test.txt").write_text(raw)
    (release / "dialogues_act_test.txt").write_text("1 2 3\n" * raw.count("\n"))
    (release / "dialogues_emotion_test.txt").write_text("0 0 0\n" * raw.count("\n"))
    expected = load_examples(DataConfig(dataset="dailydialog", path=str(FIXTURES / "dailydialog_raw")), "test")
    found = load_examples(DataConfig(dataset="dailydialog", path=str(tmp_path / "release")), "test")
    assert expected and [(e.context, e.answer) for e in found] == [(e.context, e.answer) for e in expected]
    hub = tmp_path / "hub" / "default" / "validation"
    hub.mkdir(parents=True)
    shutil.copy(FIXTURES / "dailydialog" / "validation.parquet", hub / "0000.parquet")
    expected = load_examples(DataConfig(dataset="dailydialog", path=str(FIXTURES / "dailydialog")), "validation")
    found = load_examples(DataConfig(dataset="dailydialog", path=str(tmp_path / "hub")), "validation")
    assert expected and [(e.context, e.answer) for e in found] == [(e.context, e.answer) for e in expected]


def test_dailydialog_from_the_hub_reads_as_the_text_release_without_the_spaces_around_utterances(tmp_path):
    """The hub's daily_dialog splits each line at __eou__ and keeps the spaces around every utterance: turns and
    answers were read with them (' Fine, thanks. '), unlike the same dialogs from the text release."""
    raw = (FIXTURES / "dailydialog_raw" / "dialogues_test.txt").read_text().splitlines()
    rows = [{"dialog": line.split("__eou__")[:-1]} for line in raw if line.strip()]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert rows[0]["dialog"][1].startswith(" ")
    expected = load_examples(DataConfig(dataset="dailydialog", path=str(FIXTURES / "dailydialog_raw")), "test")
    found = load_examples(DataConfig(dataset="dailydialog", path=str(tmp_path)), "test")
    assert expected and [(e.context, e.query, e.answer) for e in found] == [
        (e.context, e.query, e.answer) for e in expected
    ]


@pytest.mark.parametrize("rows", [None, 1])
def test_dialogs_saved_by_datasets_to_json_as_json_lines_under_a_json_name_are_read(tmp_path, rows):
    """``Dataset.to_json("test.json")`` writes JSON lines: the dialog loaders refused it as invalid JSON."""
    lines = (FIXTURES / "soda" / "test.jsonl").read_text().splitlines()[:rows]
    (tmp_path / "test.json").write_text("".join(line + "\n" for line in lines))
    expected = load_examples(DataConfig(dataset="soda", path=str(FIXTURES / "soda")), "test")[: len(lines)]
    found = load_examples(DataConfig(dataset="soda", path=str(tmp_path)), "test")
    assert found and [(e.context, e.answer) for e in found] == [(e.context, e.answer) for e in expected]


@pytest.mark.parametrize(
    ("dataset", "name", "text"),
    [
        ("dailydialog", "test.json", '[{"dialog": ["Caf\u00e9?", "Yes.", "Tea?", "No."]}]'),
        ("dailydialog", "dialogues_test.txt", "Caf\u00e9? __eou__ Yes. __eou__ Tea? __eou__ No. __eou__\n"),
        ("lamp2", "dev_questions.json", "[]"),
    ],
)
def test_a_dataset_file_in_another_encoding_is_refused_by_name(tmp_path, dataset, name, text):
    """A Latin-1 file failed with Python's bare "'utf-8' codec can't decode byte 0xe9", naming no file."""
    if dataset == "lamp2":
        (tmp_path / "dev_outputs.json").write_text('{"golds": [{"id": "1", "output": "caf\u00e9"}]}', "latin-1")
    (tmp_path / name).write_text(text, "latin-1")
    bad = "dev_outputs.json" if dataset == "lamp2" else name
    with pytest.raises(DatasetFormatError, match=rf"{bad}: not UTF-8 text \(byte \d+ is b'\\xe9'\)"):
        load_examples(DataConfig(dataset=dataset, path=str(tmp_path)), "validation" if dataset == "lamp2" else "test")


def test_a_file_cut_to_n_examples_says_so(tmp_path, caplog):
    """--n (data.n_eval) kept the first 100 records of a longer file without a word."""
    record = {"turns": [], "question": "Q?", "answer": "b", "options": ["a", "b"]}
    (tmp_path / "test.jsonl").write_text(2 * (json.dumps(record) + "\n"))
    cfg = DataConfig(dataset="dialogs", path=str(tmp_path / "test.jsonl"), n_eval=1)
    assert len(load_examples(cfg, "test")) == 1
    assert "test.jsonl: reading the first 1 of its 2 test examples (data.n_eval; ccmem eval: --n)" in caplog.text
    caplog.clear()
    assert len(load_examples(dataclasses.replace(cfg, n_eval=2), "test")) == 2
    assert "reading the first" not in caplog.text


def test_missing_paths_and_unknown_datasets_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist \(the data path: --path, or data.path"):
        load_examples(DataConfig(dataset="soda", path=str(tmp_path / "nope")), "train")
    with pytest.raises(ValueError, match=r"give the downloaded folder \(--path, or data.path"):
        load_examples(DataConfig(dataset="soda"), "train")
    with pytest.raises(FileNotFoundError, match="no test file"):
        load_examples(DataConfig(dataset="dailydialog", path=str(FIXTURES / "lamp2")), "test")
    with pytest.raises(UnknownDatasetError, match="did you mean 'persona'"):
        load_examples(DataConfig(dataset="persona2"), "train")


def test_generated_files_are_read_back_by_the_loaders(monkeypatch, capsys, tmp_path):
    from tests.unit.test_cli import run_cli

    code, text = run_cli(
        monkeypatch, capsys, "data", "persona", "-o", str(tmp_path / "p"), "--n-train", "5", "--n-test", "3"
    )
    assert code == 0, text
    cfg = DataConfig(dataset="persona", path=str(tmp_path / "p"))
    assert len(load_examples(cfg, "train")) == 5 and len(load_examples(cfg, "test")) == 3
    assert all(len(e.context) == 3 + 2 for e in load_examples(cfg, "test"))  # exactly k facts + small talk
    code, text = run_cli(monkeypatch, capsys, "data", "icl", "-o", str(tmp_path / "i"), "--tasks", "2", "--k", "4")
    assert code == 0, text
    assert load_examples(DataConfig(dataset="metaicl", path=str(tmp_path / "i"), k=4), "test")


@pytest.mark.parametrize(
    ("dataset", "folder", "split"),
    [
        ("metaicl", "metaicl", "test"),
        ("lamp2", "lamp2", "validation"),
        ("dailydialog", "dailydialog", "train"),
        ("dailydialog", "dailydialog_raw", "test"),
        ("soda", "soda", "train"),
        ("pretrain", "pretrain", "train"),
        ("pwc", "pwc", "test"),
        ("pile", "pile", "train"),
        ("gsm8k", "gsm8k", "test"),
    ],
)
def test_files_saved_with_a_byte_order_mark_and_windows_line_ends_read_the_same(tmp_path, dataset, folder, split):
    """Windows tools save UTF-8 with a BOM and CRLF: every loader reads such a file as the plain one (JSON loaders
    refused it; text loaders put U+FEFF into the first segment)."""
    copy = tmp_path / folder
    shutil.copytree(FIXTURES / folder, copy)
    for file in copy.rglob("*"):
        if file.suffix in (".jsonl", ".json", ".txt"):
            file.write_bytes(b"\xef\xbb\xbf" + file.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    plain = load_examples(_config(dataset, folder), split)
    windows = load_examples(_config(dataset, str(copy)), split)
    seen = [(e.context, e.query, e.answer) for e in windows]
    assert plain and seen == [(e.context, e.query, e.answer) for e in plain]


def test_plain_text_read_drops_the_byte_order_mark_and_windows_line_ends(tmp_path):
    from ccmem.data.text import read_text

    file = tmp_path / "notes.txt"
    file.write_bytes(b"\xef\xbb\xbfMy notes\r\nline two\rline three\r\n")
    assert read_text(file) == ("My notes\nline two\nline three\n", 0)
    file.write_bytes(b"\xef\xbb\xbfcaf\xe9\r\n")  # latin-1 after a BOM: one replaced character, the BOM not counted
    assert read_text(file) == ("caf\ufffd\n", 1)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_a_unicode_file_with_a_byte_order_mark_reads_as_text_not_binary(tmp_path, encoding):
    # Windows Notepad's "Unicode" is UTF-16 with a BOM: its NUL bytes made it "a binary file".
    from ccmem.data.text import read_text

    text = "Café notes\r\nline two — ok\n"
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data = b"\xfe\xff" + data  # the big-endian codec writes no mark of its own
    (tmp_path / "notes.txt").write_bytes(data)
    assert read_text(tmp_path / "notes.txt") == ("Café notes\nline two — ok\n", 0)


def test_the_text_loader_refuses_a_binary_file_and_warns_of_replaced_characters(tmp_path, caplog):
    """eval/train on `text` read a user's files with a plain decode: a PDF renamed .txt became garbage examples,
    and latin-1 bytes were replaced without a word (compress and stream already refused/warned)."""
    from ccmem.data.text import TextSourceError

    line = "The harbour master counted the boats at dawn and wrote their names in the ledger.\n"
    (tmp_path / "doc.txt").write_bytes(b"%PDF-1.4\x00\x00" + line.encode() * 80)
    with pytest.raises(TextSourceError, match="looks like a binary file"):
        load_examples(DataConfig(dataset="text", path=str(tmp_path / "doc.txt"), n_eval=2), "test")
    (tmp_path / "doc.txt").write_bytes(line.replace("dawn", "d\xe9but").encode("latin-1") * 80)
    found = load_examples(DataConfig(dataset="text", path=str(tmp_path / "doc.txt"), n_eval=2), "test")
    assert found and "is not valid UTF-8: 80 characters were replaced" in caplog.text


def test_a_text_file_without_line_breaks_gives_distinct_examples_cut_at_words(tmp_path, caplog):
    """A document on one line (or paragraphs of one line each) gave n copies of one example whose query was the
    whole file and whose answer was empty; the only file of a folder is read for every split, with a warning."""
    words = ["harbour", "lantern", "quiet", "river", "stone", "morning", "ledger", "copper"]
    text = " ".join(words[(i * 7 + i // 3) % len(words)] for i in range(2500)) + "."
    (tmp_path / "one-line.txt").write_text(text)
    found = load_examples(DataConfig(dataset="text", path=str(tmp_path), n_eval=4), "test")
    assert len(found) == 4 and len({e.query for e in found}) == 4
    for e in found:
        assert e.answer.strip() and len(e.query) < 300 and len(e.context) >= 3
        assert all(len(segment) < 600 for segment in e.context)
        whole = "".join(e.context) + e.query + e.answer
        assert whole in text and e.query.split()[0] in words  # cut between words, in the file's order
    for split in ("train", "validation"):  # the one file's hash puts it in one split; the others read it too
        load_examples(DataConfig(dataset="text", path=str(tmp_path), n_train=2, n_eval=2), split)
    assert "none of the 1 text files" in caplog.text and "the splits share documents" in caplog.text


def test_few_demonstrations_are_used_once_and_partial_options_and_cut_dialogs_are_said(tmp_path, caplog):
    """A MetaICL task with fewer training records than k repeated one demonstration k times; a test file where
    only some records have options gave an accuracy over a hidden subset; DailyDialog dialogs were cut to the last
    k exchanges or skipped without a word, and a file of only short dialogs was 'no test example'."""
    task = tmp_path / "meta" / "units"
    task.mkdir(parents=True)
    train = [{"input": f"Convert {n} kg to g", "output": f"{n}000 g", "options": []} for n in (2, 3)]
    (task / "units_16_100_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    test = [
        {"input": "Convert 5 kg to g", "output": "5000 g", "options": ["5000 g", "500 g"]},
        {"input": "Convert 7 kg to g", "output": "7000 g"},
    ]
    (task / "units_16_100_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    found = load_examples(DataConfig(dataset="metaicl", path=str(tmp_path / "meta"), k=4), "train")
    assert [len(e.context) for e in found] == [1, 1] and found[0].context != found[1].context
    assert "2 training records, so each training example has 1 demonstrations, not k=4" in caplog.text
    load_examples(DataConfig(dataset="metaicl", path=str(tmp_path / "meta"), k=4), "test")
    assert "1 of 2 records have options: accuracy (option scoring) covers only those" in caplog.text
    dd = tmp_path / "dd"
    dd.mkdir()
    lines = [" __eou__ ".join(f"u{i}-{j}" for j in range(n)) + " __eou__" for i, n in enumerate((2, 12, 4))]
    (dd / "dialogues_test.txt").write_text("\n".join(lines) + "\n")
    found = load_examples(DataConfig(dataset="dailydialog", path=str(dd), k=3), "test")
    assert [len(e.context) for e in found] == [3, 1]
    assert "1 dialogs with fewer than 4 utterances skipped; 1 cut to their last 3 exchanges" in caplog.text
    (dd / "dialogues_test.txt").write_text(lines[0] + "\n")
    with pytest.raises(DatasetFormatError, match="none of its 1 dialogs has the 4 utterances an example needs"):
        load_examples(DataConfig(dataset="dailydialog", path=str(dd), k=3), "test")


def test_a_folder_with_several_files_for_a_split_says_which_it_reads(tmp_path, caplog):
    from ccmem.data import persona

    persona.write_jsonl(tmp_path / "my_test_v2.jsonl", list(persona.generate(2, "test")))
    persona.write_jsonl(tmp_path / "test_old.jsonl", list(persona.generate(3, "test", seed=1)))
    found = load_examples(DataConfig(dataset="persona", path=str(tmp_path)), "test")
    assert len(found) == 2
    assert "2 files could be the test split (my_test_v2.jsonl, test_old.jsonl); reading my_test_v2.jsonl" in caplog.text


def test_passages_read_a_given_file_and_mixture_refuses_one(tmp_path, caplog):
    """`eval passages --path FILE` evaluated generated passages while its rows named FILE; mixture ignored it too."""
    from ccmem.data import persona

    made = list(persona.generate(3, "test", seed=1))
    path = persona.write_jsonl(tmp_path / "mine.jsonl", made)
    found = load_examples(DataConfig(dataset="passages", path=str(path), n_eval=10), "test")
    assert [e.answer for e in found] == [d.answer for d in made] and {e.task for e in found} == {"passages"}
    with pytest.raises(ValueError, match=r"'mixture' draws from its families' generators and reads no data\.path"):
        load_examples(DataConfig(dataset="mixture", path=str(path), mixture={"dialogs": 1.0}), "test")
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[0], lines[1]]) + "\n")  # one record twice
    persona.read_jsonl(path)
    assert "1 ids occur more than once" in caplog.text


def test_eval_path_holds_the_validation_examples_of_generated_and_text_datasets(tmp_path, caplog):
    """data.eval_path was read only by the loaders of download formats: generated persona dialogs, text and
    text-stream validated on their own split whatever file it named, and a missing file was "no validation
    file in FILE"."""
    from ccmem.data import persona

    made = list(persona.generate(3, "test", seed=7))
    held = persona.write_jsonl(tmp_path / "held.jsonl", made)
    cfg = DataConfig(dataset="persona", eval_path=str(held), n_train=4, n_eval=10)
    assert [e.answer for e in load_examples(cfg, "validation")] == [d.answer for d in made]
    assert len(load_examples(cfg, "train")) == 4  # training stays generated
    line = "The harbour master counted the boats at dawn and wrote their names in the ledger.\n"
    (tmp_path / "held.txt").write_text(line.replace("boats", "held-out boats") * 120)
    (tmp_path / "train.txt").write_text(line * 120)
    for dataset in ("text", "text-stream"):
        cfg = DataConfig(dataset=dataset, path=str(tmp_path / "train.txt"), eval_path=str(tmp_path / "held.txt"))
        caplog.clear()
        found = load_examples(dataclasses.replace(cfg, n_eval=2), "validation")
        assert found and all("held-out" in "".join(map(str, e.context)) + e.answer for e in found)
        assert "splits share documents" not in caplog.text  # a held-out file is not split again
    with pytest.raises(FileNotFoundError, match=r"data.eval_path .*nope.jsonl does not exist"):
        load_examples(DataConfig(dataset="persona", eval_path=str(tmp_path / "nope.jsonl")), "validation")
    with pytest.raises(ValueError, match=r"drop data\.eval_path"):
        load_examples(DataConfig(dataset="mixture", mixture={"dialogs": 1.0}, eval_path=str(held)), "validation")


def test_eval_path_of_pwc_pile_and_pretrain_is_read_whole_not_split_again(tmp_path):
    """A held-out validation file (data.eval_path) of pwc and pile kept only the 1 in 10 of its lines that hash to
    validation, and pretrain's only when its file name hashed there ("no document falls in the validation split")."""
    pwc = tmp_path / "held.jsonl"
    pwc.write_text(
        "".join(json.dumps({"input": f"text {i}", "prompt": "Q?", "answer": f"a{i}"}) + "\n" for i in range(20))
    )
    pile = tmp_path / "pile_held.jsonl"
    pile.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(20)))
    doc = tmp_path / "heldout.txt"  # a name that hashes to the train split
    doc.write_text(" ".join(f"w{i}" for i in range(400)))  # 7 segments of 64 words: 2 windows of k=3 + 1
    assert document_split(doc.name) == "train"
    for dataset, path, n in [("pwc", pwc, 20), ("pile", pile, 20), ("pretrain", doc, 2)]:
        cfg = DataConfig(dataset=dataset, path=str(FIXTURES / dataset), eval_path=str(path), k=3, n_eval=100)
        assert len(load_examples(cfg, "validation")) == n, dataset


def test_pretrain_given_one_dialog_file_reads_its_dialogs_not_its_json_as_text(tmp_path):
    """data.path naming one .jsonl file of pretrain was read as a text document: the model trained to continue
    JSON syntax ('{"dialogue": ["Hi, ...'), without a word."""
    file = shutil.copy(FIXTURES / "pretrain" / "dialogs.jsonl", tmp_path / "dialogs.jsonl")
    cfg = DataConfig(dataset="pretrain", path=str(file), eval_path=str(file), n_eval=100)  # read whole
    found = load_examples(cfg, "validation")
    assert found and all(e.chat and e.task == "chat" for e in found)
    assert not any("{" in str(e.context) for e in found)


def test_random_bytes_without_a_nul_are_binary_and_a_latin1_text_is_not(tmp_path):
    """4 KB of random bytes with the NUL bytes taken out was read as text: a 134 MB memory of garbage."""
    import random

    from ccmem.data.text import TextSourceError, read_text

    noise = bytes(b for b in random.Random(0).randbytes(4000) if b)
    (tmp_path / "noise.txt").write_bytes(noise)
    with pytest.raises(TextSourceError, match="looks like a binary file"):
        read_text(tmp_path / "noise.txt")
    latin1 = "Les élèves étaient très fâchés à côté de l'école; où êtes-vous? Ça déçoit.\n" * 20
    (tmp_path / "fr.txt").write_bytes(latin1.encode("latin-1"))
    text, replaced = read_text(tmp_path / "fr.txt")
    assert replaced == sum(ord(c) > 127 for c in latin1) and text.count("\n") == 20  # read, with a warning


def test_a_damaged_parquet_dialog_file_is_refused_in_one_line_naming_it(tmp_path):
    """formats' parquet reader let pyarrow's ArrowInvalid through ("Could not open Parquet input source ...") with
    its traceback, where the other readers name the file in a DatasetFormatError."""
    data = (FIXTURES / "dailydialog" / "validation.parquet").read_bytes()
    (tmp_path / "validation.parquet").write_bytes(data[: len(data) // 2] + data[-8:])  # cut, footer kept
    with pytest.raises(DatasetFormatError, match=r"validation.parquet: not a readable parquet file"):
        load_examples(DataConfig(dataset="dailydialog", path=str(tmp_path)), "validation")


def test_a_folder_named_like_a_data_file_is_passed_over_not_read(tmp_path):
    """A folder called ``notes.txt`` beside the books (or ``test.jsonl``, as Spark names its output folders) was
    read as a file: IsADirectoryError, where the files around it were a dataset."""
    from ccmem.data.text import text_files

    book = tmp_path / "books" / "10.txt"
    book.parent.mkdir()
    book.write_text("The harbour master counted the boats at dawn.\n" * 200)
    (tmp_path / "books" / "notes.txt").mkdir()
    assert text_files(tmp_path / "books") == [book]
    assert load_examples(
        DataConfig(dataset="pretrain", path=str(tmp_path / "books"), eval_path=str(tmp_path / "books")), "validation"
    )
    dialogs = tmp_path / "dialogs"
    (dialogs / "test.jsonl").mkdir(parents=True)
    shutil.copy(FIXTURES / "soda" / "test.jsonl", dialogs / "test.jsonl" / "part-00000.jsonl")
    assert load_examples(DataConfig(dataset="soda", path=str(dialogs)), "test")


def test_a_folder_in_pg19_layout_gives_each_split_its_own_books(tmp_path, caplog):
    """PG19's train/, validation/ and test/ folders were pooled and re-split by a hash of the book names: training
    read PG19's test books and evaluation its training books, without a word."""
    line = "The harbour master counted the boats at dawn and wrote their names in the ledger.\n"
    for split in ("train", "validation", "test"):
        for i in range(6):
            (tmp_path / "pg19" / split / "nested").mkdir(parents=True, exist_ok=True)
            (tmp_path / "pg19" / split / "nested" / f"{split}{i}.txt").write_text(f"{split} {i}. " + line * 80)
    for split in ("train", "validation", "test"):
        for dataset in ("text", "text-stream"):
            cfg = DataConfig(dataset=dataset, path=str(tmp_path / "pg19"), n_train=30, n_eval=30)
            books = {e.id.split("-")[0].rstrip("0123456789") for e in load_examples(cfg, split)}
            assert books == {split}, (dataset, split)
    assert "splits share documents" not in caplog.text
    shutil.rmtree(tmp_path / "pg19" / "validation")
    with pytest.raises(FileNotFoundError, match=r"holds split folders \(test, train\) but no validation folder"):
        load_examples(DataConfig(dataset="text", path=str(tmp_path / "pg19")), "validation")


def test_pg19s_test_folder_itself_is_evaluated_whole(tmp_path, caplog):
    """`--path pg19/test --split test` kept only the books whose name's hash fell in the test split (about a fifth),
    silently shrinking the benchmark; a training folder is still split by the hash, so validation never trains."""
    line = "The harbour master counted the boats at dawn and wrote their names in the ledger.\n"
    for folder in ("test", "books"):
        (tmp_path / folder).mkdir()
        for i in range(20):
            (tmp_path / folder / f"book{i}.txt").write_text(f"book {i}. " + line * 80)
    read = load_examples(DataConfig(dataset="text", path=str(tmp_path / "test"), n_eval=100), "test")
    assert {e.id.split("-")[0] for e in read} == {f"book{i}" for i in range(20)}
    plain = load_examples(DataConfig(dataset="text", path=str(tmp_path / "books"), n_eval=100), "test")
    assert len({e.id.split("-")[0] for e in plain}) < 20  # another folder's books go to splits by their hash


def test_fields_a_metaicl_file_holds_beside_its_own_are_named_as_ignored(tmp_path, caplog):
    """A 'label_text' field of the user's tasks was dropped without a word; MetaICL's own files say nothing."""
    load_examples(_config("metaicl", "metaicl"), "test")
    assert "ignored" not in caplog.text
    shutil.copytree(FIXTURES / "metaicl", tmp_path / "meta")
    test_file = next((tmp_path / "meta").rglob("*_test.jsonl"))
    lines = test_file.read_text().splitlines()
    test_file.write_text("\n".join([json.dumps(json.loads(lines[0]) | {"label_text": "yes"}), *lines[1:]]) + "\n")
    load_examples(DataConfig(dataset="metaicl", path=str(tmp_path / "meta")), "test")
    said = f"{test_file}: field label_text is not part of the MetaICL format and was ignored (it reads input, output"
    assert said in caplog.text
