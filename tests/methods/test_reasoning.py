"""Reasoning compression (``ccm-reason``): decoding compresses each finished step exactly as training lays it out."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import ccmem
from ccmem.data import gsm8k
from ccmem.generation import Sampling, decode
from ccmem.loading import LoadedModel
from ccmem.methods import reasoning
from ccmem.methods.base import DecodeState, logits_for
from ccmem.methods.reasoning import CCMReasoning
from tests.conftest import COMMON, TinyTokenizer, tiny_model
from tests.methods.test_contract import randomize_state

PROBLEM = gsm8k.generate(1, "train", seed=3)[0]
FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "gsm8k"


def trained(lm, **options) -> CCMReasoning:
    method = ccmem.get_method("ccm-reason", n_tok=2, min_segment=3, **options)
    randomize_state(method, lm, seed=0, scale=0.05)
    method.adapter_hash = "test"
    return method


def sample_for(lm):
    return gsm8k.reasoning_sample(lm.tokenizer, PROBLEM.question, gsm8k.training_answer(PROBLEM))


@dataclass(frozen=True)
class Forced(Sampling):
    """Picks the given tokens in turn (teacher forcing through the real loop) and keeps the logits it was given."""

    tokens: tuple[int, ...] = ()
    seen: list[torch.Tensor] = field(default_factory=list, compare=False)

    def pick(self, logits: torch.Tensor, generator: torch.Generator) -> int:
        self.seen.append(logits.detach().clone())
        return self.tokens[len(self.seen) - 1]


def teacher_forced(lm, method, sample) -> tuple[torch.Tensor, dict]:
    """Logits of every answer token, the answer fed one token at a time by ``decode`` (its hooks and forwards)."""
    answer = sample.tail[sample.answer_start :]
    forced, stats = Forced(tokens=tuple(answer)), {}
    query = torch.tensor([sample.tail[: sample.answer_start]])
    assert list(decode(lm, method, method.new_memory(lm), query, len(answer), sampling=forced, stats=stats)) == answer
    return torch.stack(forced.seen), stats


def fires_at_labelled_ends(monkeypatch, sample) -> None:
    """A classifier that fires at the labelled step ends only (as a trained one would)."""
    ends, n = sample.steps["labelled"], len(sample.tail) - sample.answer_start
    monkeypatch.setattr(
        CCMReasoning, "step_ends", lambda self, lm, state: (len(state.tokens) - state.extra.get("segment_start", 0)
        >= self.min_segment and len(state.tokens) in ends and len(state.tokens) < n)
    )  # fmt: skip


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2"])
@pytest.mark.parametrize("policy", ["interval", "newline", "classifier", "classifier-lookahead"])
@pytest.mark.parametrize("keep_last", [0, 2])
def test_decoding_compresses_each_step_as_the_parallel_training_forward_reads_it(
    family, policy, keep_last, monkeypatch
):
    lm = tiny_model(family, positions=512)
    lookahead = policy == "classifier-lookahead"
    policy = policy.removesuffix("-lookahead")
    method = trained(lm, policy=policy, interval=7, keep_last=keep_last, lookahead=lookahead)
    if policy == "newline":  # the tiny tokenizer shares ids between characters: give "\n" an id of its own
        plain = lm.tokenizer.encode
        monkeypatch.setattr(lm.tokenizer, "encode", lambda text, **kw: [2 if c == "\n" else plain(c)[0] for c in text])
        monkeypatch.setattr(reasoning, "newline_ids", lambda lm: {2})
    sample = sample_for(lm)
    if policy == "classifier":
        fires_at_labelled_ends(monkeypatch, sample)
    recurrent, extra = teacher_forced(lm, method, sample)
    batch = method.make_batch([sample])
    with torch.no_grad(), method.attached(lm):
        hidden = lm.model.base_model(**method._parallel_inputs(lm, batch)).last_hidden_state
    keep = batch.labels[:, 1:] != -100
    parallel = logits_for(lm, hidden[:, :-1][keep])
    cuts = method.cuts(sample)
    assert len(cuts) >= 2 and extra["insertions"] == len(cuts)
    assert keep.sum() == len(sample.tail) - sample.answer_start  # every answer token is a label, no <COMP> is
    torch.testing.assert_close(recurrent, parallel, atol=2e-5, rtol=1e-4)


def test_an_interval_shorter_than_min_segment_is_trained_where_decoding_compresses():
    lm = tiny_model(positions=512)
    method = ccmem.get_method("ccm-reason", n_tok=2, policy="interval", interval=3, min_segment=5)
    randomize_state(method, lm, seed=0, scale=0.05)  # a step ends every 5 tokens (not at 6, the next multiple of 3)
    sample = sample_for(lm)
    recurrent, extra = teacher_forced(lm, method, sample)
    batch = method.make_batch([sample])
    with torch.no_grad(), method.attached(lm):
        hidden = lm.model.base_model(**method._parallel_inputs(lm, batch)).last_hidden_state
    parallel = logits_for(lm, hidden[:, :-1][batch.labels[:, 1:] != -100])
    assert method.cuts(sample)[:2] == [5, 10] and extra["insertions"] == len(method.cuts(sample))
    torch.testing.assert_close(recurrent, parallel, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("policy", "lookahead", "extra_forwards"), [("interval", False, False),
    ("newline", False, False), ("classifier", True, False), ("classifier", False, True)])  # fmt: skip
def test_a_step_known_to_end_when_its_last_token_is_picked_costs_no_forward_of_its_own(
    policy, lookahead, extra_forwards, monkeypatch
):
    lm = tiny_model(positions=512)
    method = trained(lm, policy=policy, interval=7, lookahead=lookahead)
    sample = sample_for(lm)
    answer = sample.tail[sample.answer_start :]
    ends = {answer[e - 1] for e in sample.steps["labelled"]}  # the tiny vocabulary has no line break
    monkeypatch.setattr(reasoning, "newline_ids", lambda lm: ends)
    if policy == "classifier":
        fires_at_labelled_ends(monkeypatch, sample)
    with method.attached(lm):  # the first attach checks the model once (keywords reach its attention): not counted
        pass
    forwards = []
    hook = lm.model.base_model.register_forward_hook(lambda module, args, out: forwards.append(1))
    try:
        _, stats = teacher_forced(lm, method, sample)
    finally:
        hook.remove()
    assert stats["insertions"] >= 2
    assert len(forwards) == len(answer) + (stats["insertions"] if extra_forwards else 0)


def test_the_lookahead_classifier_learns_each_step_end_one_token_early():
    lm = tiny_model(positions=512)
    sample = sample_for(lm)
    rows = {}
    for lookahead in (False, True):
        method = ccmem.get_method("ccm-reason", n_tok=2, min_segment=3, lookahead=lookahead)
        rows[lookahead] = method.make_batch([sample]).step_end[0]  # per row position: 1, 0, or -1 (no target)
    fired = rows[False].eq(1).nonzero().flatten()  # the tokens after which a labelled step ends
    assert len(fired) == len(sample.steps["labelled"]) >= 3
    seen = rows[True] >= 0
    expected = (fired - 1)[seen[fired - 1]]  # decided at the token before (none where <COMP> sits between)
    assert len(expected) >= 3 and torch.equal(rows[True].eq(1).nonzero().flatten(), expected)
    # A piece's last token has no lookahead target: <COMP> follows it, not the token it would be read with.
    assert int((rows[False] >= 0).sum() - seen.sum()) == len(method.cuts(sample)) + 1


def test_the_lookahead_classifier_reads_the_picked_token():
    lm = tiny_model(positions=512)
    method = trained(lm, policy="classifier", lookahead=True)
    head = method.reasoning(lm).classifier
    hidden = lm.model.config.hidden_size
    assert head.in_features == 2 * hidden  # [the state the token is picked from; the token's embedding]
    with torch.no_grad():
        head.weight.zero_()
        head.weight[0, hidden:] = lm.model.get_input_embeddings().weight[7]  # fires on token 7 alone
        head.bias.fill_(-0.5 * float(head.weight[0, hidden:].pow(2).sum()))
    state = DecodeState(cache=None, position=0, memory=None, tokens=[1, 2, 3, 4, 5], hidden=torch.zeros(1, hidden))
    assert method.step_ends(lm, state) is False
    state.tokens.append(7)
    assert method.step_ends(lm, state) is True and method.feed_after(lm, state) is not None
    assert state.extra["compressing"] == 6  # the step's tokens, the picked one included


def test_compressing_steps_lowers_the_peak_cache_and_counts_insertions():
    lm = tiny_model(positions=1024)
    query = torch.tensor([lm.tokenizer.encode(PROBLEM.question)])
    peaks = {}
    for policy in ("none", "interval"):
        method = trained(lm, policy=policy, interval=8)
        stats: dict = {}
        tokens = list(decode(lm, method, method.new_memory(lm), query, 60, stats=stats))
        assert len(tokens) == 60
        peaks[policy] = stats
    assert peaks["none"].get("insertions", 0) == 0
    assert peaks["interval"]["insertions"] == 60 // 8 - (60 % 8 == 0)  # a step of 8 tokens, then <COMP>
    per_slot = peaks["none"]["peak_kv_bytes"] / (query.shape[1] + 59)  # the question and 59 fed tokens, raw
    raw_at_most = query.shape[1] + peaks["interval"]["insertions"] * 2 + 8  # question, <COMP> entries, one step
    assert peaks["interval"]["peak_kv_bytes"] <= per_slot * raw_at_most < peaks["none"]["peak_kv_bytes"]


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2"])
@pytest.mark.parametrize(
    ("policy", "keep_last", "lookahead"),
    [("interval", 0, False), ("newline", 0, False), ("classifier", 0, False), ("classifier", 0, True),
     ("interval", 2, False)],
)  # fmt: skip
def test_problems_of_different_lengths_decoded_in_one_batch_give_the_answers_of_one_at_a_time(
    family, policy, keep_last, lookahead, monkeypatch
):
    from ccmem.generation import decode_batch

    lm = tiny_model(family, positions=1024)
    method = trained(lm, policy=policy, interval=5, threshold=0.5, keep_last=keep_last, lookahead=lookahead)
    if policy == "newline":  # the tiny vocabulary has no line break: pretend some frequent ids hold one
        pretended = set(range(0, lm.model.config.vocab_size, 3))
        monkeypatch.setattr(reasoning, "newline_ids", lambda lm: pretended)
    if policy == "classifier":  # a head that fires on some tokens and not on others
        torch.manual_seed(1)
        head = method.reasoning(lm).classifier
        torch.nn.init.normal_(head.weight, std=4 / head.in_features**0.5)
        torch.nn.init.zeros_(head.bias)
    problems = gsm8k.generate(4, "test", seed=11)
    queries = [torch.tensor([lm.tokenizer.encode(p.question[: 40 + 25 * i])]) for i, p in enumerate(problems)]
    limits = [30, 18, 30, 24]  # rows leave the batch at different steps
    memory = method.new_memory(lm)
    alone, alone_stats = [], []
    for query, limit in zip(queries, limits, strict=True):
        stats: dict = {}
        alone.append(list(decode(lm, method, memory, query, limit, stats=stats)))
        alone_stats.append(stats)
    batch_stats: list[dict] = [{} for _ in queries]
    together: list[list[int]] = [[] for _ in queries]
    for step in decode_batch(lm, method, [memory] * 4, queries, limits, stats=batch_stats):
        for row, token in enumerate(step):
            if token is not None:
                together[row].append(token)
    assert together == alone
    insertions = [s.get("insertions", 0) for s in alone_stats]
    assert sum(insertions) >= 4 and len(set(insertions)) > 1  # the rows compress, each at its own times
    assert [s.get("insertions", 0) for s in batch_stats] == insertions
    assert [s["peak_kv_bytes"] for s in batch_stats] == [s["peak_kv_bytes"] for s in alone_stats]


def test_the_classifier_learns_where_labelled_steps_end():
    lm = tiny_model(positions=512)
    method = ccmem.get_method("ccm-reason", n_tok=2, min_segment=3)
    state = method.module_for(lm)
    state.requires_grad_(True)
    samples = [
        gsm8k.reasoning_sample(lm.tokenizer, p.question, gsm8k.training_answer(p))
        for p in gsm8k.generate(4, "train", seed=5)
    ]
    batch = method.make_batch(samples)
    assert int((batch.step_end == 1).sum()) == sum(len(s.steps["labelled"]) for s in samples)
    optimizer = torch.optim.Adam(state.classifier.parameters(), lr=0.05)
    with method.attached(lm):
        losses = []
        for _ in range(40):
            loss = method.training_loss(lm, batch)  # the LM loss (the LoRA is not trained here) + the classifier's
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.15, losses


def test_reasoning_samples_mark_step_ends_between_tokens():
    lm = tiny_model()  # one token per character: offsets are character offsets
    answer = gsm8k.training_answer(PROBLEM)
    sample = sample_for(lm)
    ends = [e for e in gsm8k.step_boundaries(answer) if e < len(answer.rstrip())]
    assert sample.steps["labelled"] == ends
    assert sample.steps["newline"] == [e for e in ends if answer[e - 1] == "\n"]
    assert sample.tail[sample.answer_start : -1] == lm.tokenizer.encode(answer)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"threshold": 1.0}, r"threshold must be in \(0, 1\)"),
        ({"policy": "often"}, "policy must be one of"),
        ({"keep_last": -1}, "keep_last must not be negative"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        ccmem.get_method("ccm-reason", **options)


@pytest.mark.parametrize("preset", ["gsm8k-ccm-reason", "gsm8k-ccm-reason-keep"])
def test_the_gsm8k_preset_trains_through_the_harness_and_its_adapter_keeps_the_classifier(tmp_path, preset):
    from ccmem.adapter import read_adapter
    from ccmem.train.config import load_config
    from ccmem.train.trainer import train

    config = load_config(
        preset,
        [
            "train.max_steps=2",
            "train.batch_size=2",
            "train.eval_steps=2",
            "train.save_steps=2",
            "data.n_train=4",
            "data.n_eval=2",
            "train.gradient_checkpointing=false",
            f"output_dir={tmp_path}",
        ],
    )
    result = train(config, lm=tiny_model(positions=1024))
    adapter = read_adapter(result.output)
    assert any("classifier" in name for name in adapter.tensors)
    assert adapter.method == "ccm-reason" and adapter.train_dataset == "gsm8k" and result.steps == 2
    assert adapter.options["keep_last"] == config.method.keep_last  # loading the adapter keeps its raw tokens


def test_the_gsm8k_preset_trains_on_the_real_file_format_with_the_forks_train_ratio(tmp_path, monkeypatch):
    """The real-GSM8K path through the harness: the fixture's train.jsonl, 3 of its 5 problems trained on and 2
    held out (``data.train_ratio=0.6``); the adapter loads, and the run read the fixture's problems, not generated
    ones. (Without the ratio the fixture is too small to hold out GSM8K's 500: refused, see test_gsm8k_data.)"""
    import ccmem.train.trainer as trainer
    from ccmem.adapter import read_adapter
    from ccmem.train.config import load_config

    seen: dict[str, list] = {}
    read = trainer.load_examples

    def spy(cfg, split):
        seen[split] = read(cfg, split)
        return seen[split]

    monkeypatch.setattr(trainer, "load_examples", spy)
    small = ["train.max_steps=2", "train.batch_size=2", "train.eval_steps=2", "train.save_steps=2"]
    small += ["train.gradient_checkpointing=false", "data.max_length=1000", "data.system=Hi."]
    config = load_config(
        "gsm8k-ccm-reason", [*small, f"output_dir={tmp_path}", f"data.path={FIXTURE}", "data.train_ratio=0.6"]
    )
    result = trainer.train(config, lm=tiny_model(positions=1024))
    assert result.steps == 2
    fixture = {p.question for p in gsm8k.read_jsonl(FIXTURE / "train.jsonl")}
    train, validation = ({e.query for e in seen[s]} for s in ("train", "validation"))
    assert (len(train), len(validation)) == (3, 2) and train | validation == fixture and not train & validation
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["train_examples"] == 3 and summary["data_version"] == f"files:{FIXTURE}"
    adapter = read_adapter(result.output)
    assert adapter.train_dataset == "gsm8k" and adapter.extra["config"]["data"]["train_ratio"] == 0.6
    assert ccmem.load(tiny_model(positions=1024), "ccm-reason", adapter=result.output).adapter_trained


def test_repro_gsm8k_reads_the_real_test_file_given_with_data(tmp_path, monkeypatch, capsys):
    """``ccmem repro gsm8k --data <folder>`` end to end on the fixture, a tiny model standing in for SmolLM2."""
    import sys

    import ccmem.loading
    from ccmem import cli
    from ccmem.adapter import save_adapter

    lm = tiny_model(positions=1024)
    path = save_adapter(trained(lm), lm, tmp_path / "adapter.safetensors")
    monkeypatch.setattr(ccmem.loading, "load_model", lambda *args, **kwargs: lm)
    args = ["--data", str(FIXTURE), "--adapter", str(path), "--n", "2", "--policies", "none,interval:4"]
    args += ["--max-new-tokens", "6", "--batch-size", "2", "--out-dir", str(tmp_path / "out")]
    args += ["-O", "min_segment=2", "--system", "Solve it."]  # the method's own options and a system prompt
    monkeypatch.setattr(sys, "argv", ["ccmem", "repro", "gsm8k", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert not exit_info.value.code, capsys.readouterr()
    rows = [json.loads(line) for line in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    assert [r["policy"] for r in rows] == ["none", "interval:4"]
    assert all(r["data"] == f"GSM8K test at {FIXTURE}" and r["problems"] == 2 for r in rows)
    assert all(r["min_segment"] == 2 and r["system"] == "Solve it." and r["attn"] for r in rows)
    assert "| interval:4 |" in (tmp_path / "out" / "report.md").read_text()


def test_repro_gsm8k_says_when_the_file_holds_fewer_problems_than_asked(tmp_path, monkeypatch, capsys):
    """`--n 500` on a file of 4 problems made a table of 4 without a word."""
    import sys

    import ccmem.loading
    from ccmem import cli
    from ccmem.adapter import save_adapter
    from ccmem.data import gsm8k

    lm = tiny_model(positions=1024)
    path = save_adapter(trained(lm), lm, tmp_path / "adapter.safetensors")
    monkeypatch.setattr(ccmem.loading, "load_model", lambda *args, **kwargs: lm)
    held = len(gsm8k.read_split(str(FIXTURE), "test"))
    args = ["--data", str(FIXTURE), "--adapter", str(path), "--n", "500", "--policies", "none"]
    args += ["--max-new-tokens", "2", "--out-dir", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", ["ccmem", "repro", "gsm8k", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out = capsys.readouterr()
    assert not exit_info.value.code, out
    assert f"--n 500, but {FIXTURE} holds {held} test problems" in " ".join(out.err.split())
    rows = [json.loads(line) for line in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    assert rows[0]["problems"] == held < 500


def test_repro_gsm8k_refuses_an_encoder_decoder_folder_for_its_family_not_its_missing_adapter(
    tmp_path, monkeypatch, capsys
):
    """`repro gsm8k -m <T5 folder>` with no adapter said "no adapter given", so the user trained one first."""
    import sys

    import ccmem.loading
    from ccmem import cli

    folder = tmp_path / "t5"
    tiny_model("t5").model.config.save_pretrained(folder)
    monkeypatch.setattr(ccmem.loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.chdir(tmp_path)  # no default adapter here
    monkeypatch.setattr(sys, "argv", ["ccmem", "repro", "gsm8k", "--model", str(folder), "-o", "out"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    text = " ".join(capsys.readouterr().err.replace("│", " ").split())  # the error box's borders
    assert exit_info.value.code == 2 and "is an encoder-decoder model (t5)" in text and "no adapter" not in text


def test_repro_gsm8k_prompts_as_the_adapter_trained_and_keeps_an_earlier_table(tmp_path, monkeypatch, capsys):
    """Without --system the problems get the system prompt recorded in the adapter (its training config's
    data.system), not the chat template's own; an existing table is replaced only with --overwrite."""
    import sys

    import ccmem.loading
    from ccmem import cli
    from ccmem.adapter import save_adapter

    lm = tiny_model(positions=1024)
    extra = {"config": {"data": {"dataset": "gsm8k", "system": "Think in steps."}}}
    path = save_adapter(trained(lm), lm, tmp_path / "adapter.safetensors", extra=extra)
    monkeypatch.setattr(ccmem.loading, "load_model", lambda *args, **kwargs: lm)
    out = tmp_path / "out"

    def repro(*more: str) -> tuple[int, str]:
        args = ["--data", str(FIXTURE), "--adapter", str(path), "--n", "1", "--policies", "none"]
        monkeypatch.setattr(
            sys, "argv", ["ccmem", "repro", "gsm8k", *args, "--max-new-tokens", "4", "-o", str(out), *more]
        )
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        captured = capsys.readouterr()
        return int(exit_info.value.code or 0), captured.out + captured.err

    assert repro()[0] == 0
    rows = out / "rows.jsonl"
    assert json.loads(rows.read_text())["system"] == "Think in steps."
    first = rows.read_bytes()
    code, text = repro("--system", "")
    assert code != 0 and "--overwrite" in text and rows.read_bytes() == first
    assert repro("--system", "", "--overwrite")[0] == 0
    assert json.loads(rows.read_text())["system"] is None  # --system "": none


def test_the_policy_table_runs_every_policy_on_the_same_problems(tmp_path):
    from ccmem.adapter import save_adapter
    from ccmem.repro.gsm8k import GSM8KSettings, markdown, parse_policy, run, write

    lm = tiny_model(positions=1024)
    method = trained(lm)
    path = save_adapter(method, lm, tmp_path / "adapter.safetensors")
    settings = GSM8KSettings(
        adapter=str(path), n=3, policies=["none", "interval:8", "classifier:0.5"], max_new_tokens=24, batch_size=2
    )
    rows = run(lm, settings)
    one_by_one = run(lm, GSM8KSettings(**{**vars(settings), "batch_size": 1}))
    measured = ("accuracy", "insertions", "peak_kv_mb", "tokens_per_problem")
    assert [[r[k] for k in measured] for r in rows] == [[r[k] for k in measured] for r in one_by_one]
    by = {r["policy"]: r for r in rows}
    assert by["none"]["insertions"] == 0 and by["none"]["never_fired"] is None
    assert by["interval:8"]["insertions"] == 2  # 23 tokens fed: steps end after 8 and 16
    assert by["interval:8"]["peak_kv_mb"] < by["none"]["peak_kv_mb"]
    assert 0 <= by["classifier:0.5"]["classifier_share"] < 1
    assert "generated arithmetic problems" in by["none"]["data"]
    assert {p.name for p in write(rows, tmp_path)} == {"rows.jsonl", "report.md", "accuracy-vs-kv.png"}
    assert "| interval:8 |" in markdown(rows) and "Against `none`" in markdown(rows)
    assert "3 problems of generated" in markdown(rows)
    assert "1 problem of generated" in markdown([{**r, "problems": 1} for r in rows])  # not "1 problems"
    saved = 1 - by["interval:8"]["peak_kv_mb"] / by["none"]["peak_kv_mb"]  # said as a saving, not "+7% saved"
    assert f"- interval:8: peak KV {saved:.0%} saved, time x" in markdown(rows)
    with pytest.raises(ValueError, match="unknown policy"):
        parse_policy("sometimes")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"policies": []}, "policies names no policy"),
        ({"policies": ["none", "classifier:1.5"]}, r"policy 'classifier:1.5': threshold must be in \(0, 1\)"),
        ({"policies": ["interval:abc"]}, "'abc' is not a whole number of tokens"),
        ({"policies": ["classifier:high"]}, r"'high' is not a threshold in \(0, 1\)"),
        ({"data": "EMPTY"}, "holds no GSM8K problem"),
        ({"options": {"threshold": 0.7}}, "-O threshold is what --policies sets"),
        ({"options": {"min_segment": 0}}, "min_segment must be at least 1"),
    ],
)
def test_the_policy_table_refuses_what_would_fail_before_any_work(tmp_path, changes, message):
    """Checked before the model loads: a bad last policy must not cost the runs of the ones before it."""
    from ccmem.repro.gsm8k import GSM8KSettings

    (tmp_path / "empty.jsonl").write_text("")
    if changes.get("data") == "EMPTY":
        changes = {"data": str(tmp_path / "empty.jsonl")}
    with pytest.raises(ValueError, match=message):
        GSM8KSettings(**changes).check()


def test_a_policy_that_never_fires_says_the_memory_stayed_raw(tmp_path):
    """A step longer than the whole generation: no <COMP> is ever inserted, and the row and table say so."""
    from ccmem.adapter import save_adapter
    from ccmem.repro.gsm8k import GSM8KSettings, markdown, run

    lm = tiny_model(positions=1024)
    path = save_adapter(trained(lm), lm, tmp_path / "adapter.safetensors")
    settings = GSM8KSettings(adapter=str(path), n=3, policies=["interval:8", "interval:64"], max_new_tokens=24)
    by = {r["policy"]: r for r in run(lm, settings)}
    assert by["interval:8"]["insertions"] == 2 and by["interval:8"]["never_fired"] == 0
    assert by["interval:64"]["insertions"] == 0 and by["interval:64"]["never_fired"] == 3
    table = markdown(list(by.values()))
    assert "memory stayed raw |" in table.splitlines()[2]
    assert table.splitlines()[4].startswith("| interval:8 |") and table.splitlines()[4].endswith("| 0 of 3 |")
    assert table.splitlines()[5].startswith("| interval:64 |") and table.splitlines()[5].endswith("| 3 of 3 |")


def wider_llama() -> LoadedModel:
    """A tiny LLaMA of another size than :func:`tiny_model`'s (hidden 48, not 32): another classifier head."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**COMMON, "hidden_size": 48}, num_attention_heads=4, num_key_value_heads=2)
    config.max_position_embeddings = 1024
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    return LoadedModel(model=model, tokenizer=TinyTokenizer(), name="tiny-llama-wide")


def test_a_reasoning_adapter_and_its_classifier_are_refused_on_another_model(tmp_path):
    from ccmem.adapter import AdapterMismatchError, read_adapter, save_adapter
    from ccmem.repro.gsm8k import GSM8KSettings, run

    lm = tiny_model(positions=1024)
    path = save_adapter(trained(lm), lm, tmp_path / "adapter.safetensors")
    assert any("classifier" in name for name in read_adapter(path).tensors)
    ccmem.load(tiny_model(positions=1024), "ccm-reason", adapter=path)  # the same model: loads
    for other in (tiny_model("qwen2", positions=1024), wider_llama()):
        with pytest.raises(AdapterMismatchError, match=f"trained for 'tiny-llama-gqa', not for '{other.name}'"):
            ccmem.load(other, "ccm-reason", adapter=path, policy="classifier")
    settings = GSM8KSettings(adapter=str(path), n=1, policies=["classifier:0.5"], max_new_tokens=4)
    with pytest.raises(AdapterMismatchError, match=r"not for 'tiny-llama-wide'.*use an adapter trained for this"):
        run(wider_llama(), settings)  # the table refuses it before decoding


def test_the_two_stage_recipe_trains_and_its_table_runs_on_the_stage1_model(tmp_path):
    """Stage 1 (gsm8k-full: an always-on LoRA teaching the solutions), stage 2 (gsm8k-ccm-reason on top of it),
    and the policy table with the stage-1 run merged first, as README's commands do."""
    from ccmem.repro.gsm8k import GSM8KSettings, run
    from ccmem.train.config import load_config
    from ccmem.train.trainer import train

    small = ["train.max_steps=2", "train.batch_size=2", "train.eval_steps=2", "train.save_steps=2"]
    small += ["data.n_train=4", "data.n_eval=2", "train.gradient_checkpointing=false"]
    stage1 = train(
        load_config("gsm8k-full", [*small, f"output_dir={tmp_path}", "run_id=s1"]), lm=tiny_model(positions=1024)
    )
    stage2 = train(
        load_config("gsm8k-ccm-reason", [*small, f"output_dir={tmp_path}", "run_id=s2", f"load_path={tmp_path}/s1"]),
        lm=tiny_model(positions=1024),
    )
    lm = tiny_model(positions=1024)
    settings = GSM8KSettings(adapter=str(stage2.output), n=2, policies=["interval:8"], max_new_tokens=12)
    with pytest.raises(ValueError, match="trained on top of stage-1 LoRA"):
        run(lm, settings)  # the adapter needs its stage-1 run
    rows = run(lm, GSM8KSettings(**{**vars(settings), "stage1": str(tmp_path / "s1")}))
    assert rows[0]["stage1"] == str(tmp_path / "s1") and lm.stage1 is not None and stage1.steps == 2


def test_room_is_made_for_the_comp_positions_decoding_feeds_not_only_for_the_tokens():
    """With 4 <COMP> per 4-token step, 30 new tokens took 30 + 28 positions: a 40-position model decoded to
    position 68 without a word, its RoPE past its range."""
    from ccmem.api import ContextTooLongError

    lm = tiny_model(positions=40)
    session = ccmem.load(lm, "ccm-reason", system_prompt=None, policy="interval", interval=4, min_segment=1, n_tok=4)
    assert session.method.decode_positions(30) == 30 + 4 * 7
    with pytest.raises(ContextTooLongError, match=r"the prompt with room for its answer \(68 tokens\)"):
        list(session.stream_ids([5] * 10, 30, stop_ids=set()))
    stats: dict = {}
    tokens = list(decode(lm, session.method, session.memory, torch.tensor([[5] * 4]), 12, stats=stats))
    assert len(tokens) == 12 and 2 <= stats["insertions"] <= 3  # within the bound: 4 + 12 + 3 * 4 = 28 positions
    assert session.method.decode_positions(12) == 12 + 4 * 3
    assert len(list(session.stream_ids([5] * 4, 12, stop_ids=set()))) == 12  # 28 positions fit in 40
    assert ccmem.get_method("ccm-reason", policy="none").decode_positions(30) == 30


def test_the_newline_policy_reads_each_models_own_line_breaks():
    """One method instance serving two models: each ends steps at its own tokenizer's line-break ids."""

    class LineBreaksAt(TinyTokenizer):
        def __init__(self, newline_id: int) -> None:
            self.newline_id = newline_id

        def __len__(self) -> int:
            return 50

        def decode(self, ids, skip_special_tokens: bool = True) -> str:
            return "".join("\n" if int(i) == self.newline_id else "a" for i in ids)

    method = ccmem.get_method("ccm-reason", policy="newline", min_segment=1)
    first, second = tiny_model(), tiny_model()
    first.tokenizer, second.tokenizer = LineBreaksAt(7), LineBreaksAt(9)
    state = DecodeState(cache=None, position=0, memory=None, tokens=[5, 7])
    assert method.step_ends(first, state) and not method.step_ends(second, state)
    state.tokens[-1] = 9
    assert not method.step_ends(first, state) and method.step_ends(second, state)
