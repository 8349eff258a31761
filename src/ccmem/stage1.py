"""Stage 1 of the CCM recipe: a LoRA finetuned with full attention, merged into the base weights.

``ccmem train persona-full`` (``method.name=full``) trains it and writes an ordinary adapter
(``adapter.safetensors``, method ``full``); stage 2 (``load_path=``) and ``ccmem.load(..., stage1=)`` merge it
into the weights (``W += s·B·A``). The merge is recorded on the :class:`LoadedModel`, so an adapter trained on
top of a stage-1 LoRA is refused on a model that lacks it. Stage-1 files written by older ccmem versions
(``stage1_lora.safetensors``, format ``ccmem.stage1``) are still read.
"""

from __future__ import annotations

import gc
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ccmem.loading import LoadedModel
from ccmem.quantize import check_before_loading, quantize_weights

if TYPE_CHECKING:
    from ccmem.adapter import Adapter

ADAPTER_FILE = "adapter.safetensors"
LEGACY_STAGE1_FILE = "stage1_lora.safetensors"


class Stage1Error(ValueError):
    """A stage-1 LoRA that is missing, malformed, made for another model, or merged twice."""


def stage1_file(path: str | os.PathLike[str]) -> Path:
    """The stage-1 LoRA file of a run folder (or the file itself); refused with what was expected if none."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / ADAPTER_FILE if (file / ADAPTER_FILE).is_file() else file / LEGACY_STAGE1_FILE
    if not file.is_file():
        raise Stage1Error(f"no stage-1 LoRA at {path} (expected {ADAPTER_FILE} of a finished `method.name=full` run)")
    return file


def stage1_hash(path: str | os.PathLike[str]) -> str:
    """The hash a stage-1 LoRA (a run folder or its file) is recorded by once merged (:attr:`LoadedModel.stage1`)."""
    return hashlib.sha256(stage1_file(path).read_bytes()).hexdigest()[:16]


def read_stage1(path: str | os.PathLike[str]) -> tuple[Path, dict[str, str], Adapter | None]:
    """A stage-1 LoRA's file, its metadata and its adapter (``None`` for a file of an older ccmem), refused when it
    is none; read without the model, so that a wrong file is said before a model loads."""
    from ccmem.adapter import AdapterMismatchError, read_adapter

    file = stage1_file(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise Stage1Error(f"{file} is not a readable safetensors file: {err}") from None
    if meta.get("format") == "ccmem.stage1":
        return file, meta, None
    try:
        adapter = read_adapter(file)
    except AdapterMismatchError as err:
        raise Stage1Error(str(err)) from None
    if adapter.method != "full":
        raise Stage1Error(
            f"{file} is a {adapter.method} adapter; a stage-1 LoRA comes from a finished `method.name=full` run"
        )
    return file, meta, adapter


def check_weight_changes(
    stage1: str | os.PathLike[str] | None,
    quantize: str | None,
    model: str,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype | None = None,
) -> None:
    """What :func:`change_weights` will do, checked before ``model`` loads, so that a refusal costs no load: the
    stage-1 file is read (a wrong path or file), the quantize scheme checked where the model would run (a GPU, half
    precision)."""
    if stage1 is not None:
        read_stage1(stage1)
    if quantize is not None:
        check_before_loading(quantize, model, attn_implementation, dtype)


def change_weights(lm: LoadedModel, stage1: str | os.PathLike[str] | None, quantize: str | None) -> None:
    """The weights every method then reads: the stage-1 LoRA merged in, then the linear layers packed (the merge
    needs float layers). Called once the methods and adapter are known to run on ``lm``, so that a refusal never
    leaves a shared model changed."""
    if stage1 is not None:
        merge_stage1(lm, stage1)
    if quantize is not None:
        quantize_weights(lm, quantize)


def merge_stage1(lm: LoadedModel, path: str | os.PathLike[str]) -> str:
    """Add a finished stage-1 LoRA (a run folder or its file) into the base weights; returns its hash."""
    from ccmem.adapter import load_adapter
    from ccmem.registry import get_method

    file, meta, adapter = read_stage1(path)
    digest = stage1_hash(file)
    if lm.stage1 == digest:
        return digest  # already merged (models are shared between sessions)
    if lm.stage1 is not None:
        raise Stage1Error(f"this model already has stage-1 LoRA {lm.stage1} merged in; load a fresh model")
    if lm.readers:
        gc.collect()  # a session dropped but held in a reference cycle reads nothing any more
    if lm.readers:
        many = len(lm.readers) > 1
        raise Stage1Error(
            f"{len(lm.readers)} session{'s' if many else ''} already read{'' if many else 's'} {lm.name}; merging "
            f"stage-1 LoRA {digest} would change the weights under {'them' if many else 'it'} "
            f"({'their' if many else 'its'} memories were made without it). Give the stage-1 sessions a model of "
            f"their own, ccmem.load({lm.name!r}, ..., stage1=...), or merge before any session reads the model"
        )
    if lm.quantized is not None:
        raise Stage1Error(
            f"a stage-1 LoRA is merged into the model's float32 linear layers, and {lm.name}'s are packed "
            f"({lm.quantized} weights); merge first, then quantize: ccmem.load(..., stage1=..., "
            f"quantize={lm.quantized!r}) and --stage1 with --quantize do that"
        )
    if adapter is None:
        _merge_legacy(lm, file, meta)
    else:
        if adapter.model != lm.fingerprint:
            raise _other_model(file, adapter.model_name, lm)
        method = get_method("full", **adapter.options)
        load_adapter(method, lm, adapter)
        lora = method.module_for(lm)
        lora.merge_into(lm.model.base_model)  # type: ignore[union-attr,operator]
    lm.stage1 = digest
    return digest


def _other_model(file: Path, trained_for: str | None, lm: LoadedModel) -> Stage1Error:
    """The refusal of a stage-1 LoRA made for another model (by the same name: other weights)."""
    if trained_for == lm.name:  # "trained for 'x', not for 'x'" was all it said
        return Stage1Error(
            f"{file} was trained on other weights of {lm.name!r} than the ones loaded here (another checkpoint or "
            "revision at that name); load the weights it was trained on, or run stage 1 on these"
        )
    return Stage1Error(f"{file} was trained for model {trained_for!r}, not for {lm.name!r}; run stage 1 on this model")


def _merge_legacy(lm: LoadedModel, file: Path, meta: dict[str, str]) -> None:
    if meta.get("model") != lm.fingerprint:
        raise _other_model(file, meta.get("model_name"), lm)
    state = load_file(str(file))
    scaling = float(meta["scaling"])
    with torch.no_grad():
        for key in state:
            if key.endswith(".A"):
                weight = cast(torch.Tensor, lm.model.get_submodule(key[:-2]).weight)
                delta = state[key[:-2] + ".B"].float() @ state[key].float()
                weight += (scaling * delta).to(weight.dtype)
