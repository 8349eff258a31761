"""Stage 1 of the CCM recipe: a plain LoRA finetuned with full attention, saved and merged into the base.

``ccmem train`` (``method.name=full``) trains it with peft and writes ``stage1_lora.safetensors``;
stage 2 (``load_path=``) and ``ccmem.load(..., stage1=)`` merge it into the base weights
(``W += s·B·A``). The merge is recorded on the :class:`LoadedModel`, so an adapter trained on top of a
stage-1 LoRA is refused on a model that lacks it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import cast

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ccmem.fileio import atomic_path
from ccmem.loading import LoadedModel

STAGE1_WEIGHTS = "stage1_lora.safetensors"


class Stage1Error(ValueError):
    """A stage-1 LoRA that is missing, malformed, made for another model, or merged twice."""


def save_stage1(lm: LoadedModel, path: Path, *, scaling: float) -> Path:
    """The peft LoRA of ``lm`` as safetensors: ``<module>.A``/``.B`` per projection, with model identity."""
    state = {}
    for name, module in lm.model.named_modules():
        a, b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if isinstance(a, nn.ModuleDict) and isinstance(b, nn.ModuleDict) and "default" in a:
            state[f"{name}.A"] = cast(torch.Tensor, a["default"].weight).detach().contiguous().cpu()
            state[f"{name}.B"] = cast(torch.Tensor, b["default"].weight).detach().contiguous().cpu()
    meta = {"format": "ccmem.stage1", "model": lm.fingerprint, "model_name": lm.name, "scaling": str(scaling)}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def merge_stage1(lm: LoadedModel, path: str | os.PathLike[str]) -> str:
    """Add a finished stage-1 LoRA (a run folder or its file) into the base weights; returns its hash."""
    file = Path(path)
    if file.is_dir():
        file = file / STAGE1_WEIGHTS
    if not file.is_file():
        raise Stage1Error(f"no stage-1 LoRA at {path} (expected {STAGE1_WEIGHTS} of a finished `method.name=full` run)")
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "ccmem.stage1":
        raise Stage1Error(f"{file} is not a ccmem stage-1 LoRA file")
    if meta.get("model") != lm.fingerprint:
        raise Stage1Error(
            f"{file} was trained for model {meta.get('model_name')!r}, not for {lm.name!r}; run stage 1 on this model"
        )
    digest = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    if lm.stage1 == digest:
        return digest  # already merged (models are shared between sessions)
    if lm.stage1 is not None:
        raise Stage1Error(f"this model already has stage-1 LoRA {lm.stage1} merged in; load a fresh model")
    state = load_file(str(file))
    scaling = float(meta["scaling"])
    with torch.no_grad():
        for key in state:
            if key.endswith(".A"):
                weight = cast(torch.Tensor, lm.model.get_submodule(key[:-2]).weight)
                delta = state[key[:-2] + ".B"].float() @ state[key].float()
                weight += (scaling * delta).to(weight.dtype)
    lm.stage1 = digest
    return digest
