"""The Python API's arguments: a wrong kind of value is a ValueError that says what to give, never a result
computed from a misread argument or an error from inside torch."""

from __future__ import annotations

import pytest

import ccmem
from ccmem.api import add_batch, generate_batch, score_batch
from ccmem.loading import load_model
from ccmem.memory import Memory, MemoryMismatchError
from ccmem.options import OptionError
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def sessions():
    lm = tiny_model()
    first = ccmem.load(lm, "full", system_prompt="Hi.")
    return first, first.fork()


def test_a_text_where_a_list_is_due_is_refused_not_read_letter_by_letter(sessions):
    """generate_batch([a, b], "ab") answered the prompts "a" and "b"."""
    with pytest.raises(ValueError, match="one prompt per session"):
        generate_batch(list(sessions), "ab", 2)
    with pytest.raises(ValueError, match="sessions as a list"):
        generate_batch(sessions[0], ["Q"], 2)
    with pytest.raises(ValueError, match="context 0 is str; add_batch takes one list of chat messages"):
        add_batch(list(sessions), ["hello there", "hi"])


def test_options_must_be_an_ordered_list_and_may_come_from_a_generator(sessions):
    """A set was scored in an order of its own; a generator was used up by the check and called empty."""
    session = sessions[0]
    with pytest.raises(ValueError, match="list of non-empty strings"):
        session.score("Q?", {"yes", "no"})
    scores = session.score("Q?", (o for o in ["yes", "no"]))
    assert scores == session.score("Q?", ["yes", "no"])
    with pytest.raises(ValueError, match="nothing to score"):
        score_batch(session.lm, session.method, [])


def test_progress_that_is_no_function_and_a_dtype_no_model_computes_in_are_refused(sessions):
    with pytest.raises(ValueError, match=r"progress must be a function progress\(done, total\)"):
        sessions[0].fork().add("some text", progress=5)
    for dtype in ("bogus", "int8"):
        with pytest.raises(ValueError, match="not one a model computes in; give one of float32, bfloat16"):
            load_model("smollm2-135m", dtype=dtype)


def test_a_dtype_or_attention_a_loaded_model_does_not_have_is_refused_not_ignored(sessions):
    """ccmem.load(lm.lm, ..., dtype=torch.bfloat16) gave a float32 session without a word."""
    lm = sessions[0].lm
    with pytest.raises(ValueError, match=r"dtype='bfloat16', but tiny-llama-gqa is loaded already, in torch.float32"):
        ccmem.load(lm, "full", dtype="bfloat16")
    with pytest.raises(ValueError, match=r"attn_implementation='eager', but .* loaded already, with sdpa"):
        ccmem.load(lm, "full", attn_implementation="eager")
    assert ccmem.load(lm, "full", dtype="float32", attn_implementation="sdpa").lm is lm  # what it has: shared


def test_option_text_is_read_as_the_command_line_reads_it_whatever_its_type():
    # the API, a config file and ``-O`` accept the same things: "3" for an int as "0.5" for a float
    method = ccmem.get_method("ccm-concat", n_tok="3", keep="names")
    assert method.n_tok == 3 and isinstance(method.n_tok, int)
    assert ccmem.get_method("h2o", ratio="0.5").ratio == 0.5
    assert ccmem.get_method("h2o", ratio="1/8").ratio == 0.125
    with pytest.raises(OptionError, match=r"n_tok must be int, got 3\.5"):
        ccmem.get_method("ccm-concat", n_tok="3.5")
    with pytest.raises(OptionError, match="n_tok must be int, got 'three'"):
        ccmem.get_method("ccm-concat", n_tok="three")


def test_score_batch_refuses_a_memory_made_by_another_method(sessions):
    session = sessions[0].fork()
    other = ccmem.load(session.lm, method="gist")
    other.add("The code word is plum.")
    query = session.query_ids("What is the code word?")[0].tolist()
    with pytest.raises(MemoryMismatchError, match="the memory was made with method='gist'"):
        score_batch(session.lm, session.method, [(other.memory, query, [[5], [6]])])
    session.add("The code word is plum.")
    assert len(score_batch(session.lm, session.method, [(session.memory, query, [[5], [6]])])[0]) == 2


def test_scoring_checks_a_given_memory_but_does_not_rescan_the_sessions_own(sessions, monkeypatch):
    """A memory handed to score_batch is scanned (every key and value); the session's own, checked when it was
    made, restored or loaded, is not scanned again at every score (40 ms for 2,000 slots of SmolLM2)."""
    session = sessions[0].fork()
    session.add("The code word is plum.")
    query = session.query_ids("What is the code word?")[0].tolist()
    scans = []
    real = Memory.check
    monkeypatch.setattr(Memory, "check", lambda self, *a, **kw: scans.append(1) or real(self, *a, **kw))
    session.score_ids(query, [[5], [6]])
    assert not scans
    damaged = Memory(
        layers=[(k.clone().fill_(float("nan")), v) for k, v in session.memory.layers],
        positions=session.memory.positions, next_position=session.memory.next_position, sink=session.memory.sink,
        window=session.memory.window, meta=session.memory.meta, state=session.memory.state,
    )  # fmt: skip
    with pytest.raises(MemoryMismatchError, match="NaN or infinite"):
        score_batch(session.lm, session.method, [(damaged, query, [[5], [6]])])
    assert scans


def test_options_where_one_begins_another_are_scored_with_the_end_of_the_answer(sessions):
    """choose("Locker?", ["63", "6305"]) summed fewer log-probabilities for "63", which then always won; as in
    ``ccmem eval``, such options are each scored with the end of the answer after them."""
    session = sessions[0].fork()
    query = session.query_ids("Locker?")
    answer, end = session.format.answer_ids, session.format.end_of_turn_ids()[:1]
    assert end
    overlapping = session.score("Locker?", ["63", "6305"])
    assert overlapping == session.score_ids(query, [answer("63") + end, answer("6305") + end])
    assert session.score("Locker?", ["63", "71"]) == session.score_ids(query, [answer("63"), answer("71")])


def test_a_path_under_home_written_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch):
    """save_memory("~/m.safetensors") made a folder literally named "~" in the working folder (model paths and the
    chat's /save expand "~"); memories, adapters and stage-1 files now read "~" as the home folder too."""
    from ccmem.adapter import save_adapter
    from ccmem.registry import get_method
    from ccmem.stage1 import stage1_file

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    lm = tiny_model()
    session = ccmem.load(lm, "full", system_prompt=None)
    session.add("remember the number")
    assert session.save_memory("~/m.safetensors") == home / "m.safetensors"
    assert not (work / "~").exists()
    fresh = ccmem.load(lm, "full", system_prompt=None)
    fresh.load_memory("~/m.safetensors")
    assert fresh.memory.num_slots == session.memory.num_slots
    save_adapter(get_method("ccm-concat", n_tok=2), lm, home / "a.safetensors")
    assert ccmem.load(lm, "ccm-concat", adapter="~/a.safetensors", system_prompt=None).adapter_trained
    save_adapter(get_method("full"), lm, home / "stage1.safetensors")
    assert stage1_file("~/stage1.safetensors") == home / "stage1.safetensors"


def test_restoring_something_that_is_no_memory_is_refused_by_name(sessions):
    """restore(None, []) raised an AttributeError from inside the memory check."""
    first, _ = sessions
    with pytest.raises(ValueError, match=r"memory is a NoneType: give a ccmem\.Memory"):
        first.fork().restore(None, [])


def test_a_sink_that_is_not_true_or_false_is_refused():
    """sink="no" was taken as True (a non-empty string), keeping the sink it asked to drop."""
    with pytest.raises(ValueError, match="sink must be True or False"):
        ccmem.load(tiny_model(), "full", sink="no")


def test_paths_histories_layers_and_storage_of_the_wrong_kind_are_refused_in_words(sessions, tmp_path):
    """Each was a TypeError or IndexError from pathlib or list(); an empty storage dtype saved at the default."""
    session = sessions[0]
    with pytest.raises(ValueError, match="history is a NoneType: give the transcript"):
        session.restore(session.memory, None)
    with pytest.raises(ValueError, match="history is a str"):
        session.restore(session.memory, "Hi.")
    for call in (session.save_memory, session.load_memory):
        with pytest.raises(ValueError, match=r"takes the memory file's path \(a str or Path\), got None"):
            call(None)
        with pytest.raises(ValueError, match="got ''"):
            call("")
    with pytest.raises(ValueError, match="unknown memory storage dtype ''"):
        session.save_memory(tmp_path / "m.safetensors", dtype="")
    assert not (tmp_path / "m.safetensors").exists()
    layers = len(session.memory.layers)
    with pytest.raises(ValueError, match=f"layer {layers}: this memory holds layers 0 to {layers - 1}"):
        session.memory.segment_lengths(layers)
