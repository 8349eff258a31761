"""Adapter files: a method's trainable state (one ``nn.Module``) as safetensors, with its full config beside it.

The file is the same for every method (as peft writes ``LoraConfig`` beside the weights): the tensors are the
module's ``state_dict``; the metadata names the format, the method, every option it was trained with, the
model (fingerprint and name), the stage-1 LoRA it was trained on top of, and free ``extra`` provenance (the
training summary and config). Loading one fills in the options the user did not give and refuses a
conflicting one, so ``ccmem.load(model, "ccm-concat", adapter=path)`` needs no ``n_tok``.

Adapters written before this format (version 1, CCM only) are read through the method's ``legacy_adapter``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ccmem.fileio import atomic_path
from ccmem.loading import LoadedModel
from ccmem.memory import weights_differ
from ccmem.options import OptionError
from ccmem.registry import UnknownMethodError, check_options, method_class, method_classes

if TYPE_CHECKING:
    from ccmem.methods.base import Method

FORMAT = "ccmem.adapter"
FORMAT_VERSION = "2"


class AdapterMismatchError(ValueError):
    """An adapter file that does not fit: another model, method or stage-1 LoRA, conflicting options, damage."""


@dataclass
class Adapter:
    """A read adapter file."""

    path: Path
    method: str
    options: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    model: str  # fingerprint of the model it was trained on
    model_name: str
    stage1: str  # hash of the stage-1 LoRA it was trained on top of ("" for none)
    hash: str  # of the file's bytes: what memories and result rows record
    extra: dict[str, Any] = field(default_factory=dict)
    weights: str = ""  # LoadedModel.weights_digest of the model it was trained on ("": not recorded)

    @property
    def _train_data(self) -> dict[str, Any]:
        """The ``data`` section of the training config in its provenance ({} when it does not record one)."""
        config = self.extra.get("config", {})
        data = config.get("data", {}) if isinstance(config, dict) else {}
        return data if isinstance(data, dict) else {}

    @property
    def train_dataset(self) -> str:
        """The dataset the adapter was trained on, from its provenance ("?" when it does not say)."""
        return str(self.extra.get("data") or self._train_data.get("dataset") or "?")

    def trained_system(self, default: str | None) -> str | None:
        """The system prompt the adapter was trained with (``data.system`` of its training config; None: none),
        or ``default`` when its provenance does not say."""
        data = self._train_data
        if "system" not in data:
            return default
        return str(data["system"]) if data["system"] else None

    def system_note(self, used: str | None) -> str | None:
        """What to tell a user running this adapter with the system prompt ``used`` (None: none) where it was
        trained with another one (None where they agree, or its provenance does not say)."""
        trained = self.trained_system(used)
        if trained == used:
            return None
        return (
            f"the adapter {self.path} was trained with {_prompt(trained)}, and runs here with {_prompt(used)}; "
            f"its memory may be read less well (--system {trained or ''!r} gives it its own)"
        )


def _prompt(system: str | None) -> str:
    return f"the system prompt {system!r}" if system is not None else "no system prompt"


def _shipped_folder(model_name: str) -> Path | None:
    """Where ccmem's adapters for ``model_name`` lie: a plain name only (a model given as a path, say
    ``/models/tiny``, has none; joined onto the adapters folder it would point into the model's own folder)."""
    if not model_name or model_name != Path(model_name).name or model_name in (".", ".."):
        return None
    return Path(str(resources.files("ccmem") / "adapters" / model_name))


def shipped_adapter(model_name: str, method: str) -> Path | None:
    """The adapter ccmem ships for ``(model, method)``, if any."""
    folder = _shipped_folder(model_name)
    path = folder / f"{method}.safetensors" if folder is not None else None
    return path if path is not None and path.is_file() else None


def adapter_path(model_name: str, method: str, given: str | os.PathLike[str] | None = None) -> Path | None:
    """The adapter file ``method`` runs with on ``model_name``: the one ``given``, else the one ccmem ships where
    the method needs one (``None``: it runs without)."""
    if given is not None:
        return Path(given).expanduser()
    return shipped_adapter(model_name, method) if method_class(method).needs_adapter else None


def shipped_adapter_names(model_name: str) -> list[str]:
    """The adapters ccmem ships for ``model_name`` (file stems: ``ccm-concat``, ``ccm-concat-stream`` ...)."""
    folder = _shipped_folder(model_name)
    return sorted(p.stem for p in folder.glob("*.safetensors")) if folder is not None and folder.is_dir() else []


def default_methods(model_name: str, kinds: tuple[str, ...] = ("baseline", "learned")) -> list[str]:
    """The registered methods of ``kinds`` worth running on ``model_name`` by default: learned methods only
    where an adapter ships for that model (untrained, their memory means nothing, or, for local and scattered
    attention, they are not the methods the papers measured)."""
    return [
        name
        for name, cls in method_classes().items()
        if cls.kind in kinds and (cls.kind != "learned" or shipped_adapter(model_name, name) is not None)
    ]


def file_hash(path: str | os.PathLike[str]) -> str:
    """The first 16 hex digits of the file's sha256: how model cards and result rows name an adapter file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def read_adapter(path: str | os.PathLike[str]) -> Adapter:
    """Read an adapter file; a file that is not one is refused with what it is instead."""
    path = Path(path)
    if path.is_dir():  # a run's folder, or one of its checkpoints
        inside = path / "adapter.safetensors"
        if inside.is_file():
            raise FileNotFoundError(f"{path} is a folder; its adapter is {inside}: pass that file")
        if path.name.startswith("checkpoint-"):
            raise FileNotFoundError(
                f"{path} is a training checkpoint, not an adapter: write one from it with `ccmem train <the run's "
                f"preset and overrides> --export-checkpoint {path.name.removeprefix('checkpoint-')}` and pass the "
                "file it names"
            )
        raise FileNotFoundError(f"{path} is a folder, not an adapter file (a .safetensors written by ccmem train)")
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterMismatchError(f"{path} is not a readable safetensors adapter: {err}") from None
    if meta.get("format") != FORMAT:
        hint = (
            " (it is a stage-1 LoRA: pass it as stage1=, not adapter=)" if meta.get("format") == "ccmem.stage1" else ""
        )
        raise AdapterMismatchError(f"{path} is not a ccmem adapter file{hint}")
    name = meta.get("method", "")
    try:
        cls = method_class(name)
    except UnknownMethodError:
        raise AdapterMismatchError(f"adapter {path} is for method {name!r}, which this ccmem does not have") from None
    try:
        if meta.get("format_version") is None:
            options, tensors = cls.legacy_adapter(tensors, meta)
        else:
            options = json.loads(meta.get("options", "{}"))
            if not isinstance(options, dict):  # else "'list' object has no attribute 'items'", naming no file
                raise ValueError(f"its options are {type(options).__name__}, not a JSON object of names and values")
        options = check_options(name, options)
        extra = json.loads(meta.get("extra", "{}"))
    except (KeyError, ValueError, NotImplementedError) as err:
        raise AdapterMismatchError(f"adapter {path} has damaged or unknown metadata: {err}") from None
    return Adapter(
        path=path,
        method=name,
        options=options,
        tensors=tensors,
        model=meta.get("model", ""),
        model_name=meta.get("model_name", "?"),
        stage1=meta.get("stage1", ""),
        hash=file_hash(path),
        extra=extra if isinstance(extra, dict) else {},
        weights=meta.get("weights", ""),
    )


def save_adapter(
    method: Method, lm: LoadedModel, path: str | os.PathLike[str], extra: dict[str, Any] | None = None
) -> Path:
    """Write ``method``'s trainable state for ``lm`` with its identity and options (atomically)."""
    module = method.module_for(lm)
    if module is None:
        raise ValueError(f"method {method.name!r} has no trainable state to save")
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    identity = (lm.fingerprint, lm.weights_digest or "", lm.name, lm.stage1)
    return _write(Path(path), tensors, method.name, method.options(), *identity, extra)


def _write(
    path: Path,
    tensors: dict[str, torch.Tensor],
    method: str,
    options: dict[str, Any],
    model: str,
    weights: str,
    model_name: str,
    stage1: str | None,
    extra: dict[str, Any] | None,
) -> Path:
    """The one writer of the adapter format (atomically): what :func:`read_adapter` reads back."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": method,
        "options": json.dumps(options, sort_keys=True),
        "model": model,
        "model_name": model_name,
        "stage1": stage1 or "",
        "extra": json.dumps(extra or {}, sort_keys=True, default=str),
    }
    if weights:
        meta["weights"] = weights
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        _sort_metadata(tmp)
    return path


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors file's header with its metadata keys sorted: safetensors writes them in hash order,
    another on every write, so the same adapter packed twice had two sha256s. The header keeps its length (it is
    padded with spaces), so the tensors do not move."""
    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        meta = header.pop("__metadata__", None)
        if meta is None:
            return
        ordered = {"__metadata__": dict(sorted(meta.items())), **header}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:  # equal but for the order; anything else is left as safetensors wrote it
            f.seek(8)
            f.write(text + b" " * (size - len(text)))


#: Precisions :func:`pack_adapter` stores weights in (loading casts them back to the model's dtype).
PACK_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def pack_adapter(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    runtime: dict[str, Any] | None = None,
) -> Path:
    """Copy an adapter to ``target`` with its floating tensors cast to ``dtype`` (e.g. ``torch.float16``: half
    the bytes of a shipped file; loading casts them back to the model's dtype) and ``runtime`` options set as its
    defaults (only options the method lets change after training, such as icformer's ``use_chunk``: the options
    the weights were trained with stay as they were). The metadata records what was packed."""
    if dtype is not None and dtype not in PACK_DTYPES:  # int8 truncated every weight to a whole number
        names = ", ".join(str(d).removeprefix("torch.") for d in PACK_DTYPES)
        raise ValueError(f"dtype={dtype!r} is not a precision an adapter's weights are stored in: give one of {names}")
    adapter = read_adapter(source)
    cls = method_class(adapter.method)
    runtime = runtime or {}
    fixed = sorted(k for k in runtime if k not in cls.runtime_options)
    if fixed:
        raise AdapterMismatchError(
            f"{fixed[0]!r} is not a runtime option of {adapter.method} (those are: "
            f"{', '.join(sorted(cls.runtime_options)) or 'none'}); the weights were trained with "
            f"{fixed[0]}={adapter.options.get(fixed[0])!r}"
        )
    options = check_options(adapter.method, adapter.options | runtime)
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
        for k, v in adapter.tensors.items()
    }
    extra = adapter.extra | {
        "packed": {"from": adapter.hash, "dtype": str(dtype).replace("torch.", "") if dtype else None, **runtime}
    }
    identity = (adapter.model, adapter.weights, adapter.model_name, adapter.stage1)
    return _write(Path(target), tensors, adapter.method, options, *identity, extra)


def trained_options(adapter: Adapter, method: type[Method] | Method) -> dict[str, Any]:
    """The options ``adapter`` was trained with, every option of ``method`` named: one the adapter does not record
    was added after it was made, so it was trained at its default (the later-fields rule of training configs)."""
    return {spec.name: spec.default for spec in method.option_specs()} | adapter.options


#: Options that name a set (of layers): given in another order than the adapter records them, they agree.
UNORDERED_OPTIONS = frozenset({"lora_targets"})


def _same_names(trained: Any, given: Any) -> bool:
    """Whether two values of an :data:`UNORDERED_OPTIONS` option name the same things, in any order."""
    if not isinstance(trained, list | tuple) or not isinstance(given, list | tuple):
        return bool(trained == given)
    return sorted(map(str, trained)) == sorted(map(str, given))


def options_with_adapter(name: str, adapter: Adapter, given: dict[str, Any]) -> dict[str, Any]:
    """The options to build method ``name`` with: the adapter's, with ``given`` ones that do not conflict."""
    cls = method_class(name)
    if adapter.method != name:
        raise AdapterMismatchError(
            f"adapter {adapter.path} was trained for method {adapter.method!r}, not {name!r}; "
            f"use the method it was trained for (--method {adapter.method} where a command takes one) or an adapter "
            f"trained for {name}"
        )
    try:
        given = check_options(name, given)
    except OptionError as err:
        raise AdapterMismatchError(str(err)) from None
    trained = trained_options(adapter, cls)
    for key, value in given.items():
        if key in cls.runtime_options or key not in trained:
            continue
        if key in UNORDERED_OPTIONS and _same_names(trained[key], value):
            given[key] = trained[key]  # the adapter's order: memories made either way then match
        elif trained[key] != value:
            raise AdapterMismatchError(
                f"adapter {adapter.path} was trained with {key}={trained[key]!r}, but {key}={value!r} was "
                f"asked; leave {key} out to use the adapter's value, or use an adapter trained with {key}={value!r}"
            )
    return adapter.options | given


def check_state_kind(method: Method, lm: LoadedModel, adapter: Adapter) -> None:
    """Refuse an adapter of another method whose trainable state has nothing in common with ``method``'s (an
    ``icformer`` former given to ``ccm-concat``), naming both methods; kindred states (a ``ccm-concat`` adapter for
    ``ccm-merge``) pass, and their options are compared next."""
    module = method.module_for(lm)
    if adapter.method != method.name and module is not None and not set(module.state_dict()) & set(adapter.tensors):
        raise AdapterMismatchError(
            f"{adapter.path} is {_a(adapter.method)} adapter, and {method.name} cannot start from it (their trainable "
            f"states differ); give {_a(method.name)} adapter"
        )


def load_adapter(method: Method, lm: LoadedModel, adapter: Adapter, *, merging: str | None = None) -> None:
    """Fill ``method``'s trainable state for ``lm`` from ``adapter``; refuse one made for another model.
    ``merging``: the hash of a stage-1 LoRA that is to be merged into ``lm`` next (checked in place of its own)."""
    if adapter.model != lm.fingerprint and adapter.model_name == lm.name:
        # "trained for 'smollm2-135m', not for 'smollm2-135m'" was all a model loaded in bfloat16 was told
        raise AdapterMismatchError(
            f"adapter {adapter.path} was trained on other weights of {lm.name!r} than the ones loaded here (loaded "
            f"as {str(lm.dtype).removeprefix('torch.')}): the match is on the exact weights, so the same model at "
            "another dtype or revision differs; load it as it was trained (float32 unless trained in half "
            "precision: ccmem.load(..., dtype=None)), or use an adapter trained for these weights"
        )
    if adapter.model != lm.fingerprint:
        raise AdapterMismatchError(
            f"adapter {adapter.path} was trained for {adapter.model_name!r}, not for {lm.name!r} "
            "(its layers or weights differ); use an adapter trained for this model"
        )
    if weights_differ(adapter.weights, lm.weights_digest or ""):
        raise AdapterMismatchError(
            f"adapter {adapter.path} was trained on other weights ({adapter.model_name!r} as it names them) than "
            f"{lm.name!r}'s, though their architecture and embeddings are the same (weights {adapter.weights}, here "
            f"{lm.weights_digest}): a finetune or merged LoRA of one base; use an adapter trained for these weights"
        )
    stage1 = merging or lm.stage1
    if adapter.stage1 != (stage1 or ""):
        raise AdapterMismatchError(
            f"adapter {adapter.path} was trained on top of stage-1 LoRA {adapter.stage1 or 'none'}, but this model has "
            f"{stage1 or 'none'} merged in; pass the same stage-1 run (--stage1 PATH; in Python "
            "ccmem.load(..., stage1=PATH))"
        )
    module = method.module_for(lm)
    if module is None:
        raise AdapterMismatchError(f"method {method.name!r} takes no adapter")
    expected = module.state_dict()
    if set(expected) != set(adapter.tensors):
        made = ", ".join(f"{k}={v}" for k, v in sorted(adapter.options.items()) if k not in method.runtime_options)
        missing, extra = sorted(set(expected) - set(adapter.tensors)), sorted(set(adapter.tensors) - set(expected))
        sides = [f"{method.name} needs {missing[:3]}" if missing else "", f"it holds {extra[:3]}" if extra else ""]
        raise AdapterMismatchError(
            f"adapter {adapter.path} does not fit {method.name} on this model ({'; '.join(s for s in sides if s)}, "
            f"of its trained weights): it was made by {adapter.method} with {made}; give options that match, or "
            "an adapter trained with this method's"
        )
    for key, tensor in adapter.tensors.items():
        if tensor.shape != expected[key].shape:
            raise AdapterMismatchError(
                f"adapter {adapter.path}: {key} has shape {tuple(tensor.shape)}, this model needs "
                f"{tuple(expected[key].shape)}"
            )
        if not bool(torch.isfinite(tensor.float()).all()):
            raise AdapterMismatchError(f"adapter {adapter.path} is damaged: {key} holds NaN or infinite values")
    with torch.no_grad():
        module.load_state_dict({k: v.to(expected[k].dtype) for k, v in adapter.tensors.items()})
    method.adapter_hash = adapter.hash


def _a(name: str) -> str:
    """``a gist``, ``an icformer``: the article a method's name takes (by its first letter)."""
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name
