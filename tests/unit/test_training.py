"""``ccmem train``: config presets and overrides, the Trainer run, resume, refusals, stage 1 -> stage 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ccmem.adapter import AdapterMismatchError, read_adapter, save_adapter
from ccmem.api import load
from ccmem.data.loaders import load_examples
from ccmem.memory import MemoryMismatchError
from ccmem.registry import get_method
from ccmem.train.config import ConfigError, DataConfig, load_config, preset_names
from ccmem.train.trainer import train
from tests.conftest import tiny_model

TINY = [
    "data.k=1",
    "data.small_talk=0",
    "data.n_train=16",
    "data.n_eval=4",
    "data.max_length=250",
    "data.system=Hi.",
    "train.batch_size=4",
    "train.max_steps=4",
    "train.eval_steps=2",
    "train.save_steps=2",
    "train.logging_steps=1",
    "train.lr=1e-2",
]


def _config(tmp_path, *extra: str, preset: str = "persona-ccm-concat"):
    return load_config(preset, [f"output_dir={tmp_path}", "model=tiny", *TINY, *extra])


def test_presets_cover_the_recipe_and_overrides_are_typed_and_checked():
    assert {"persona-ccm-concat", "persona-ccm-merge", "persona-full", "unified-full"} <= set(preset_names())
    for name in preset_names():  # every preset parses, with a known method and its options
        assert load_config(name, []).run_id == name
    stage2 = load_config("unified-ccm-concat-stage2", [])  # the two stages of the general recipe
    assert (stage2.load_path, stage2.method.name) == ("runs/unified-full", "ccm-concat")
    assert stage2.init_from == "runs/unified-ccm-concat-3/adapter.safetensors"  # the 4-token run it was measured from
    config = load_config("persona-ccm-merge", ["train.lr=1e-4", "method.n_tok=2", "method.lora_targets=[q_proj]"])
    assert (config.run_id, config.train.lr, config.method.n_tok) == ("persona-ccm-merge", 1e-4, 2)
    assert config.method.lora_targets == ("q_proj",)
    with pytest.raises(ConfigError, match=r"unknown config key 'train.learning_rate'; did you mean 'train.lr'"):
        load_config("persona-ccm-concat", ["train.learning_rate=1e-4"])
    with pytest.raises(ConfigError, match=r"method.n_tok must be int, got 'four'"):
        load_config(None, ["method.n_tok=four"])
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="cannot be trained; trainable methods: full, ccm-concat"):
        load_config(None, ["method.name=none"])
    # method.* keys are the method's own options: gist has no `recurrent`, full has no `n_tok`
    assert load_config(None, ["method.name=gist", "method.n_tok=2"]).method.n_tok == 2
    with pytest.raises(ConfigError, match="method 'full' has no option 'n_tok'"):
        load_config(None, ["method.name=full", "method.n_tok=2"])
    with pytest.raises(ConfigError, match=r"no option 'ntok' \(did you mean 'n_tok'\?\)"):
        load_config(None, ["method.ntok=2"])
    # Everything the real run would refuse is refused here too, before anything is written.
    for bad, message in [
        ("method.n_tok=0", "n_tok must be at least 1"),
        ("train.lr=-1", "train.lr must be positive"),
        ("data.dataset=nonsense", "unknown data.dataset 'nonsense'"),
        ("train.scheduler=cosin", "train.scheduler must be one of"),
        ("train.lr=inf", "train.lr must be a finite number, got inf"),  # trained to NaN weights, reported done
        ("train.max_grad_norm=nan", "train.max_grad_norm must be a finite number"),  # silently no clipping
        ("train.weight_decay=nan", "train.weight_decay must be a finite number"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config("persona-ccm-concat", [bad])
    # "~" at the start of a path key is the home folder: bash leaves data.path=~/x as it is
    home = load_config(None, ["data.path=~/x", "output_dir=~/runs", "init_from=shipped"])
    assert (home.data.path, home.output_dir) == (str(Path.home() / "x"), str(Path.home() / "runs"))
    assert home.init_from == "shipped"
    with pytest.raises(ConfigError, match=r"multiple of train.eval_steps"):
        load_config(None, ["train.save_steps=30"])
    assert load_config(None, ["train.lr=1e-4"]).fingerprint() != load_config(None, []).fingerprint()


def test_a_config_file_s_errors_name_the_file_and_a_key_given_twice_is_refused(tmp_path):
    """A bad value in the user's YAML file is reported with the file (it read as if typed on the command line),
    and a key set twice is refused with both lines (PyYAML keeps the last one silently)."""
    for name, text, message in [
        ("mine", "train:\n  lr: abc\n", r"^in .*mine.yaml: train.lr must be float, got 'abc'"),
        ("typo", "trian:\n  lr: 1\n", r"^in .*typo.yaml: unknown config key 'trian.lr'; did you mean 'train.lr'"),
        (
            "twice",
            "run_id: mine\ntrain:\n  lr: 1.0e-4\n  max_steps: 3\n  lr: 2.0e-4\n",
            r"twice.yaml: 'lr' is given twice in one section \(lines 3 and 5\)",
        ),
    ]:
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(str(path))
    # the same key in two sections is two keys; the override on the command line is still named as such
    fine = tmp_path / "fine.yaml"
    fine.write_text("train:\n  seed: 1\ndata:\n  seed: 2\n")
    config = load_config(str(fine), ["train.max_steps=7"])
    assert (config.train.seed, config.data.seed, config.train.max_steps) == (1, 2, 7)
    with pytest.raises(ConfigError, match=r"^train.lr must be float"):
        load_config(str(fine), ["train.lr=abc"])
    assert all(load_config(name).run_id == name for name in preset_names())  # every preset reads strictly


def test_a_run_id_of_dots_only_is_refused_with_the_rule():
    for bad in ("..", ".", "a/b"):
        with pytest.raises(ConfigError, match=r"must hold at least one letter or digit, and nothing but letters"):
            load_config(None, [f"run_id={bad}"])
    assert load_config(None, ["run_id=v1.2_b-3"]).run_id == "v1.2_b-3"


def test_text_keys_take_the_text_typed_not_what_yaml_makes_of_it():
    """A system prompt starting with "#" was read as a YAML comment, so training ran with no system prompt at all;
    "Note: be brief" was refused as a mapping and run_id=007 as the number 7."""
    config = load_config(None, ["data.system=# Rules: be brief", "run_id=007"])
    assert (config.data.system, config.run_id) == ("# Rules: be brief", "007")
    assert load_config(None, ["data.system=Note: be brief"]).data.system == "Note: be brief"
    for off in ("data.system=null", "data.system=", "data.system=None", "data.system=~"):
        assert load_config(None, [off]).data.system is None
    assert load_config(None, ["train.lr=1e-4", "method.lora_targets=[q_proj]"]).train.lr == 1e-4


def test_an_empty_section_or_target_list_is_read_as_written(tmp_path):
    """A config file's section with every line commented out (`data:` alone) was refused as an unknown key 'data';
    method.lora_targets=[] trained the default targets while the run's config recorded []."""
    path = tmp_path / "mine.yaml"
    path.write_text("method:\n  name: ccm-concat\ndata:\n  # dataset: persona\ntrain:\n  max_steps: 7\n")
    config = load_config(str(path))
    assert (config.method.name, config.train.max_steps, config.data) == ("ccm-concat", 7, DataConfig())
    with pytest.raises(ConfigError, match="lora_targets is empty"):
        load_config(None, ["method.lora_targets=[]"])


def test_train_writes_adapter_logs_and_small_checkpoints_and_the_adapter_loads(tmp_path):
    lm = tiny_model()
    result = train(_config(tmp_path, "train.gradient_checkpointing=true", "train.grad_accum=2"), lm=lm)
    run = tmp_path / "persona-ccm-concat"
    assert result.output == run / "adapter.safetensors" and result.steps == 4
    assert result.eval_loss is not None and result.tokens > 0
    logged = (run / "log.jsonl").read_text()
    assert '"eval_loss"' in logged and '"tokens_per_second"' in logged
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))  # `tensorboard --logdir runs/<run_id>`
    checkpoint = load_file(run / "checkpoint-4" / "model.safetensors")
    assert all(k.startswith("method_state.") for k in checkpoint)  # trainable tensors only
    trained = load_file(result.output)
    assert trained["comp.weight"].abs().sum() > 0
    assert any(v.abs().sum() > 0 for k, v in trained.items() if k.endswith(".B"))  # LoRA B starts at zero
    session = load(tiny_model(), "ccm-concat", adapter=result.output, system_prompt="Hi.")
    assert session.adapter_trained


def test_resume_continues_where_the_run_stopped_and_ends_like_an_uninterrupted_run(tmp_path):
    full = train(_config(tmp_path / "a", "train.patience=0"), lm=tiny_model())
    config = _config(tmp_path / "b", "train.patience=0")
    train(config, lm=tiny_model())
    run = config.run_dir
    import shutil

    shutil.rmtree(run / "checkpoint-4")  # as if the session ended after step 2
    (run / "adapter.safetensors").unlink()
    with (run / "log.jsonl").open("a") as log:
        log.write('{"step": 4, "lo')  # a line a kill cut short, after the rows of steps 3-4 already logged
    resumed = train(config, lm=tiny_model())
    assert resumed.resumed_from and resumed.resumed_from.endswith("checkpoint-2")

    def steps(run_dir):
        return [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]

    assert steps(run) == steps(full.run_dir)  # the log reads as the uninterrupted run's: no step twice

    def tokens(run_dir):
        return [json.loads(line)["tokens"] for line in (run_dir / "log.jsonl").read_text().splitlines()]

    assert tokens(run) == tokens(full.run_dir)  # counted from the run's start, not again from 0 after the resume
    a, b = load_file(full.output), load_file(resumed.output)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_a_run_folder_blocked_by_a_file_is_refused_by_name(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"runs is a file, so the run folder .* cannot be made; choose another"):
        train(_config(tmp_path / "runs" / "sub"), lm=tiny_model())
    (tmp_path / "persona-ccm-concat").write_text("")
    with pytest.raises(ConfigError, match="persona-ccm-concat is a file"):
        train(_config(tmp_path), lm=tiny_model())


def test_a_resumed_run_stops_early_where_the_uninterrupted_run_stops(tmp_path):
    # lr 2 on the tiny model: two evaluations in a row (every 2 steps) do not improve, so patience 2 stops early
    extra = ("train.patience=2", "train.max_steps=12", "train.lr=2.0", "train.save_total_limit=6")
    full = train(_config(tmp_path / "a", *extra), lm=tiny_model())
    assert full.steps <= 8  # stopped early, at least two evaluations before the end
    config = _config(tmp_path / "b", *extra)
    train(config, lm=tiny_model())
    import shutil

    # as if the session ended one evaluation before the stop (one evaluation without improvement counted)
    shutil.rmtree(config.run_dir / f"checkpoint-{full.steps}")
    (config.run_dir / "adapter.safetensors").unlink()
    resumed = train(config, lm=tiny_model())
    assert resumed.resumed_from and resumed.resumed_from.endswith(f"checkpoint-{full.steps - 2}")
    assert resumed.steps == full.steps  # the count of evaluations without improvement survived the interruption


@pytest.mark.parametrize(
    "extra",
    [("train.patience=0", "train.max_steps=6"), ("train.patience=2", "train.max_steps=12", "train.lr=2.0")],
    ids=["max_steps", "early_stopping"],
)
def test_a_run_stopped_before_its_adapter_was_written_writes_it_without_training_further(tmp_path, extra):
    """A kill or a full disk after the last checkpoint and before adapter.safetensors: the rerun resumed from that
    checkpoint and trained on, one step past max_steps (4 steps an epoch here) or eval_steps past an early stop."""
    config = _config(tmp_path, *extra)
    full = train(config, lm=tiny_model())
    assert full.steps == 6  # the early-stopping run stops at 6 too: its evaluations at 4 and 6 do not improve
    adapter = load_file(full.output)
    for done in ("adapter.safetensors", "summary.json"):
        (config.run_dir / done).unlink()
    resumed = train(config, lm=tiny_model())
    assert resumed.steps == 6 and max(int(p.name.split("-")[1]) for p in config.run_dir.glob("checkpoint-*")) == 6
    assert json.loads((config.run_dir / "summary.json").read_text())["steps"] == 6
    for key, value in load_file(resumed.output).items():  # the best checkpoint's tensors, as the run wrote them
        torch.testing.assert_close(value, adapter[key])


def test_the_best_evaluation_between_two_checkpoints_is_saved_so_that_it_is_the_one_restored(tmp_path, monkeypatch):
    """With train.eval_steps below train.save_steps, a best evaluation at a step without a checkpoint was never
    saved: the run restored the best earlier checkpoint, and its summary gave the unsaved evaluation's loss."""
    from transformers import Trainer

    losses = {1: 5.0, 2: 4.0, 3: 3.0, 4: 3.5, 5: 3.6, 6: 3.7}  # the best at step 3, between checkpoints 2 and 4
    monkeypatch.setattr(Trainer, "evaluate", lambda self, **kwargs: {"eval_loss": losses[self.state.global_step]})
    config = _config(tmp_path, "train.max_steps=6", "train.eval_steps=1", "train.save_steps=2")
    result = train(config, lm=tiny_model())
    summary = json.loads((config.run_dir / "summary.json").read_text())
    assert (result.eval_loss, Path(summary["best_checkpoint"]).name) == (3.0, "checkpoint-3")
    best = load_file(config.run_dir / "checkpoint-3" / "model.safetensors")
    for key, value in load_file(result.output).items():
        torch.testing.assert_close(value, best[f"method_state.{key}"])


def test_an_interrupted_checkpoint_is_set_aside_and_a_restart_without_one_keeps_one_log(tmp_path, caplog):
    """A kill or a full disk while the Trainer wrote checkpoint-N left it half-written, and every rerun failed on it
    ("Can't find a valid checkpoint"); a run killed before its first checkpoint logged its steps twice."""
    import shutil

    full = train(_config(tmp_path / "a", "train.patience=0"), lm=tiny_model())

    def steps(run_dir):
        return [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]

    config = _config(tmp_path / "b", "train.patience=0")
    run = config.run_dir
    train(config, lm=tiny_model())
    for done in ("adapter.safetensors", "summary.json"):
        (run / done).unlink()
    weights = run / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short
    resumed = train(config, lm=tiny_model())
    assert resumed.resumed_from and resumed.resumed_from.endswith("checkpoint-2")
    assert "model.safetensors is damaged" in caplog.text and (run / "incomplete-checkpoint-4").is_dir()
    assert steps(run) == steps(full.run_dir)
    a, b = load_file(full.output), load_file(resumed.output)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)

    for folder in run.glob("*checkpoint-*"):  # killed before its first checkpoint: only log rows remain
        shutil.rmtree(folder)
    for done in ("adapter.safetensors", "summary.json"):
        (run / done).unlink()
    train(config, lm=tiny_model())
    assert steps(run) == steps(full.run_dir)  # no step logged twice


def test_a_checkpoint_that_cannot_be_written_says_where_and_how_much_room_is_left(tmp_path, monkeypatch):
    """A full disk while the Trainer wrote a checkpoint ended the run with torch's "[enforce fail at
    inline_container.cc:672] . unexpected pos 56576 vs 56464", naming neither the disk nor the checkpoint."""
    from transformers import Trainer

    def full_disk(self, output_dir):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 56576 vs 56464")

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", full_disk)
    config = _config(tmp_path, "train.max_steps=2")
    with pytest.raises(
        OSError, match=r"writing checkpoint-2 to .*persona-ccm-concat failed \(\[enforce .*MiB are free"
    ):
        train(config, lm=tiny_model())


@pytest.mark.parametrize("where", ["checkpoint", "adapter"])
def test_weights_that_cannot_be_written_are_said_with_the_room_left_not_in_safetensors_words(
    tmp_path, monkeypatch, where
):
    """safetensors' "Error while serializing: I/O error: No space left on device" is no OSError: it passed the
    message that names the checkpoint and the free space."""
    from safetensors import SafetensorError

    import ccmem.adapter
    import ccmem.train.trainer as trainer

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(trainer if where == "checkpoint" else ccmem.adapter, "save_file", full_disk)
    config = _config(tmp_path, "train.max_steps=2")
    what = r"checkpoint-2 to .*" if where == "checkpoint" else r".*adapter\.safetensors "
    with pytest.raises(OSError, match=rf"writing {what}failed \(Error while serializing.*MiB are free"):
        train(config, lm=tiny_model())


def test_a_second_process_training_the_same_run_is_refused(tmp_path):
    """Two trainings with one run_id both ran, writing the same checkpoints and an interleaved log."""
    config = _config(tmp_path, "train.max_steps=2")
    config.run_dir.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); f.write('4242'); f.flush();"
         " fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(config.run_dir / ".lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=r"is being trained by another process \(pid 4242"):
            train(config, lm=tiny_model())
    finally:
        holder.kill()
        holder.wait()
    assert train(config, lm=tiny_model()).steps == 2  # free again once the other process is gone


def test_group_by_length_batches_similar_dialogs_and_keeps_older_hashes(tmp_path):
    # 64 dialogs of 1-3 facts and 0-3 small-talk turns: enough for the sampler to sort groups of 4 batches.
    varied = ["data.n_train=64", "data.k=3", "data.small_talk=3", "data.max_length=1024"]
    varied += ["train.max_steps=4", "train.eval_steps=4", "train.save_steps=4"]
    padding = {}
    for grouped in (False, True):
        config = _config(tmp_path / str(grouped), *varied, f"train.group_by_length={grouped}")
        train(config, lm=tiny_model(positions=1024))  # every dialog fits: none is skipped for its length
        padding[grouped] = json.loads((config.run_dir / "summary.json").read_text())["padding_fraction"]
    assert padding[True] < padding[False], padding
    # A config at the default hashes as it did before the field existed, so shipped runs still match presets.
    config = load_config("persona-ccm-concat", [])
    assert config.fingerprint() == "c93635b8109f"
    assert load_config("persona-ccm-concat", ["train.group_by_length=true"]).fingerprint() != config.fingerprint()


def test_a_finished_run_is_a_no_op_and_resume_with_a_changed_config_is_refused(tmp_path):
    config = _config(tmp_path, "train.max_steps=2")
    train(config, lm=tiny_model())
    summary = (config.run_dir / "summary.json").read_text()
    again = train(config, lm=tiny_model())
    assert again.finished_before and again.steps == 2 and again.tokens == 0
    assert (config.run_dir / "summary.json").read_text() == summary  # not rewritten, no step past max_steps
    assert not (config.run_dir / "checkpoint-3").exists()
    (config.run_dir / "summary.json").unlink()  # as if the session had ended before the run finished
    # A run made before train.group_by_length existed (its config.yaml lacks it) resumes with the default...
    saved = config.run_dir / "config.yaml"
    saved.write_text(saved.read_text().replace("  group_by_length: false\n", ""))
    assert "group_by_length" not in saved.read_text()
    # ... as does one made before its method gained an option (any option: no list of them to keep up to date)
    saved.write_text(saved.read_text().replace("  lora_dropout: 0.0\n", ""))
    assert "lora_dropout" not in saved.read_text()
    assert train(config, lm=tiny_model()).resumed_from
    # ...but not with another value: that would change the data order mid-run.
    with pytest.raises(ConfigError, match=r"train.group_by_length: False -> True"):
        train(_config(tmp_path, "train.max_steps=2", "train.group_by_length=true"), lm=tiny_model())
    with pytest.raises(ConfigError, match=r"train.lr: 0.01 -> 0.001"):
        train(_config(tmp_path, "train.max_steps=2", "train.lr=1e-3"), lm=tiny_model())


def test_a_finished_mixture_run_hashes_against_its_saved_config():
    """Rerunning a finished mixture run crashed (AttributeError deep in the hash) before it could say the run was
    done: data.mixture and data.families are dicts whose default is None."""
    config = load_config("unified-ccm-concat-long", [])
    saved = yaml.safe_load(yaml.safe_dump(config.to_dict()))  # what the run's config.yaml holds
    assert config.fingerprint(saved) == config.fingerprint()
    older = yaml.safe_load(yaml.safe_dump(config.to_dict()))
    del older["data"]["min_turns"]  # a run made before the field existed
    assert config.fingerprint(older) == config.fingerprint()


def test_a_run_made_before_an_option_existed_keeps_its_hash_until_the_option_is_set(tmp_path):
    config = _config(tmp_path, "train.max_steps=1", "train.eval_steps=1", "train.save_steps=1")
    train(config, lm=tiny_model())
    # As if the run had been made before lora_dropout and train.weight_decay existed: its config.yaml lacks them and
    # its summary holds the hash of a config without them.
    saved = config.run_dir / "config.yaml"
    saved.write_text(saved.read_text().replace("  lora_dropout: 0.0\n", "").replace("  weight_decay: 0.0\n", ""))
    older = {k: dict(v) if isinstance(v, dict) else v for k, v in config.to_dict().items()}
    del older["method"]["lora_dropout"], older["train"]["weight_decay"]
    summary = json.loads((config.run_dir / "summary.json").read_text())
    summary["config_hash"] = config.fingerprint(older)
    (config.run_dir / "summary.json").write_text(json.dumps(summary))
    assert config.fingerprint(older) != config.fingerprint()  # the fields were hashed...
    assert train(config, lm=tiny_model()).finished_before  # ...but the run knew neither: still the same run
    with pytest.raises(ConfigError, match=r"another config.*method.lora_dropout: 0.0 -> 0.1"):
        train(
            _config(
                tmp_path, "train.max_steps=1", "train.eval_steps=1", "train.save_steps=1", "method.lora_dropout=0.1"
            ),
            lm=tiny_model(),
        )


def test_a_run_that_fails_before_training_does_not_block_its_run_id(tmp_path):
    config = _config(tmp_path, "data.max_length=5")  # no sample fits: refused after the data is read
    with pytest.raises(ConfigError, match="no train sample fits"):
        train(config, lm=tiny_model())
    assert not (config.run_dir / "config.yaml").exists()
    assert train(_config(tmp_path, "train.max_steps=1", "train.eval_steps=1", "train.save_steps=1"), lm=tiny_model())


def test_samples_past_the_models_positions_are_skipped_as_over_long_ones_are(tmp_path, caplog):
    # data.max_length (1024) is above this model's 131 positions: the samples between them were trained on with
    # positions the model never had (an IndexError for learned positions, silent for RoPE).
    with caplog.at_level("WARNING", logger="ccmem.train.trainer"):
        train(_config(tmp_path, "train.max_steps=1", "train.eval_steps=1"), lm=tiny_model(positions=131))
    assert "skipped 4 samples longer than the model's 131 positions" in caplog.text
    with pytest.raises(ConfigError, match=r"no train sample fits the model's 64 positions \(the shortest takes"):
        train(_config(tmp_path / "short"), lm=tiny_model(positions=64))


def test_records_without_an_answer_are_skipped_not_a_crash_at_the_step_that_draws_them(tmp_path, caplog):
    """A MetaICL record with an empty output has no token to train on: the run stopped at whatever step (or
    evaluation) drew a batch of it alone, "this batch has no answer tokens to train on"."""
    task = tmp_path / "data" / "t"
    task.mkdir(parents=True)
    rows = [{"input": f"word {i}", "output": "" if i == 0 else "yes"} for i in range(4)]
    for split in ("train", "dev"):
        (task / f"t_4_100_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = ["data.dataset=metaicl", f"data.path={tmp_path / 'data'}", "train.batch_size=1", "train.shuffle=false"]
    with caplog.at_level("WARNING", logger="ccmem.train.trainer"):
        result = train(_config(tmp_path, *data, "train.max_steps=2"), lm=tiny_model())
    assert result.steps == 2 and result.eval_loss is not None
    assert "train: skipped 1 samples with no answer to train on (first: t-train-0)" in caplog.text
    assert "validation: skipped 1 samples" in caplog.text


def test_missing_data_stage1_and_init_files_are_said_before_the_model_loads(tmp_path, monkeypatch):
    """A data.path, load_path or init_from that is not there was found only once the model had loaded (20 s for
    the default model, minutes for an 8B one)."""
    import ccmem.train.trainer as trainer

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the files were checked")

    monkeypatch.setattr(trainer, "load_model", never)
    # files that are there but not what the key takes were read only once the model had loaded, too
    concat = save_adapter(get_method("ccm-concat", n_tok=2), tiny_model(), tmp_path / "concat.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    (empty := tmp_path / "empty.jsonl").write_text("")
    for setting, error in [
        (f"data.path={tmp_path / 'nope'}", r"nope does not exist"),
        (f"load_path={tmp_path / 'stage1'}", r"load_path: no stage-1 LoRA at"),
        (f"load_path={concat}", r"load_path: .*concat\.safetensors is a ccm-concat adapter; a stage-1 LoRA comes"),
        (f"init_from={tmp_path / 'a.safetensors'}", r"init_from: .*a\.safetensors does not exist"),
        (f"init_from={tmp_path / 'junk.safetensors'}", r"init_from: .*junk\.safetensors is not a readable"),
        # a shipped adapter ccmem does not ship was found only once the model had loaded
        ("init_from=shipped", r"init_from=shipped: ccmem ships no ccm-concat adapter for tiny"),
        ("init_from=shipped:nope", r"init_from=shipped:nope: ccmem ships no nope adapter for tiny"),
        # an empty validation file was found only once the model had loaded, and named as the training file
        (f"data.eval_path={empty}", r"the validation split of persona at .*empty\.jsonl holds no example"),
    ]:
        with pytest.raises((ConfigError, FileNotFoundError), match=error):
            train(_config(tmp_path, setting))


def test_wandb_without_its_package_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """--wandb without the wandb package failed in the Trainer's constructor, once the data was read and the model
    loaded (minutes for a large one), with transformers' "WandbCallback requires wandb to be installed"."""
    import ccmem.train.trainer as trainer

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before wandb was checked")

    monkeypatch.setattr(trainer, "load_model", never)
    has = trainer._has
    monkeypatch.setattr(trainer, "_has", lambda module: module != "wandb" and has(module))
    with pytest.raises(ConfigError, match=r"wandb=true \(--wandb\) .* not installed: pip install wandb, or leave"):
        train(_config(tmp_path, "wandb=true"))
    assert not (tmp_path / "persona-ccm-concat").exists()


def test_a_run_that_diverged_to_nan_writes_no_adapter_and_says_so(tmp_path):
    """At a learning rate that blows up, every tensor became NaN, log.jsonl showed a loss of 0.0 (the Trainer
    replaced NaN losses) and the run said "done" beside an adapter of NaNs."""
    config = _config(tmp_path, "train.lr=1e6", "train.max_grad_norm=0")
    with pytest.raises(RuntimeError, match=r"training diverged: \d+ trained tensors hold NaN.*Lower train.lr"):
        train(config, lm=tiny_model())
    assert not (config.run_dir / "adapter.safetensors").exists()
    losses = [json.loads(line).get("loss") for line in (config.run_dir / "log.jsonl").read_text().splitlines()]
    assert any(loss != loss for loss in losses if loss is not None)  # NaN, as it was


def test_stage1_lora_then_stage2_on_top_and_load_path_for_another_model_is_refused(tmp_path):
    stage1 = train(_config(tmp_path, "train.max_steps=2", preset="persona-full"), lm=tiny_model())
    assert read_adapter(stage1.output).method == "full"  # stage 1 is an ordinary adapter of `full`
    lm = tiny_model()
    before = lm.model.model.layers[0].self_attn.q_proj.weight.clone()
    stage2 = train(_config(tmp_path, "train.max_steps=2", f"load_path={stage1.run_dir}"), lm=lm)
    assert not torch.equal(before, lm.model.model.layers[0].self_attn.q_proj.weight)
    # The stage-2 adapter only makes sense on top of its stage-1 LoRA: refused without it, accepted with it.
    with pytest.raises(AdapterMismatchError, match="trained on top of stage-1 LoRA"):
        load(tiny_model(), "ccm-concat", adapter=stage2.output)
    on_stage1 = load(tiny_model(), "ccm-concat", adapter=stage2.output, stage1=stage1.run_dir)
    assert on_stage1.adapter_trained
    # A memory made on the stage-1 weights is refused by the plain model, whose keys and values differ.
    on_stage1.remember("I live in Oslo.", "Noted!")
    memory = on_stage1.save_memory(tmp_path / "m.safetensors")
    with pytest.raises(MemoryMismatchError, match=r"stage1='[0-9a-f]+', but this session has stage1=''"):
        load(tiny_model(), "ccm-concat").load_memory(memory)
    load(tiny_model(), "ccm-concat", adapter=stage2.output, stage1=stage1.run_dir).load_memory(memory)
    # An adapter trained without stage 1 may start a stage-2 run: the result belongs to the stage-1 weights.
    plain = train(_config(tmp_path, "train.max_steps=1", "run_id=plain"), lm=tiny_model())
    warm = train(_config(tmp_path, "train.max_steps=1", "run_id=warm", f"load_path={stage1.run_dir}",
                         f"init_from={plain.output}"), lm=tiny_model())  # fmt: skip
    assert read_adapter(warm.output).stage1 == read_adapter(stage2.output).stage1 != ""
    with pytest.raises(ConfigError, match="was trained for model 'tiny-llama-gqa'"):
        train(
            _config(tmp_path, "train.max_steps=2", "run_id=other", f"load_path={stage1.run_dir}"),
            lm=tiny_model("qwen2"),
        )
    with pytest.raises(ConfigError, match="load_path: no stage-1 LoRA at"):
        train(_config(tmp_path, "run_id=none", f"load_path={tmp_path}"), lm=tiny_model())
    from ccmem.stage1 import Stage1Error, merge_stage1

    # the same name, other weights: it said "trained for model 'tiny-llama-gqa', not for 'tiny-llama-gqa'"
    with pytest.raises(Stage1Error, match="trained on other weights of 'tiny-llama-gqa' than the ones loaded"):
        merge_stage1(tiny_model(seed=1), stage1.run_dir)


def test_accelerate_launch_with_two_cpu_processes(tmp_path, tiny_model_dir):
    """The same command under ``accelerate launch`` with 2 processes (gloo on CPU): DDP over both, rank 0 writes."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "ccmem.cli", "train", "persona-ccm-concat", f"model={tiny_model_dir}",
        f"output_dir={tmp_path}", *TINY, "train.max_steps=2",
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "persona-ccm-concat"
    assert (run / "adapter.safetensors").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2


def test_gist_trains_through_the_same_recipe_and_its_adapter_loads(tmp_path):
    """The trainer knows no method: gist (the whole context compressed at once) trains like CCM."""
    result = train(_config(tmp_path, "train.max_steps=2", preset="persona-gist"), lm=tiny_model())
    adapter = read_adapter(result.output)
    assert adapter.method == "gist" and adapter.options["n_tok"] == 4
    assert adapter.extra["config"]["method"]["name"] == "gist"
    session = load(tiny_model(), "gist", adapter=result.output, system_prompt="Hi.")
    assert session.adapter_trained
    session.remember("I live in Oslo.", "Noted!")
    assert session.memory.segment_lengths()["compressed"] == 4


def test_init_from_starts_from_an_adapter_and_refuses_one_of_another_shape(tmp_path):
    first = train(_config(tmp_path / "a", "train.max_steps=2"), lm=tiny_model())
    # A merge run can start from the concat adapter (same state); with lr 0 it ends exactly where it started.
    warm = _config(tmp_path / "b", f"init_from={first.output}", "train.lr=1e-12", "train.max_steps=2",
                   preset="persona-ccm-merge")  # fmt: skip
    result = train(warm, lm=tiny_model())
    a, b = load_file(first.output), load_file(result.output)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert warm.fingerprint() != _config(tmp_path / "b", preset="persona-ccm-merge").fingerprint()
    with pytest.raises(ConfigError, match=r"init_from: .*lora_rank=8.*lora_rank=4"):
        train(_config(tmp_path / "c", f"init_from={first.output}", "method.lora_rank=4"), lm=tiny_model())
    with pytest.raises(ConfigError, match="ships no ccm-concat adapter for tiny"):
        train(_config(tmp_path / "d", "init_from=shipped"), lm=tiny_model())
    # another method's adapter with nothing of this state: said so, not blamed on an option it does not have
    for preset, options in (("icformer-finetune", "method.num_hidden_layers=1"), ("icformer-finetune", "train.seed=0")):
        with pytest.raises(ConfigError, match=r"is a ccm-concat adapter, and icformer cannot start from it"):
            train(_config(tmp_path / "e", f"init_from={first.output}", options, preset=preset), lm=tiny_model())
    with pytest.raises(AdapterMismatchError, match=r"was trained for method 'ccm-concat', not 'icformer'"):
        load(tiny_model(), "icformer", adapter=first.output)
    # shipped:NAME: another of the model's shipped adapters (a merge run from the concat one); the error lists them
    with pytest.raises(ConfigError, match=r"init_from=shipped:ccm-merge: ccmem ships no ccm-merge adapter .*: nothing"):
        train(_config(tmp_path / "d", "init_from=shipped:ccm-merge"), lm=tiny_model())


@pytest.mark.parametrize("n_tok", [2, 6])
def test_init_from_carries_a_ccm_adapter_over_to_another_n_tok(tmp_path, n_tok):
    """Fewer (or more) <COMP> tokens per step start from an adapter's LoRA and its first <COMP> embeddings."""
    first = train(_config(tmp_path / "a", "train.max_steps=2"), lm=tiny_model())
    warm = _config(tmp_path / "b", f"init_from={first.output}", f"method.n_tok={n_tok}", "train.lr=1e-12",
                   "train.max_steps=1")  # fmt: skip
    a, b = load_file(first.output), load_file(train(warm, lm=tiny_model()).output)
    assert a.keys() == b.keys() and b["comp.weight"].shape[0] == n_tok
    expected = a["comp.weight"][torch.arange(n_tok) % 4]
    torch.testing.assert_close(b["comp.weight"], expected, rtol=0, atol=1e-6)
    for key in (k for k in a if k != "comp.weight"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_init_from_starts_a_learned_merge_from_a_concat_adapter_at_the_mean(tmp_path):
    """``method.weighting=learned`` starts from an adapter that never had a gate (it predates the option, which
    it was trained at the default of): LoRA and <COMP> carried over, the gate at zero (the running mean); with
    ``n_tok`` changed too. The gate then trains."""
    first = train(_config(tmp_path / "a", "train.max_steps=2"), lm=tiny_model())
    warm = _config(tmp_path / "b", f"init_from={first.output}", "method.weighting=learned", "method.n_tok=2",
                   "train.lr=1e-12", "train.max_steps=1", preset="persona-ccm-merge")  # fmt: skip
    a, b = load_file(first.output), load_file(train(warm, lm=tiny_model()).output)
    assert set(b) == set(a) | {"merge_gate"}
    assert b["merge_gate"].abs().max() < 1e-9
    torch.testing.assert_close(b["comp.weight"], a["comp.weight"][:2], rtol=0, atol=1e-6)
    # Dialogs of several turns (a one-turn memory is its only step: nothing to weigh, no gradient for the gate).
    trained = _config(tmp_path / "c", f"init_from={first.output}", "method.weighting=learned", "train.lr=1e-2",
                      "train.max_steps=2", "data.k=3", "data.small_talk=2", preset="persona-ccm-merge")  # fmt: skip
    result = train(trained, lm=tiny_model())
    gate = load_file(result.output)["merge_gate"]
    assert gate.abs().max() > 1e-4
    assert read_adapter(result.output).options["weighting"] == "learned"
    # Another gate_scale keeps every score (the gate rescaled); a trained gate cannot become a mean merge.
    rescaled = _config(tmp_path / "d", f"init_from={result.output}", "method.weighting=learned", "train.lr=1e-12",
                       "method.gate_scale=128", "train.max_steps=1", preset="persona-ccm-merge")  # fmt: skip
    torch.testing.assert_close(load_file(train(rescaled, lm=tiny_model()).output)["merge_gate"], gate / 2)
    with pytest.raises(ConfigError, match="weighting='learned', this run has weighting='mean'"):
        train(_config(tmp_path / "e", f"init_from={result.output}", preset="persona-ccm-merge"), lm=tiny_model())
    # n_tok differing too (which alone would carry over): the error still names the option that cannot
    with pytest.raises(ConfigError, match=r"weighting='learned', this run has weighting='mean'.*no mean-merge"):
        train(_config(tmp_path / "f", f"init_from={result.output}", "method.n_tok=3", preset="persona-ccm-merge"),
              lm=tiny_model())  # fmt: skip


def test_init_from_carries_a_merge_adapter_over_to_more_banks(tmp_path):
    """Banks group the same slots differently: a one-bank merge adapter starts a banked run as it is, and the
    result records its banks."""
    first = train(_config(tmp_path / "a", "train.max_steps=1", preset="persona-ccm-merge"), lm=tiny_model())
    warm = _config(tmp_path / "b", f"init_from={first.output}", "method.banks=3", "train.lr=1e-12",
                   "train.max_steps=1", preset="persona-ccm-merge")  # fmt: skip
    result = train(warm, lm=tiny_model())
    a, b = load_file(first.output), load_file(result.output)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert read_adapter(result.output).options["banks"] == 3


def test_unified_preset_trains_on_the_mixture(tmp_path):
    config = _config(
        tmp_path, "init_from=null", "data.n_train=10", "data.mixture={dialogs: 0.6, persona: 0.2, icl: 0.2}",
        "train.max_steps=2", "data.max_length=4000", preset="unified-ccm-concat",
    )  # fmt: skip
    assert config.data.dataset == "mixture" and config.train.group_by_length
    result = train(config, lm=tiny_model(positions=8192))
    assert result.steps == 2 and read_adapter(result.output).train_dataset == "mixture"
    # the second run of the recipe continues from the first's adapter on other draws of the same mixture
    more = _config(
        tmp_path / "more", f"init_from={result.output}", "data.n_train=10", "train.max_steps=2",
        "data.mixture={dialogs: 0.6, persona: 0.2, icl: 0.2}", "data.max_length=4000",
        preset="unified-ccm-concat-continue",
    )  # fmt: skip
    assert load_config("unified-ccm-concat-continue", []).init_from == "runs/unified-ccm-concat/adapter.safetensors"
    first_draws = {repr((e.context, e.query, e.answer)) for e in load_examples(config.data)}
    assert not first_draws & {repr((e.context, e.query, e.answer)) for e in load_examples(more.data)}
    assert train(more, lm=tiny_model(positions=8192)).steps == 2


def test_stream_preset_trains_every_block_on_text_read_as_a_stream(tmp_path):
    """The streaming adapter's data: a contiguous stretch of a play cut into ~32-token blocks (before spaces) that
    tokenize as the whole stretch does, every block a label (language modelling from the blocks before it)."""
    from ccmem.data import text
    from ccmem.data.records import to_sample
    from ccmem.registry import get_method

    lm = tiny_model(positions=2048)
    examples = text.stream_examples(6, "train")
    for example in examples:
        stretch = "".join(example.context) + example.answer
        document = next(p for p in text.packaged_plays() if example.id.startswith(p.stem + "-stream"))
        assert stretch in document.read_text(encoding="utf-8", errors="replace")
        sample = to_sample(lm.tokenizer, example)
        assert sample.tokens == lm.tokenizer.encode(stretch, add_special_tokens=False)
        blocks = [*example.context, example.answer]
        assert len(blocks) >= 9 and all(50 <= len(b) <= 160 for b in blocks)  # ~100 characters, cut at spaces
    held_out = {e.id.split("-stream")[0] for e in text.stream_examples(6, "validation")}
    assert held_out and not held_out & {e.id.split("-stream")[0] for e in examples}

    batch = get_method("ccm-concat", n_tok=4).make_batch([to_sample(lm.tokenizer, examples[0])])
    sample = to_sample(lm.tokenizer, examples[0])
    assert int((batch.labels != -100).sum()) == len(sample.tokens)  # every token of every block, no <COMP>

    config = _config(
        tmp_path,
        "init_from=null",
        "data.n_train=8",
        "train.max_steps=2",
        "data.max_length=4000",
        preset="stream-ccm-concat",
    )
    preset = load_config("stream-ccm-concat", [])
    assert (preset.data.dataset, preset.data.system) == ("text-stream", None)
    assert preset.init_from == "runs/unified-ccm-concat/adapter.safetensors"  # the chat adapter it started from
    result = train(config, lm=lm)
    assert result.steps == 2 and read_adapter(result.output).train_dataset == "text-stream"


def test_a_run_is_not_resumed_on_data_that_changed_since_it_started(tmp_path):
    import shutil

    from ccmem.data import persona

    data = tmp_path / "data"
    data.mkdir()
    persona.write_jsonl(data / "train.jsonl", list(persona.generate(8, "train", seed=3)))
    persona.write_jsonl(data / "validation.jsonl", list(persona.generate(4, "validation", seed=3)))
    original = (data / "train.jsonl").read_bytes()
    config = _config(tmp_path, "train.patience=0", f"data.path={data}")
    train(config, lm=tiny_model())
    run = config.run_dir
    shutil.rmtree(run / "checkpoint-4")  # as if the session had ended after step 2
    (run / "adapter.safetensors").unlink()
    (run / "summary.json").unlink()
    persona.write_jsonl(data / "train.jsonl", list(persona.generate(8, "train", seed=4)))  # the file was replaced
    with pytest.raises(ConfigError, match=r"was started on other data \(data.path .*\): the samples it reads changed"):
        train(config, lm=tiny_model())
    (data / "train.jsonl").write_bytes(original)
    assert train(config, lm=tiny_model()).resumed_from.endswith("checkpoint-2")


def test_a_checkpoint_of_a_stopped_run_exports_as_an_adapter(tmp_path, monkeypatch, capsys):
    """A run stopped before max_steps (the session ended) is usable: checkpoint-N becomes an adapter that holds
    that checkpoint's tensors, loads like a finished run's, and says which step of which schedule it is."""
    import shutil

    from ccmem.train.trainer import export_checkpoint

    config = _config(tmp_path, "train.patience=0")
    train(config, lm=tiny_model())
    run = config.run_dir
    shutil.rmtree(run / "checkpoint-4")  # as if the session had ended after step 2
    (run / "adapter.safetensors").unlink()
    (run / "summary.json").unlink()
    # a checkpoint the run is writing meanwhile (weights there, trainer_state.json not yet): it was moved aside as
    # incomplete, under the training run, which then died writing into it
    (run / "checkpoint-3").mkdir()
    shutil.copy(run / "checkpoint-2" / "model.safetensors", run / "checkpoint-3" / "model.safetensors")
    path = export_checkpoint(config, lm=tiny_model())  # the latest complete one: 2
    assert path == run / "checkpoint-2" / "adapter.safetensors"
    assert (run / "checkpoint-3" / "model.safetensors").is_file() and not list(run.glob("incomplete-*"))
    shutil.rmtree(run / "checkpoint-3")
    saved = load_file(run / "checkpoint-2" / "model.safetensors")
    adapter = read_adapter(path)
    assert adapter.extra["steps"] == 2 and "of a 4-step schedule" in adapter.extra["exported_checkpoint"]
    assert adapter.extra["eval_loss"] is not None
    for key, value in adapter.tensors.items():
        torch.testing.assert_close(value, saved[f"method_state.{key}"])
    session = load(tiny_model(), "ccm-concat", adapter=path, system_prompt="Hi.")
    session.remember("My cat is Tom.", "Nice.")
    assert session.memory.num_slots > 0
    with pytest.raises(ConfigError, match="has no checkpoint-3; it has: 2"):
        export_checkpoint(config, 3, lm=tiny_model())
    with pytest.raises(ConfigError, match=r"train.lr: 0.01 -> 0.001"):  # another config is not this run
        export_checkpoint(_config(tmp_path, "train.patience=0", "train.lr=1e-3"), lm=tiny_model())
    # the run resumes as before
    assert train(config, lm=tiny_model()).resumed_from.endswith("checkpoint-2")


def test_shuffle_off_keeps_the_data_order_and_save_optimizer_off_checkpoints_tensors_only(tmp_path, monkeypatch):
    """The IC-Former scripts' ``shuffle`` and ``save_optimizer`` (``train.shuffle``, ``train.save_optimizer``)."""
    from ccmem.methods.ccm import CCMConcat
    from ccmem.registry import get_method
    from ccmem.train.trainer import samples_for

    batches: list[list[tuple[int, ...]]] = []
    make_batch = CCMConcat.make_batch

    def recording(self, samples, pad_id=0):
        batches.append([tuple(s.tail) for s in samples])
        return make_batch(self, samples, pad_id)

    monkeypatch.setattr(CCMConcat, "make_batch", recording)
    lm = tiny_model()
    config = _config(tmp_path / "a", "train.shuffle=false", "train.save_optimizer=false")
    expected = [tuple(s.tail) for s in samples_for(lm, config, get_method("ccm-concat"), "train")]

    def trained_order(config) -> list[tuple[int, ...]]:
        batches.clear()
        train(config, lm=lm)
        return [tail for batch in batches for tail in batch if tail in set(expected)]

    assert trained_order(config) == expected  # 4 steps of 4: the 16 samples once, in the data's order
    assert sorted(os.listdir(tmp_path / "a" / config.run_id / "checkpoint-4")) == sorted(
        os.listdir(tmp_path / "a" / config.run_id / "checkpoint-2")
    )
    assert not any("optimizer" in f for f in os.listdir(tmp_path / "a" / config.run_id / "checkpoint-4"))
    shuffled = _config(tmp_path / "b")  # the default: a random order, and checkpoints that can resume AdamW
    order = trained_order(shuffled)
    assert sorted(order) == sorted(expected) and order != expected
    assert any("optimizer" in f for f in os.listdir(tmp_path / "b" / shuffled.run_id / "checkpoint-4"))
    with pytest.raises(ConfigError, match="cannot keep the data's order"):
        load_config("persona-ccm-concat", ["train.shuffle=false", "train.group_by_length=true"])
    assert load_config("icformer-pretrain", ["train.shuffle=false"]).train.shuffle is False


def test_one_data_file_for_both_splits_is_warned(tmp_path, caplog):
    """A persona file as data.path is read for training and validation alike: early stopping then chose on
    training data without a word."""
    from ccmem.data import persona
    from ccmem.data.records import to_sample
    from ccmem.train.config import DataConfig
    from ccmem.train.trainer import warn_shared_samples
    from tests.conftest import TinyTokenizer

    file = persona.write_jsonl(tmp_path / "mine.jsonl", list(persona.generate(4, "train")))

    def samples(split: str, path=file):
        return [
            to_sample(TinyTokenizer(), e) for e in load_examples(DataConfig(dataset="persona", path=str(path)), split)
        ]

    assert warn_shared_samples(samples("train"), samples("validation")) == 4
    assert "4 of 4 validation samples are also training samples" in caplog.text
    held_out = persona.write_jsonl(tmp_path / "held.jsonl", list(persona.generate(3, "validation")))
    assert warn_shared_samples(samples("train"), samples("validation", held_out)) == 0


def test_adapters_from_a_users_own_training_files_are_named_so_and_misgiven_adapters_say_what_to_pass(
    tmp_path, monkeypatch, capsys
):
    """A run's folder or checkpoint given as --adapter said only 'no adapter file'; rows said an adapter trained on
    the user's files was trained on the generator of that name; an --adapter for a method not run was ignored."""
    from ccmem.data import persona
    from ccmem.eval.harness import adapter_provenance, check_adapters
    from ccmem.options import OptionError

    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation"):
        persona.write_jsonl(data / f"{split}.jsonl", list(persona.generate(16 if split == "train" else 4, split)))
    config = _config(tmp_path, "train.max_steps=2", f"data.path={data}")
    result = train(config, lm=tiny_model())
    session = load(tiny_model(), "ccm-concat", adapter=result.output, system_prompt="Hi.")
    assert adapter_provenance(session)[1] == f"persona (files:{data})"
    with pytest.raises(FileNotFoundError, match=r"is a folder; its adapter is .*adapter\.safetensors: pass that file"):
        load(tiny_model(), "ccm-concat", adapter=config.run_dir)
    with pytest.raises(FileNotFoundError, match=r"is a training checkpoint, not an adapter: .*--export-checkpoint 2"):
        load(tiny_model(), "ccm-concat", adapter=config.run_dir / "checkpoint-2")
    with pytest.raises(OptionError, match="--adapter names ccm-concat, which this run does not run"):
        check_adapters("tiny", ["full", "none"], {}, {"ccm-concat": result.output})
    (data / "validation.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"no validation file .*data\.eval_path=FILE"):
        train(_config(tmp_path, "train.max_steps=2", f"data.path={data}", "run_id=fails"), lm=tiny_model())
    assert not (tmp_path / "fails").exists()  # a run that failed before training leaves no folder behind


def test_training_samples_are_cut_into_the_chunks_add_would_compress(tmp_path):
    """A turn longer than ``method.max_chunk_tokens`` is several compression steps at inference; the trainer cuts
    it the same way, and measures ``data.max_length`` on the cut sample (a <COMP> block per piece)."""
    from ccmem.registry import get_method
    from ccmem.train.trainer import samples_for

    lm = tiny_model()
    whole = samples_for(lm, _config(tmp_path), get_method("ccm-concat"), "train")
    assert max(len(c) for s in whole for c in s.chunks) > 6  # turns longer than the cut below
    method = get_method("ccm-concat", max_chunk_tokens=6)
    cut = samples_for(lm, _config(tmp_path, "method.max_chunk_tokens=6"), method, "train")
    assert all(0 < len(c) <= 6 for s in cut for c in s.chunks)
    assert [s.tokens for s in cut] == [s.tokens for s in whole]
    assert all(len(a.chunks) > len(b.chunks) for a, b in zip(cut, whole, strict=True) if a.chunks != b.chunks)


def test_an_adapter_file_is_named_by_its_hash_given_as_a_path_or_a_string(tmp_path):
    import hashlib

    from ccmem.adapter import file_hash

    path = tmp_path / "adapter.safetensors"
    path.write_bytes(b"not really weights")
    expected = hashlib.sha256(b"not really weights").hexdigest()[:16]
    assert file_hash(path) == file_hash(str(path)) == expected


def test_a_run_resumes_with_its_paths_spelled_another_way(tmp_path):
    """`model=/models/x/` resuming a run made with `model=/models/x` was refused as "another config"."""
    folder = tmp_path / "models" / "tiny"
    steps = ("train.max_steps=1", "train.eval_steps=1", "train.save_steps=1")
    train(_config(tmp_path, *steps, f"model={folder}"), lm=tiny_model())
    again = _config(tmp_path, *steps, f"model={folder}/")
    assert train(again, lm=tiny_model()).finished_before  # the same run, not trained twice
    assert again.model == str(folder)  # the run's own spelling
    with pytest.raises(ConfigError, match=r"another config.*model: .*tiny' -> .*tiny-2'"):
        train(_config(tmp_path, *steps, f"model={folder}-2"), lm=tiny_model())


def test_a_run_without_optimizer_state_resumes_its_learning_rate_schedule(tmp_path, caplog):
    """With train.save_optimizer=false a resumed run started its schedule (warm-up included) again mid-run."""
    import shutil

    extra = ("train.patience=0", "train.save_optimizer=false", "train.warmup_ratio=0.5", "train.scheduler=linear")
    full = train(_config(tmp_path / "a", *extra), lm=tiny_model())
    config = _config(tmp_path / "b", *extra)
    train(config, lm=tiny_model())
    run = config.run_dir
    assert not (run / "checkpoint-2" / "scheduler.pt").exists()
    shutil.rmtree(run / "checkpoint-4")  # as if the session ended after step 2
    (run / "adapter.safetensors").unlink()
    with caplog.at_level("WARNING", logger="ccmem.train.trainer"):
        resumed = train(config, lm=tiny_model())
    assert resumed.resumed_from.endswith("checkpoint-2")
    assert "no optimizer state" in caplog.text and "resumes at step 2" in caplog.text

    def rates(run_dir):
        rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        return {r["step"]: r["learning_rate"] for r in rows if "learning_rate" in r}

    assert rates(run) == rates(full.run_dir)
    assert len(set(rates(run).values())) > 1  # the schedule moves: the test compares something
