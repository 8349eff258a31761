"""Typed training configuration: dataclasses, named YAML presets, and ``key=value`` overrides.

A run is described by one :class:`TrainConfig`. Presets live in ``ccmem/configs/<name>.yaml`` (also
reachable as ``configs/`` at the repository root); any field can be overridden from the command line
with a dotted key, Hydra-style: ``ccmem train persona-ccm-concat train.max_steps=50 method.n_tok=2``.
Unknown keys are refused with the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ccmem.chat import DEFAULT_SYSTEM_PROMPT
from ccmem.loading import ATTN_IMPLEMENTATIONS, DEFAULT_MODEL
from ccmem.options import OptionError, coerce, parse_value, say_repeated
from ccmem.registry import DEFAULT_METHOD, METHODS, check_options, get_method, method_class, method_classes

logger = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(OptionError):
    """A configuration that cannot be used; the message says which key and how to fix it."""


class MethodConfig:
    """Which method to train (``name``) and its options, as the method declares them (``ccmem methods``).

    Options are read as attributes (``config.method.n_tok``); options left out take the method's defaults.
    There is no second list of method options here: ``method.<option>`` accepts exactly what the method has.
    """

    def __init__(self, name: str = DEFAULT_METHOD, **options: Any):
        try:
            method_class(name)
            checked = check_options(name, options, prefix="method.")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.name = name
        self.options: dict[str, Any] = checked

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_") or key in ("name", "options"):
            raise AttributeError(key)
        try:
            return self.resolved()[key]
        except KeyError:
            raise AttributeError(f"method {self.name!r} has no option {key!r}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MethodConfig) and self.to_dict() == other.to_dict()

    def resolved(self) -> dict[str, Any]:
        """Every option of the method, defaults filled in."""
        try:
            return get_method(self.name, **self.options).options()
        except ValueError as err:
            raise ConfigError(f"method: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **{k: list(v) if isinstance(v, tuple) else v for k, v in self.resolved().items()}}


@dataclass
class DataConfig:
    """What to train on. ``dataset`` names a loader (see ``ccmem data --help``)."""

    dataset: str = "persona"  # the loader: a generator (persona, dialogs, icl, ...) or a file format (metaicl, ...)
    path: str | None = None  # file or folder in the dataset's own format; generators need none
    eval_path: str | None = None  # held-out file for early stopping; default: a validation split
    n_train: int = 2400  # examples to generate (generators) or keep (files; 0 = all)
    n_eval: int = 64  # validation examples to generate (generators) or keep (files)
    k: int = 16  # demonstrations (MetaICL) / profile items (LaMP) / most facts (persona) per example
    small_talk: int = 2  # persona: most fact-free turns mixed into a dialog
    turns: int = 0  # dialogs: most turns per dialog (the test split: exactly this many); 0 = the generator's 1-20
    # dialogs: fewest turns per training and validation dialog (0: 1), for training on long dialogs only, where
    # facts lie many turns before the question; the test split ignores it (it has exactly data.turns turns)
    min_turns: int = 0
    templates: str | None = None  # dialogs: a template file (see ccmem.data.templates); default: the packaged one
    # passages, pwc (also inside a mixture): the text asked about: wiki (packaged Wikipedia summaries), news
    # (packaged news articles) or both; each has its own generator version (ccmem.data.news)
    source: str = "wiki"
    # mixture: family -> weight, e.g. {dialogs: 0.6, icl: 0.15, passages: 0.15, text: 0.1}; n_train and n_eval
    # are shared out by weight, each family with its own defaults (ccmem.data.loaders.MIXTURE_DEFAULTS)
    mixture: dict[str, float] | None = None
    # a family's own settings inside a mixture, over those defaults: e.g. {dialogs: {turns: 30}} for longer dialogs
    families: dict[str, dict[str, int]] | None = None
    # gsm8k (the fork's data.train_ratio): train on this share of the training problems and hold out the rest for
    # validation, drawn with data.seed; None: GSM8K's last 500 training problems (files) or the generator's own split
    train_ratio: float | None = None
    seed: int = 0  # seed of the generators and of the train_ratio draw
    max_length: int = 1024  # longest sample in tokens; longer ones are skipped (and counted)
    system: str | None = DEFAULT_SYSTEM_PROMPT  # kept uncompressed as the attention sink, as at inference


@dataclass
class OptimConfig:
    """The optimisation recipe (the reference's defaults)."""

    lr: float = 3e-4  # peak learning rate of AdamW
    # learning-rate schedule after warm-up: linear, cosine, cosine_with_restarts, polynomial, constant or
    # constant_with_warmup
    scheduler: str = "cosine"
    warmup_ratio: float = 0.05  # share of max_steps spent warming the learning rate up from 0
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    batch_size: int = 8  # samples per step on each device (padded together)
    grad_accum: int = 1  # steps whose gradients are summed before an update (an effective batch of batch_size x this)
    max_steps: int = 300  # optimizer updates in the run
    max_grad_norm: float = 1.0  # gradient clipping: the global norm is scaled down to this (0: no clipping)
    gradient_checkpointing: bool = True  # trades ~30% more compute for much less activation memory
    # Batch samples of similar length (HF's LengthGroupedSampler): less padding, ~1.55x the tokens/s on persona
    # dialogs of 0-5 small-talk turns (benchmarks/length_grouping.py), but a slightly weaker concat adapter
    # there (README "Training"); off by default, and the presets reproduce the shipped adapters without it.
    group_by_length: bool = False
    shuffle: bool = True  # draw batches in a fresh random order every epoch (False: the data's own order)
    # checkpoints hold AdamW's state, the schedule and RNG (False: the trainable tensors only, a fraction of the
    # size; a run resumed from one starts a fresh optimizer and learning-rate schedule)
    save_optimizer: bool = True
    precision: str = "auto"  # auto (bf16 where the GPU has it, else fp32), bf16, fp16 or fp32
    eval_steps: int = 50  # validation loss every this many steps (what early stopping and the best checkpoint use)
    save_steps: int = 50  # a checkpoint every this many steps (a multiple of eval_steps), and at each best evaluation
    save_total_limit: int = 2  # checkpoints kept on disk (the best one is always kept)
    patience: int = 0  # early stopping after this many evaluations without improvement (0: off)
    logging_steps: int = 10  # a row of log.jsonl (loss, learning rate) every this many steps
    seed: int = 42  # seed of the initialisation, the batch order and dropout


#: Fields added before runs recorded which fields they knew, with the default that keeps the behaviour those runs
#: had: a config at that default hashes as before the field existed. A run's config.yaml names every field it knew,
#: so a field or method option added later is filled in at its default when the run resumes
#: (:func:`with_later_fields`) and left out of its hash while at that default (:meth:`TrainConfig.fingerprint` with
#: ``known``). A config with no saved run (a preset, whose hash shipped adapters record) has no ``known``: a new
#: config field still goes here; a new method option only needs a default that keeps what runs did.
LATER_FIELDS: dict[str, Any] = {
    "train.group_by_length": False,
    "method.max_chunk_tokens": 512,
    "method.marker": "ft",
    "data.turns": 0,
    "data.min_turns": 0,
    "data.templates": None,
    "data.source": "wiki",
    "data.mixture": None,
    "data.families": None,
    "init_from": None,
    "attn": "sdpa",
    "train.shuffle": True,
    "train.save_optimizer": True,
    "data.train_ratio": None,
    "method.banks": 1,
    "method.recent": 0,
    "method.keep": "nothing",
}


def with_later_fields(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config dict with every field and method option it predates filled in at its default."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    name = out.get("method", {}).get("name", DEFAULT_METHOD) if isinstance(out.get("method"), dict) else None
    if name not in METHODS:
        return out  # an unknown method: the comparison with the new config names it
    for key, default in _defaults(name).items():
        if isinstance(default, dict) and isinstance(out.get(key, {}), dict):
            out[key] = {**default, **out.get(key, {})}
        else:
            out.setdefault(key, default)
    return out


def _defaults(method: str) -> dict[str, Any]:
    """The config dict of a run of ``method`` with every other field at its default."""
    return TrainConfig(method=MethodConfig(method)).to_dict()


def _drop_unknown_defaults(d: dict[str, Any], known: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Delete from config dict ``d`` every field (sections recursed into) that ``known`` lacks and that is at its
    value in ``defaults``: what a run made before the field existed hashed without."""
    for key in list(d):
        if isinstance(d[key], dict) and isinstance(known.get(key), dict):
            _drop_unknown_defaults(d[key], known[key], defaults.get(key) or {})  # a dict field may default to None
        elif key not in known and key in defaults and d[key] == defaults[key]:
            del d[key]


@dataclass
class TrainConfig:
    """One training run. ``runs/<run_id>/`` holds its config, checkpoints, logs and the trained adapter."""

    run_id: str = ""  # the run's folder name under output_dir; rerunning the same run_id resumes it
    output_dir: str = "runs"  # where run folders are made
    model: str = DEFAULT_MODEL  # a built-in name, hub shortcut, local folder, .gguf file or hub id (as --model)
    attn: str = "sdpa"  # the model's attention kernel: sdpa, eager or flash_attention_2 (see ccmem.loading)
    load_path: str | None = None  # stage-1 LoRA (a finished ``method.name=full`` run) merged before training
    # start the trainable state from an adapter file instead of from scratch ("shipped": the adapter ccmem
    # ships for this model and method; "shipped:NAME": its shipped adapter NAME, e.g. shipped:ccm-concat);
    # the run then continues training it on this run's data
    init_from: str | None = None
    wandb: bool = False  # also log to Weights & Biases (needs its package and an account; TensorBoard needs none)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: OptimConfig = field(default_factory=OptimConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_id

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["method"] = self.method.to_dict()
        d["data"], d["train"] = dataclasses.asdict(self.data), dataclasses.asdict(self.train)
        return d

    def fingerprint(self, known: dict[str, Any] | None = None) -> str:
        """Hash of everything that changes what is trained (not where it is written). ``known``: the config dict a
        run saved; fields and method options it lacks (added since) are left out while at their default, so the
        run keeps the hash it recorded."""
        d = self.to_dict()
        if known is not None:
            _drop_unknown_defaults(d, known, _defaults(self.method.name))
        for key in ("run_id", "output_dir", "wandb"):
            d.pop(key)
        for key, default in LATER_FIELDS.items():
            section, _, name = key.rpartition(".")
            node = d[section] if section else d
            if name in node and node[name] == default:
                del node[name]  # as before the field existed: older runs and presets keep their hash
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _keys(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of a config dataclass -> its type (``method.*`` keys are the method's own options)."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if kind is MethodConfig:
            out[f"{prefix}{f.name}.name"] = str
        elif dataclasses.is_dataclass(kind):
            out.update(_keys(kind, f"{prefix}{f.name}."))  # type: ignore[arg-type]
        else:
            out[f"{prefix}{f.name}"] = kind
    return out


VALID_KEYS = _keys(TrainConfig)


def field_docs(cls: type) -> dict[str, str]:
    """Each field of config dataclass ``cls`` -> the comment that documents it in this file (on its line, else the
    comment lines right above it): ``ccmem train --show-keys`` prints them, so the source stays the one place."""
    import inspect
    import io
    import textwrap
    import tokenize

    source = textwrap.dedent(inspect.getsource(cls))
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    lines = source.splitlines()
    docs = {}
    for f in dataclasses.fields(cls):
        at = next((n for n, line in enumerate(lines, 1) if re.match(rf"\s*{f.name}\s*:", line)), None)
        if at is None:
            continue
        if at in comments:
            docs[f.name] = comments[at]
            continue
        above: list[str] = []
        while at - 1 - len(above) in comments and lines[at - 2 - len(above)].lstrip().startswith("#"):
            above.insert(0, comments[at - 1 - len(above)])
        if above:
            docs[f.name] = " ".join(above)
    return docs


def key_docs() -> dict[str, str]:
    """Every dotted config key (as :data:`VALID_KEYS`) -> what it means."""
    sections = {"": TrainConfig, "data.": DataConfig, "train.": OptimConfig}
    docs = {f"{prefix}{name}": doc for prefix, cls in sections.items() for name, doc in field_docs(cls).items()}
    docs["method.name"] = "the method trained (a trainable method of `ccmem methods`; full: a stage-1 LoRA)"
    return docs


def method_keys() -> dict[str, tuple[Any, list[str], str]]:
    """``method.<option>`` -> (type, the trainable methods that declare it, what it means, as the first of them
    says): what ``method.*`` accepts."""
    out: dict[str, tuple[Any, list[str], str]] = {}
    for name, cls in method_classes().items():
        if cls.trainable:
            for spec in cls.option_specs():
                out.setdefault(f"method.{spec.name}", (spec.type, [], spec.help))[1].append(name)
    return out


#: Hugging Face / reference names users type by habit -> ours.
ALIASES = {
    "learning_rate": "train.lr",
    "lr_scheduler_type": "train.scheduler",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "warmup": "train.warmup_ratio",
    "comp_token": "method.n_tok",
    "n_comp": "method.n_tok",
    "comp_type": "method.name",
    "model_name": "model",
    "attn_implementation": "attn",
    "early_stopping_patience": "train.patience",
}


#: The IC-Former reference scripts' options (its pretrain/finetune/generate.sh) -> where they live here, and how.
REFERENCE_KEYS: dict[str, tuple[str, str]] = {
    "data_path": ("data.path", ""),
    "lm_path": ("model", ""),
    "icformer_path": ("init_from", "an adapter file to start from"),
    "save_path": ("output_dir", "the run lands in output_dir/run_id"),
    "num_hidden_layers": ("method.num_hidden_layers", ""),
    "num_query_tokens": ("method.num_query_tokens", ""),
    "max_seq_len": ("method.max_seq_len", ""),
    "use_chunk": ("method.use_chunk", ""),
    "max_chunk_len": ("method.max_chunk_len", ""),
    "avg_level": ("method.avg_level", "the loss reduction of a padded batch"),
    "seed": ("train.seed", ""),
    "lr": ("train.lr", ""),
    "gradient_accumulation": ("train.batch_size", "a padded batch equals the reference's accumulated samples"),
    # a step is one optimizer update: batch_size x grad_accum contexts (per process)
    "max_epoch": ("train.max_steps", "epochs x data.n_train / (train.batch_size x train.grad_accum)"),
    "save_interval": ("train.save_steps", "in optimizer steps: contexts / (train.batch_size x train.grad_accum)"),
    "clip_grad": ("train.max_grad_norm", "0 turns clipping off"),
    "max_norm": ("train.max_grad_norm", ""),
    "shuffle": ("train.shuffle", ""),
    "save_optimizer": ("train.save_optimizer", ""),
    "max_new_tokens": ("", "an option of ccmem generate / ccmem eval"),
    "output_file": ("", "ccmem generate --output"),
}


def _unknown(key: str) -> ConfigError:
    if key in REFERENCE_KEYS:
        target, note = REFERENCE_KEYS[key]
        where = f"use {target!r}" if target else "no key"
        return ConfigError(f"{key!r} is the IC-Former scripts' name: {where}{f' ({note})' if note else ''}")
    alias = ALIASES.get(key.rpartition(".")[2])
    close = [alias] if alias else difflib.get_close_matches(key, list(VALID_KEYS), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (see `ccmem train --show-keys`)")


def _coerce(key: str, value: Any) -> Any:
    """Check ``value`` against the declared type of ``key``."""
    try:
        return coerce(key, VALID_KEYS[key], value)
    except OptionError as err:
        raise ConfigError(str(err)) from None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if v is None and any(key.startswith(f"{prefix}{k}.") for key in VALID_KEYS):
            continue  # a section whose every line is commented out (`data:` alone): YAML reads it as null
        if isinstance(v, dict) and f"{prefix}{k}" not in VALID_KEYS and not prefix.startswith("method"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _apply(config: TrainConfig, flat: dict[str, Any]) -> TrainConfig:
    d = config.to_dict()
    name, options = config.method.name, dict(config.method.options)
    for key, value in flat.items():
        if key == "method.name":
            name = _coerce(key, value)
        elif key.startswith("method."):
            options[key.removeprefix("method.")] = value  # checked against the method below
        elif key not in VALID_KEYS:
            raise _unknown(key)
        else:
            *path, leaf = key.split(".")
            node = d
            for part in path:
                node = node[part]
            node[leaf] = _coerce(key, value)
    return TrainConfig(
        **{k: v for k, v in d.items() if k not in ("method", "data", "train")},
        method=MethodConfig(name, **options),
        data=DataConfig(**d["data"]),
        train=OptimConfig(**d["train"]),
    )


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_summary(name: str, width: int = 110) -> str:
    """The first sentence of a preset's header comment (what it trains, on what), cut at a word to ``width``."""
    header = []
    for line in (PRESET_DIR / f"{name}.yaml").read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    text = " ".join(header)
    sentence = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
    return sentence if len(sentence) <= width else sentence[: sentence.rfind(" ", 0, width)] + " …"


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently: a preset
    copied and edited with ``lr`` set twice trained at whichever came last, with no word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in seen:
                raise ConfigError(f"{key!r} is given twice in one section (lines {seen[key]} and {line}): keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader) or {}  # a SafeLoader
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read the config file {path}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-4"`` -> ``("train.lr", 0.0001)``; values are read as YAML scalars."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.max_steps=100")
    return key.strip(), parse_value(raw, VALID_KEYS.get(key.strip()))


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """A preset name or YAML file, then the ``key=value`` overrides; ``run_id`` defaults to the preset name."""
    config = TrainConfig()
    if preset:
        path = Path(preset)
        if not path.suffix:
            path = PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            close = difflib.get_close_matches(preset, preset_names(), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; presets: {', '.join(preset_names())}"
            raise ConfigError(f"no preset or config file {preset!r}{hint}")
        try:
            config = _apply(config, _flatten(read_yaml(path)))
        except ConfigError as err:  # a value of the file's, not of the command line: say where it is
            message = str(err)
            raise ConfigError(message if message.startswith(str(path)) else f"in {path}: {message}") from None
        if not config.run_id:
            config.run_id = path.stem
    given = dict(parse_override(o) for o in overrides)
    say_repeated(overrides, "override")
    config = _apply(config, given)
    _expand_home(config)
    if not config.run_id:
        config.run_id = f"{config.data.dataset}-{config.method.name}"
    check(config)
    for key in unread_settings(config.data):
        if f"data.{key}" in given:  # a preset's value is not the user's choice: only what they typed is named
            logger.warning("data.%s=%s is not read: %s", key, given[f"data.{key}"], _why_unread(config.data, key))
    return config


def _expand_home(config: TrainConfig) -> None:
    """``~/data`` in a path key means the home folder, as in a shell: ``data.path=~/x`` is one word to bash, which
    expands ``~`` only at a word's start, so the path reached ccmem as written."""

    keys = [(config.data, "path"), (config.data, "eval_path")] + [
        (config, name) for name in ("load_path", "init_from", "output_dir")
    ]
    for holder, name in keys:
        value = getattr(holder, name)
        if isinstance(value, str) and value.startswith("~"):
            setattr(holder, name, os.path.expanduser(value))


#: The dataset settings that shape examples, and the datasets that read each (generated, or from files).
SHAPE_READERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # setting: (datasets that read it when generating, datasets that read it from data.path)
    "k": (
        ("persona", "dialogs", "passages", "icl"),
        ("metaicl", "lamp2", "dailydialog", "soda", "unified", "pretrain", "icl"),
    ),
    "turns": (("dialogs",), ()),
    "small_talk": (("persona",), ()),
}


def unread_settings(d: DataConfig) -> list[str]:
    """The settings of :data:`SHAPE_READERS` that the loader of ``d`` does not read (given ``data.path`` or not)."""
    return [key for key, (made, read) in SHAPE_READERS.items() if d.dataset not in (read if d.path else made)]


def _why_unread(d: DataConfig, key: str) -> str:
    if d.dataset == "mixture":
        return f"each family of a mixture has its own; set data.families={{FAMILY: {{{key}: N}}}}"
    made, read = SHAPE_READERS[key]
    if d.path and d.dataset in made:
        return f"it shapes generated {d.dataset} examples, and data.path is read as written"
    readers = sorted(set(made) | set(read))
    return f"dataset {d.dataset!r} has no such setting (it is read by {', '.join(readers)})"


def check(config: TrainConfig) -> None:
    """Refuse settings that cannot work, before anything is loaded or written (``--show-config`` runs it too)."""
    from ccmem.data.loaders import LOADERS

    cls = method_class(config.method.name)
    if not cls.trainable:
        trainable = [n for n, c in method_classes().items() if c.trainable]
        raise ConfigError(
            f"method.name={config.method.name!r} cannot be trained; trainable methods: {', '.join(trainable)}"
        )
    config.method.resolved()  # the method's own checks (n_tok >= 1, ...)
    if config.data.dataset not in LOADERS:
        close = difflib.get_close_matches(config.data.dataset, list(LOADERS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown data.dataset {config.data.dataset!r}; {hint}datasets: {', '.join(LOADERS)}")
    d = config.data
    if d.dataset == "mixture" or d.mixture:
        from ccmem.data.loaders import MixtureError, check_mixture

        if d.dataset != "mixture":
            raise ConfigError(f"data.mixture is set but data.dataset is {d.dataset!r}; set data.dataset=mixture")
        try:
            check_mixture(d.mixture, d.families)
        except MixtureError as err:
            raise ConfigError(str(err)) from None
    elif d.families:
        raise ConfigError("data.families sets families of a mixture; set data.dataset=mixture and data.mixture too")
    from ccmem.data.loaders import check_source, check_templates, check_train_ratio

    try:
        check_source(d)
        check_templates(d)
        check_train_ratio(d)
    except (OSError, ValueError) as err:
        raise ConfigError(str(err)) from None
    for key in ("n_eval", "k", "max_length"):
        if getattr(d, key) < 1:
            raise ConfigError(f"data.{key} must be at least 1, got {getattr(d, key)}")
    for key in ("n_train", "small_talk", "min_turns", "turns"):
        if getattr(d, key) < 0:
            raise ConfigError(f"data.{key} must not be negative, got {getattr(d, key)}")
    if d.min_turns and d.dataset == "mixture":
        raise ConfigError(
            "data.min_turns sets the length of generated dialogs; inside a mixture each family has its own: "
            "set data.families={dialogs: {min_turns: N}} instead"
        )
    if d.min_turns and (d.dataset != "dialogs" or d.path):
        where = "data.path is read as written" if d.dataset == "dialogs" else f"dataset {d.dataset!r} has none"
        raise ConfigError(f"data.min_turns sets the length of generated dialogs; {where}: leave it at 0")
    from ccmem.data.dialogs import DEFAULT_TURNS

    if d.dataset == "dialogs" and d.min_turns > (d.turns or DEFAULT_TURNS):
        raise ConfigError(
            f"data.min_turns ({d.min_turns}) must not exceed data.turns ({d.turns or f'0, that is {DEFAULT_TURNS}'}): "
            "raise data.turns or lower data.min_turns"
        )
    t = config.train
    for key in ("batch_size", "grad_accum", "max_steps", "eval_steps", "save_steps", "logging_steps"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be at least 1, got {getattr(t, key)}")
    for key in ("lr", "weight_decay", "max_grad_norm"):  # nan passes every comparison below; inf lr trains NaN
        if not math.isfinite(getattr(t, key)):
            raise ConfigError(f"train.{key} must be a finite number, got {getattr(t, key)}")
    if not t.lr > 0:
        raise ConfigError(f"train.lr must be positive, got {t.lr}")
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if t.weight_decay < 0 or t.max_grad_norm < 0 or t.patience < 0 or t.save_total_limit < 1:
        raise ConfigError("train.weight_decay, max_grad_norm and patience must not be negative, save_total_limit >= 1")
    if t.save_steps % t.eval_steps:
        raise ConfigError(
            f"train.save_steps ({t.save_steps}) must be a multiple of train.eval_steps ({t.eval_steps}), "
            "so that the best checkpoint can be restored"
        )
    if t.group_by_length and not t.shuffle:
        raise ConfigError(
            "train.group_by_length draws batches of similar length in a random order; it cannot keep the data's "
            "order (train.shuffle=false): turn one of them off"
        )
    if t.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"train.precision must be auto, bf16, fp16 or fp32, got {t.precision!r}")
    schedulers = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
    if t.scheduler not in schedulers:
        raise ConfigError(f"train.scheduler must be one of {', '.join(schedulers)}, got {t.scheduler!r}")
    if config.attn not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"attn must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {config.attn!r}")
    if not config.run_id.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(
            f"run_id {config.run_id!r} must hold at least one letter or digit, and nothing but letters, digits, "
            "'-', '_' and '.' (it names the run's folder in output_dir, so '..' or 'a/b' could point outside it)"
        )


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting that differs between two config dicts."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
