"""``ccmem train``: one recipe for every trainable method, on the Hugging Face Trainer.

The recipe knows no method: it builds the method's trainable state (one ``nn.Module``,
:meth:`~ccmem.methods.base.Method.module_for`), freezes the model, attaches the method for the run, and asks
the method to lay out batches (``make_batch``) and compute their loss (``training_loss``). The result is a
generic adapter file (:mod:`ccmem.adapter`). The reference's two stages are two runs of it: stage 1
(``method.name=full``: an always-on LoRA with full attention), then stage 2 (``ccm-concat``, ``ccm-merge``,
``gist``: <COMP> embeddings and the conditional LoRA, one masked forward per sample covering every
compression step) with the stage-1 LoRA merged in first when ``load_path`` names that run.

The Trainer brings the rest: gradient accumulation, schedules, mixed precision, ``accelerate launch``
with several processes, checkpoints that hold optimizer/scheduler/RNG/data position, early stopping
with best-checkpoint restore, TensorBoard and (only with ``wandb=true``) Weights & Biases. Checkpoints
hold only the trainable tensors, so they stay a few MB.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainerState, TrainingArguments

from ccmem.adapter import (
    AdapterMismatchError,
    check_state_kind,
    load_adapter,
    read_adapter,
    save_adapter,
    shipped_adapter,
    shipped_adapter_names,
    trained_options,
)
from ccmem.api import check_attention
from ccmem.data.loaders import data_version, load_examples
from ccmem.data.records import MemoryExample, to_sample
from ccmem.data.samples import Sample
from ccmem.fileio import atomic_path, file_in_the_way
from ccmem.loading import LoadedModel, load_model
from ccmem.methods.base import ContextTooLongError, Method
from ccmem.quantize import QuantizeError, refuse_quantized
from ccmem.registry import get_method
from ccmem.stage1 import ADAPTER_FILE, Stage1Error, merge_stage1, read_stage1
from ccmem.train.config import ConfigError, TrainConfig, differences, with_later_fields

try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

CHECKPOINT_WEIGHTS = "model.safetensors"  # the file name the Trainer looks for when resuming


@dataclass
class TrainResult:
    run_dir: Path
    output: Path  # the trained adapter file
    steps: int
    seconds: float
    tokens: int
    eval_loss: float | None
    resumed_from: str | None
    finished_before: bool = False  # the run had already finished: nothing was trained this time

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class TrainingModule(nn.Module):
    """The model plus the method's trainable state, so the Trainer (and DDP) see every parameter."""

    def __init__(self, lm: LoadedModel, method: Method, state: nn.Module):
        super().__init__()
        self.model = lm.model
        self.method_state = state
        self.lm = lm
        self.method = method
        self.tokens_seen = 0  # real tokens trained on (<COMP> included, padding not)
        self.positions_seen = 0  # batch rows x width: real tokens plus padding

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        if self.training:
            self.tokens_seen += (
                int(sum(batch.lengths)) if hasattr(batch, "lengths") else int(batch.attention_mask.sum())
            )
            self.positions_seen += batch.input_ids.numel()
        return {"loss": self.method.training_loss(self.lm, batch)}

    @property
    def padding_fraction(self) -> float | None:
        """Share of the computed positions that were padding (``train.group_by_length`` lowers it)."""
        return round(1 - self.tokens_seen / self.positions_seen, 3) if self.positions_seen else None


class SampleDataset(torch.utils.data.Dataset):
    """Samples as the Trainer's sampler reads them: ``input_ids`` (all the sample's tokens, for the length that
    ``train.group_by_length`` groups by) and the ``sample`` itself, which the collator lays out."""

    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        return {"input_ids": [*s.sink, *(t for c in s.chunks for t in c), *s.tail], "sample": s}


class CompressionTrainer(Trainer):
    """The HF Trainer with a loss from the method and checkpoints of the trainable tensors only.

    Gradient accumulation is exact: each accumulated batch's mean loss is weighed by its share of the items
    (:meth:`ccmem.methods.base.Method.loss_count`: labelled tokens, or samples for sentence-level averaging) of
    the whole step, so ``batch_size=1, grad_accum=4`` gives the gradient of ``batch_size=4``.
    """

    def __init__(self, *args: Any, method: Method, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.method = method
        self.model_accepts_loss_kwargs = True  # compute_loss normalises by num_items_in_batch itself

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """As the Trainer does; and where the checkpoint holds no scheduler state (``train.save_optimizer=false``),
        the learning rate resumes at the checkpoint's step of its schedule: the Trainer started the schedule again,
        warm-up included, in the middle of the run, and said nothing."""
        super()._load_optimizer_and_scheduler(checkpoint)
        scheduler = self.lr_scheduler
        if checkpoint is None or scheduler is None or (Path(checkpoint) / "scheduler.pt").is_file():
            return
        steps = self.state.global_step
        logger.warning(
            "%s holds no optimizer state (train.save_optimizer=false): the optimizer's moments start again from zero; "
            "the learning rate resumes at step %d of its schedule",
            checkpoint,
            steps,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": intended here
            for _ in range(steps):
                scheduler.step()

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | int | None:
        counts = [self.method.loss_count(b["batch"]) for b in batch_samples]
        if not counts or any(c is None for c in counts):
            return None  # the Trainer then divides each batch's loss by the accumulation steps
        total = torch.tensor(sum(c for c in counts if c is not None), device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return total

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        outputs = model(**inputs)
        loss = outputs["loss"]
        count = self.method.loss_count(inputs["batch"]) if num_items_in_batch is not None else None
        if count is not None:
            loss = loss * count / num_items_in_batch  # this batch's share of the whole step's mean
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        return (loss, outputs) if return_outputs else loss

    def prediction_step(
        self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Any = None
    ) -> tuple[torch.Tensor, None, None]:
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        if not self.args.should_save:
            return
        folder = Path(output_dir or str(self.args.output_dir))
        folder.mkdir(parents=True, exist_ok=True)
        module = self.accelerator.unwrap_model(self.model)
        trainable = {n: p.detach().contiguous().cpu() for n, p in module.named_parameters() if p.requires_grad}
        with atomic_path(folder / CHECKPOINT_WEIGHTS) as tmp:
            try:
                save_file(trainable, str(tmp), metadata={"format": "pt"})
            except SafetensorError as err:  # a full disk, in safetensors' own words: said as _save_checkpoint says it
                raise OSError(str(err)) from err

    def _determine_best_metric(self, metrics: dict[str, float], trial: Any) -> bool:
        better = super()._determine_best_metric(metrics, trial)
        if better:  # else a best between two save_steps is never saved: the end restores an older one
            self.control.should_save = True
        return better

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError) as err:  # a full disk reads as torch's "enforce fail at inline_container.cc"
            folder = Path(str(self.args.output_dir))
            free = shutil.disk_usage(folder).free / 2**20
            raise OSError(
                f"writing checkpoint-{self.state.global_step} to {folder} failed ({err}); {free:.1f} MiB are free "
                "there. Free some space (or lower train.save_total_limit) and rerun the same command: it resumes "
                "from the last complete checkpoint"
            ) from err

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        check_loaded(self.accelerator.unwrap_model(self.model), load_result, "checkpoint")


class JsonlLogger(TrainerCallback):
    """Every Trainer log line (loss, lr, eval_loss) as JSON, with throughput, in ``<run>/log.jsonl``: ``tokens``
    counts the run's tokens since its first step (a resumed run goes on from its checkpoint's count),
    ``tokens_per_second`` this session's."""

    def __init__(self, path: Path, module: TrainingModule):
        self.path = path
        self.module = module
        self.started = time.perf_counter()
        self.tokens_before = 0  # tokens trained on up to the checkpoint this session resumes from

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        elapsed = time.perf_counter() - self.started
        row = {
            "step": state.global_step,
            **logs,
            "tokens": self.tokens_before + self.module.tokens_seen,
            "tokens_per_second": round(self.module.tokens_seen / elapsed, 1) if elapsed else None,
            "padding_fraction": self.module.padding_fraction,
        }
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def _trim_log(path: Path, after: int) -> int:
    """Drop the log rows of steps past ``after`` (the checkpoint a run resumes from): the steps an interrupted run
    took beyond it are taken again, and their first rows would stand beside the new ones. A line a kill cut short
    goes too. Returns the ``tokens`` count of the last row kept (0 without one)."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if (step := _log_step(line)) is not None and step <= after]
    if len(kept) < len(lines):
        with atomic_path(path) as tmp:
            tmp.write_text("".join(kept), encoding="utf-8")
    counts = [row["tokens"] for row in map(json.loads, kept) if isinstance(row.get("tokens"), int)]
    return counts[-1] if counts else 0


def _log_step(line: str) -> int | None:
    """The step of a log row; None for a line that is not one (cut short)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------- the run


def samples_for(
    lm: LoadedModel, config: TrainConfig, method: Method, split: str, examples: list[MemoryExample] | None = None
) -> list[Sample]:
    """Tokenized samples of ``split`` (its ``examples``, read unless given); ones longer than ``data.max_length``
    once laid out are skipped (warned)."""
    examples = load_examples(config.data, split) if examples is None else examples
    check_found(config, split, examples)
    samples = [method.fit_sample(to_sample(lm.tokenizer, e, system=config.data.system)) for e in examples]
    trains = [method.has_targets(s) for s in samples]
    if not any(trains):  # caught here, not as an empty batch at step 0
        hint = method.no_targets_hint()
        raise ConfigError(
            f"no {split} sample of {config.data.dataset} has a token to train on for {method.name}: its records "
            f"have no answer{f' ({hint})' if hint else ''}"
        )
    if not all(trains):  # a batch of them alone would have no loss: a crash at whatever step drew it
        first = next(e.id for e, t in zip(examples, trains, strict=True) if not t)
        logger.warning(
            "%s: skipped %d samples with no answer to train on (first: %s)", split, trains.count(False), first
        )
        examples = [e for e, t in zip(examples, trains, strict=True) if t]
        samples = [s for s, t in zip(samples, trains, strict=True) if t]
    lengths = []
    for example, sample in zip(examples, samples, strict=True):
        try:
            lengths.append(method.sample_length(sample))
        except ContextTooLongError as err:  # a method's own limit (icformer's max_seq_len): name the record
            raise ConfigError(f"{split} example {example.id}: {err}") from None
    limit, why = config.data.max_length, f"data.max_length={config.data.max_length}"
    if lm.max_positions is not None and lm.max_positions < limit:  # past them RoPE runs silently off its range
        limit, why = lm.max_positions, f"the model's {lm.max_positions} positions"
    kept = [s for s, n in zip(samples, lengths, strict=True) if n <= limit]
    if len(kept) < len(samples):
        logger.warning("%s: skipped %d samples longer than %s", split, len(samples) - len(kept), why)
    if not kept:
        raise ConfigError(f"no {split} sample fits {why} (the shortest takes {min(lengths)} tokens once laid out)")
    return kept


def check_found(config: TrainConfig, split: str, examples: list[MemoryExample]) -> None:
    """Refuse a ``split`` that holds no example."""
    if not examples:
        path = config.data.eval_path if split == "validation" and config.data.eval_path else config.data.path
        where = f" at {path}" if path else ""
        raise ConfigError(
            f"the {split} split of {config.data.dataset}{where} holds no example; give more data, or a folder with "
            f"train/validation files (data.eval_path names the validation file)"
        )


def warn_shared_samples(train: list[Sample], validation: list[Sample]) -> int:
    """Warn when validation samples are also training samples (a loader given one file reads it for both splits):
    early stopping then picks the checkpoint that fits the training data best. Returns how many are shared."""

    def content(s: Sample) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
        return tuple(map(tuple, s.chunks)), tuple(s.tail)

    seen = {content(s) for s in train}
    shared = sum(content(s) in seen for s in validation)
    if shared:
        logger.warning(
            "%d of %d validation samples are also training samples (one data file read for both splits?): the "
            "validation loss and early stopping then measure the training data; give held-out data with "
            "data.eval_path, or a folder with train and validation files",
            shared,
            len(validation),
        )
    return shared


def prepare_run_dir(config: TrainConfig, *, move_incomplete: bool = True) -> str | None:
    """Check that an existing ``runs/<run_id>`` holds the same config; return the checkpoint to resume from: the
    latest complete one (:func:`checkpoint_complete`). Incomplete ones (a kill or a full disk while saving) are
    moved aside to ``incomplete-checkpoint-N`` with a warning, so that the run resumes from the one before.

    ``config.yaml`` is not written here but once the data and model are ready, so a run that fails before
    training starts does not block its run_id.

    ``move_incomplete=False`` (a reader such as :func:`export_checkpoint`, which may run while the run trains:
    the checkpoint being written looks incomplete) leaves every folder where it is.
    """
    run_dir = config.run_dir
    saved = run_dir / "config.yaml"
    checkpoints = _checkpoints(run_dir)
    for step in sorted(checkpoints, reverse=True):
        why = checkpoint_complete(checkpoints[step])
        if why is None:
            break
        folder = checkpoints.pop(step)
        if not move_incomplete:
            continue
        aside = run_dir / f"incomplete-{folder.name}"
        if aside.exists():
            aside = run_dir / f"incomplete-{folder.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        folder.rename(aside)
        logger.warning(
            "%s is incomplete (%s: saving it was interrupted); moved to %s, resuming from %s",
            folder,
            why,
            aside.name,
            f"checkpoint-{max(checkpoints)}" if checkpoints else "the start",
        )
    if saved.is_file() and (checkpoints or (run_dir / "summary.json").is_file()):
        old = with_later_fields(yaml.safe_load(saved.read_text()))
        _spell_paths_as_saved(config, old)
        new = config.to_dict()
        changed = [d for d in differences(old, new) if not d.startswith(("wandb", "output_dir"))]
        if changed:
            raise ConfigError(
                f"run {config.run_id!r} exists with another config; refusing to resume it with: "
                + "; ".join(changed)
                + ". Use a new run_id, or the original settings."
            )
    return str(checkpoints[max(checkpoints)]) if checkpoints else None


#: Config keys that name a file or folder, which one path may be spelled several ways (``dir`` and ``dir/``).
PATH_KEYS = (("model",), ("load_path",), ("init_from",), ("data", "path"), ("data", "eval_path"))


def _spell_paths_as_saved(config: TrainConfig, saved: dict[str, Any]) -> None:
    """Where ``config`` names the path its saved run names, spelled otherwise (``model=/models/x/`` against
    ``/models/x``, ``./data`` against ``data``), take the run's spelling: it is the same run, and refusing to resume
    it over a trailing slash helped no one. The spelling is kept, not normalised, so the run's hash stays its own."""
    for key in PATH_KEYS:
        holder: Any = config
        stored: Any = saved
        for part in key[:-1]:
            holder, stored = getattr(holder, part), (stored or {}).get(part)
        given, was = getattr(holder, key[-1]), (stored or {}).get(key[-1])
        if isinstance(given, str) and isinstance(was, str) and given != was and _same_path(given, was):
            setattr(holder, key[-1], was)


def _same_path(a: str, b: str) -> bool:
    return os.path.normpath(os.path.expanduser(a)) == os.path.normpath(os.path.expanduser(b))


def checkpoint_complete(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from, or None when it can: the Trainer writes a checkpoint file by file
    and ``trainer_state.json`` last, so a checkpoint without it, or with weights whose header cannot be read, was
    cut short."""
    state = folder / "trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no trainer_state.json"
    except (OSError, ValueError):
        return "trainer_state.json is not readable JSON"
    try:
        with safe_open(str(folder / CHECKPOINT_WEIGHTS), "pt") as weights:
            weights.keys()
    except FileNotFoundError:
        return f"no {CHECKPOINT_WEIGHTS}"
    except Exception:  # safetensors raises its own error types for a cut file
        return f"{CHECKPOINT_WEIGHTS} is damaged"
    return None


def _checkpoints(run_dir: Path) -> dict[int, Path]:
    """The run's ``checkpoint-N`` folders by step."""
    return {int(p.name.split("-")[1]): p for p in run_dir.glob("checkpoint-*") if p.name.split("-")[1].isdigit()}


def finished_run(config: TrainConfig) -> TrainResult | None:
    """The result of ``config``'s run if it already finished with this config (rerunning it is a no-op)."""
    run_dir = config.run_dir
    summary_file, output = run_dir / "summary.json", run_dir / ADAPTER_FILE
    if not (summary_file.is_file() and output.is_file()):
        return None
    summary = json.loads(summary_file.read_text())
    saved = run_dir / "config.yaml"
    known = yaml.safe_load(saved.read_text()) if saved.is_file() else None
    if summary.get("config_hash") != config.fingerprint(known):
        raise ConfigError(
            f"run {config.run_id!r} already finished with another config (hash {summary.get('config_hash')}); "
            "use a new run_id"
        )
    return TrainResult(
        run_dir, output, int(summary.get("steps", 0)), 0.0, 0, summary.get("eval_loss"), None, finished_before=True
    )


def _write_config(config: TrainConfig) -> None:
    saved = config.run_dir / "config.yaml"
    config.run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(saved) as tmp:
        tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


DATA_RECORD = "data.json"  # what a run trains and validates on, to refuse resuming it on other data


def data_digest(train: list[Sample], validation: list[Sample]) -> dict[str, Any]:
    """A digest of the samples a run reads (their token ids, cuts and labels), with their counts."""
    blob = json.dumps([[dataclasses.astuple(s) for s in split] for split in (train, validation)], sort_keys=True)
    return {
        "digest": hashlib.sha256(blob.encode()).hexdigest()[:16],
        "train_samples": len(train),
        "validation_samples": len(validation),
    }


def check_same_data(config: TrainConfig, record: dict[str, Any]) -> None:
    """Refuse to resume a run whose data changed since it started (an edited or replaced ``data.path`` file, a
    new generator version): its checkpoint was trained on the old samples and its step count indexes into them.
    Runs from before the record existed are resumed as they are."""
    path = config.run_dir / DATA_RECORD
    if not path.is_file():
        return
    try:
        before = json.loads(path.read_text())
    except ValueError:
        return
    if before.get("digest") == record["digest"]:
        return
    counts = ", ".join(
        f"{split} samples {before.get(f'{split}_samples', '?')} -> {record[f'{split}_samples']}"
        for split in ("train", "validation")
    )
    where = f" (data.path {config.data.path})" if config.data.path else ""
    raise ConfigError(
        f"run {config.run_id!r} was started on other data{where}: the samples it reads changed since ({counts}); "
        "resuming would go on with a checkpoint of the old data. Train under a new run_id, or restore the data"
    )


def _precision(name: str) -> str:
    if name == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return name


def _check_files(config: TrainConfig, model_name: str) -> None:
    """Refuse a ``load_path`` with no stage-1 LoRA, or an ``init_from`` file that is not there or no adapter (or a
    shipped adapter ccmem does not ship for ``model_name``)."""
    try:
        if config.load_path:
            read_stage1(config.load_path)
    except Stage1Error as err:
        raise ConfigError(f"load_path: {err}") from None
    if not config.init_from:
        return
    path = init_path(model_name, config.method.name, config.init_from)
    if not path.exists():
        raise ConfigError(f"init_from: {config.init_from} does not exist (an adapter file, or shipped[:NAME])")
    try:
        read_adapter(path)  # junk, a memory file, a run's folder: said before the model loads, not after
    except (AdapterMismatchError, FileNotFoundError) as err:
        raise ConfigError(f"init_from: {err}") from None


def _method_state(config: TrainConfig, lm: LoadedModel | None) -> tuple[Method, LoadedModel, nn.Module, str | None]:
    """The run's method, its model (loaded unless given; stage-1 LoRA merged in, frozen) and its freshly built
    trainable state, seeded; and the stage-1 hash."""
    method = get_method(config.method.name, **config.method.options)
    lm = lm or load_model(config.model, attn_implementation=config.attn)
    try:
        refuse_quantized(lm, "training")
    except QuantizeError as err:
        raise ConfigError(str(err)) from None
    torch.manual_seed(config.train.seed)
    try:
        stage1_hash = merge_stage1(lm, config.load_path) if config.load_path else None
    except Stage1Error as err:
        raise ConfigError(f"load_path: {err}") from None
    for p in lm.model.parameters():
        p.requires_grad_(False)
    state = method.module_for(lm)
    if state is None:
        raise ConfigError(f"method {method.name!r} has no trainable state")
    return method, lm, state, stage1_hash


def train(config: TrainConfig, *, lm: LoadedModel | None = None) -> TrainResult:
    """Run (or resume) the training described by ``config``; returns where the result is and what it cost.

    A run that already finished with the same config is not trained again: its result is returned as it is. A
    run that another process is training (the same run_id and output_dir) is refused.
    """
    blocked = file_in_the_way(config.run_dir)
    if blocked is not None:  # else a bare "[Errno 20] Not a directory" from the lock file
        raise ConfigError(
            f"{blocked} is a file, so the run folder {config.run_dir} cannot be made; choose another output_dir or "
            "run_id"
        )
    if config.wandb and not _has("wandb"):  # else the Trainer says so once the data and the model are loaded
        raise ConfigError(
            "wandb=true (--wandb) logs to Weights & Biases, whose package is not installed: pip install wandb, or "
            "leave it off (log.jsonl and TensorBoard need no account)"
        )
    with run_lock(config):
        return _train(config, lm)


@contextmanager
def run_lock(config: TrainConfig) -> Iterator[None]:
    """Hold ``<run>/.lock`` while training: two processes on one run would write the same checkpoints and log
    (interleaved steps, one's adapter over the other's). Under ``accelerate launch``, rank 0 holds it for all."""
    if fcntl is None or os.environ.get("RANK", "0") != "0":
        yield
        return
    config.run_dir.mkdir(parents=True, exist_ok=True)
    with (config.run_dir / ".lock").open("a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise ConfigError(
                f"run {config.run_id!r} is being trained by another process (pid {holder}, {config.run_dir}); "
                "wait for it to finish, or train under another run_id"
            ) from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            if [p.name for p in config.run_dir.iterdir()] == [".lock"]:  # failed before anything was written
                (config.run_dir / ".lock").unlink()
                config.run_dir.rmdir()
            fcntl.flock(handle, fcntl.LOCK_UN)


def _train(config: TrainConfig, lm: LoadedModel | None) -> TrainResult:
    resume = prepare_run_dir(config)
    done = finished_run(config)
    if done is not None:
        logger.info("run %s already finished (%d steps): %s", config.run_id, done.steps, done.output)
        return done
    run_dir = config.run_dir
    # The data and the files named are read before the model loads (minutes for a large one), so a wrong path or
    # a malformed record is said at once.
    examples = {split: load_examples(config.data, split) for split in ("train", "validation")}
    for split, found in examples.items():
        check_found(config, split, found)
    _check_files(config, lm.name if lm is not None else config.model)
    method, lm, state, stage1_hash = _method_state(config, lm)
    if config.init_from:
        init_state(method, lm, config.init_from)
    check_attention(lm, method)  # flash_attention_2 with a masking method: refused before the data is built
    state.requires_grad_(True)
    if config.train.gradient_checkpointing:
        lm.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    lm.model.config.use_cache = False

    train_set = SampleDataset(samples_for(lm, config, method, "train", examples["train"]))
    eval_set = SampleDataset(samples_for(lm, config, method, "validation", examples["validation"]))
    warn_shared_samples(train_set.samples, eval_set.samples)
    data_record = data_digest(train_set.samples, eval_set.samples)
    if resume:
        check_same_data(config, data_record)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    module = TrainingModule(lm, method, state)
    t = config.train
    report_to = ["wandb"] if config.wandb else []  # TensorBoard is added below, with its folder in the run
    precision = _precision(t.precision)
    args = TrainingArguments(
        output_dir=str(run_dir),
        run_name=config.run_id,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=round(t.warmup_ratio * t.max_steps),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        eval_strategy="steps",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN, not replaced by the mean of the steps before
        # a resumed run keeps early stopping's count of evaluations without improvement (transformers starts it
        # again at 0 by default), so it stops where the uninterrupted run would
        restore_callback_states_from_checkpoint=True,
        report_to=report_to,
        seed=t.seed,
        data_seed=t.seed,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random" if t.shuffle else "sequential",
        save_only_model=not t.save_optimizer,
        prediction_loss_only=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
        use_cpu=not _has_accelerator(),  # also lets `accelerate launch` run several CPU processes (gloo)
        bf16=precision == "bf16",
        fp16=precision == "fp16",
    )
    log = JsonlLogger(run_dir / "log.jsonl", module)
    callbacks: list[TrainerCallback] = [log]
    if _has("tensorboard"):
        from transformers.integrations import TensorBoardCallback

        board = TensorBoardCallback()
        board.logging_dir = str(run_dir / "tensorboard")  # else runs/<run_id>/runs/<date>: one folder per session
        callbacks.append(board)
    if t.patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.patience))
    trainer = CompressionTrainer(
        method=method,
        model=module,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=lambda items: {"batch": method.make_batch([item["sample"] for item in items], pad)},
        callbacks=callbacks,
    )
    if resume:
        logger.info("resuming %s from %s", config.run_id, resume)
    # the steps past the checkpoint (all of them, without one) are taken again: their old rows go
    log.tokens_before = _trim_log(run_dir / "log.jsonl", after=int(Path(resume).name.split("-")[1]) if resume else 0)
    _write_config(config)
    with atomic_path(run_dir / DATA_RECORD) as tmp:
        tmp.write_text(json.dumps(data_record, indent=1))
    started = time.perf_counter()
    stopped = _stopped(resume, t.max_steps)
    if stopped is not None:  # trainer.train would take a step past the stop (one past max_steps, or eval_steps more)
        logger.info("run %s had stopped at step %d; writing its adapter", config.run_id, stopped.global_step)
        _restore(module, Path(stopped.best_model_checkpoint or str(resume)))
    else:
        with method.attached(lm):
            trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    ended = stopped or trainer.state
    diverged = [n for n, p in state.named_parameters() if not bool(torch.isfinite(p).all())]
    if diverged:  # no finite checkpoint to restore: every evaluation was NaN
        raise RuntimeError(
            f"training diverged: {len(diverged)} trained tensors hold NaN or inf (first: {diverged[0]}; see the loss "
            f"and grad_norm in {run_dir / 'log.jsonl'}), so no adapter was written. Lower train.lr (now "
            f"{t.lr:g}) or keep train.max_grad_norm on, and train under a new run_id"
        )
    eval_loss = ended.best_metric
    summary = {
        "run_id": config.run_id,
        "config_hash": config.fingerprint(),
        "steps": ended.global_step,
        "best_checkpoint": ended.best_model_checkpoint,
        "eval_loss": eval_loss,
        "train_seconds_this_session": round(seconds, 1),
        "tokens_this_session": module.tokens_seen,
        "tokens_per_second": round(module.tokens_seen / seconds, 1) if seconds else None,
        "padding_fraction": module.padding_fraction,
        "train_examples": len(train_set),
        "processes": trainer.args.world_size,
        "data": config.data.dataset,
        "data_version": data_version(config.data),
        "stage1": stage1_hash,
        "resumed_from": resume,
    }
    output = run_dir / ADAPTER_FILE
    if trainer.args.should_save:  # rank 0 only under `accelerate launch`
        try:
            save_adapter(method, lm, output, extra=summary | {"config": config.to_dict()})
        except (OSError, SafetensorError) as err:
            free = shutil.disk_usage(run_dir).free / 2**20
            raise OSError(
                f"writing {output} failed ({err}); {free:.1f} MiB are free there. Free some space and rerun the same "
                "command: the run is complete, so it only writes the adapter"
            ) from err
        with atomic_path(run_dir / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
    return TrainResult(run_dir, output, ended.global_step, seconds, module.tokens_seen, eval_loss, resume)


def _stopped(resume: str | None, max_steps: int) -> TrainerState | None:
    """The state of checkpoint ``resume`` if training had stopped there (``max_steps`` reached, or early stopping)
    and only the adapter was left to write (a kill or a full disk in between), else None."""
    if resume is None:
        return None
    state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
    control = state.stateful_callbacks.get("TrainerControl", {}).get("args", {})
    if state.global_step < max_steps and not control.get("should_training_stop"):
        return None
    if state.best_model_checkpoint is not None and not Path(state.best_model_checkpoint).is_dir():
        state.best_model_checkpoint = None  # moved or deleted since: the stop's own checkpoint, as the Trainer does
    return state


def _restore(module: TrainingModule, folder: Path) -> None:
    """Load checkpoint ``folder``'s trainable tensors into ``module``, as the Trainer restores the best one."""
    check_loaded(module, module.load_state_dict(load_file(str(folder / CHECKPOINT_WEIGHTS)), strict=False), str(folder))


def check_loaded(module: nn.Module, result: Any, what: str) -> None:
    """Refuse a checkpoint load (``result`` of ``load_state_dict(strict=False)``) that missed a trainable tensor of
    ``module`` or brought one it lacks; frozen base weights are "missing" by design: checkpoints hold only trainable
    tensors."""
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    lost = trainable & set(result.missing_keys)
    if lost or result.unexpected_keys:
        raise RuntimeError(
            f"{what} does not match this run (missing {sorted(lost)[:3]}, unexpected {result.unexpected_keys[:3]}); "
            "start a new run_id"
        )


def export_checkpoint(config: TrainConfig, step: int | None = None, *, lm: LoadedModel | None = None) -> Path:
    """Write the adapter of one checkpoint of ``config``'s run (default: its latest) and return its path.

    A run stopped before ``train.max_steps`` (a session that ran out of time, a loss that stopped improving)
    is then usable as it is: ``runs/<run_id>/checkpoint-N/adapter.safetensors`` loads like a finished run's
    adapter and records which step of which schedule it is. Resuming the run later is not affected.
    """
    # the run's own config, or refused naming what differs; nothing moved: the run may be training meanwhile (it
    # died when the checkpoint it was writing was moved aside as incomplete)
    prepare_run_dir(config, move_incomplete=False)
    run_dir = config.run_dir
    steps = {step: p for step, p in _checkpoints(run_dir).items() if checkpoint_complete(p) is None}
    if not steps:
        raise ConfigError(f"run {config.run_id!r} has no checkpoint in {run_dir} to export")
    step = max(steps) if step is None else step
    if step not in steps:
        raise ConfigError(
            f"run {config.run_id!r} has no checkpoint-{step}; it has: {', '.join(map(str, sorted(steps)))}"
        )
    folder = steps[step]
    method, lm, state, stage1_hash = _method_state(config, lm)
    prefix = "method_state."  # TrainingModule's attribute: the Trainer saved the state under it
    saved = {
        k[len(prefix) :]: v for k, v in load_file(str(folder / CHECKPOINT_WEIGHTS)).items() if k.startswith(prefix)
    }
    result = state.load_state_dict(saved, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"{folder} does not hold this run's {method.name} state (missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]})"
        )
    eval_loss = None
    trainer_state = folder / "trainer_state.json"
    if trainer_state.is_file():
        history = json.loads(trainer_state.read_text()).get("log_history", [])
        eval_loss = next(
            (r["eval_loss"] for r in reversed(history) if "eval_loss" in r and r.get("step") == step), None
        )
    output = folder / ADAPTER_FILE
    extra = {
        "run_id": config.run_id,
        "config_hash": config.fingerprint(),
        "steps": step,
        "exported_checkpoint": f"checkpoint-{step} of a {config.train.max_steps}-step schedule",
        "eval_loss": eval_loss,
        "data": config.data.dataset,
        "data_version": data_version(config.data),
        "stage1": stage1_hash,
        "config": config.to_dict(),
    }
    save_adapter(method, lm, output, extra=extra)
    return output


def init_state(method: Method, lm: LoadedModel, source: str) -> None:
    """Start ``method``'s trainable state from an adapter file (``init_from``: a path, or ccmem's own, see
    :func:`init_path`).

    The adapter may come from another method with the same state (a ``ccm-concat`` adapter can start a
    ``ccm-merge`` run). Options that shape the state (``n_tok``, LoRA rank and targets ...) must agree, unless
    the method can carry the state over (:meth:`Method.warm_start`: CCM and gist across ``n_tok``). An adapter
    trained on another stage-1 LoRA (or none) may start a run on this one: the result records this run's.
    """
    path = init_path(lm.name, method.name, source)
    try:
        adapter = read_adapter(path)
        check_state_kind(method, lm, adapter)
        ours = method.options()
        theirs = trained_options(adapter, method)
        differing = {
            key: (value, ours[key])
            for key, value in theirs.items()
            if key in ours and key not in method.runtime_options and _canonical(ours[key]) != _canonical(value)
        }
        if differing:
            fresh = cast(nn.Module, method.module_for(lm)).state_dict()
            try:
                tensors = method.warm_start(differing, adapter.tensors, fresh)
            except ValueError as err:  # the method names what it cannot carry over
                raise AdapterMismatchError(f"{path}: {err}") from None
            if tensors is None:
                key, (value, mine) = next(iter(differing.items()))
                raise AdapterMismatchError(
                    f"{path} was trained with {key}={value!r}, this run has {key}={mine!r}; set method.{key} "
                    f"to {value!r} or start from scratch"
                )
            logger.info("carrying %s over to %s", path, ", ".join(f"{k}={v[1]!r}" for k, v in differing.items()))
            adapter = dataclasses.replace(adapter, tensors=tensors)
        if adapter.stage1 != (lm.stage1 or ""):  # a starting point only: stage 2 on another stage 1 is a new run
            logger.info("starting from %s (stage-1 %r) on top of stage-1 %r", path, adapter.stage1, lm.stage1)
            adapter = dataclasses.replace(adapter, stage1=lm.stage1 or "")
        load_adapter(method, lm, adapter)
    except (AdapterMismatchError, FileNotFoundError) as err:
        raise ConfigError(f"init_from: {err}") from None
    logger.info("initialised %s from %s (%s)", method.name, path, adapter.hash)


def init_path(model_name: str, method_name: str, source: str) -> Path:
    """The file ``init_from`` names: a path; ``shipped``, the adapter ccmem ships for this model and method; or
    ``shipped:NAME``, its shipped adapter ``NAME`` (``shipped:ccm-concat`` starts a ccm-merge run from the concat
    adapter)."""
    kind, _, name = source.partition(":")
    if kind != "shipped":
        return Path(source)
    name = name or method_name
    path = shipped_adapter(model_name, name)
    if path is None:
        shipped = ", ".join(f"shipped:{n}" for n in shipped_adapter_names(model_name)) or "nothing"
        raise ConfigError(
            f"init_from={source}: ccmem ships no {name} adapter for {model_name} (it ships: {shipped}); give a file"
        )
    return path


def _canonical(value: Any) -> Any:
    """Option values compared as sets where order carries no meaning (``lora_targets``)."""
    return sorted(map(str, value)) if isinstance(value, list | tuple) else value


def _has_accelerator() -> bool:
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
