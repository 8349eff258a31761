"""The compressed memory: per-layer key/value tensors in typed segments, plus what is needed to use them safely.

A :class:`Memory` is plain data (tensors and metadata); methods return a new one instead of changing it.
Every layer holds the same three segments, in this order::

    [ sink | compressed | window ]

``sink``        tokens kept uncompressed at the front (the system prompt: the attention sink);
``compressed``  what a method keeps of older context: <COMP> keys/values (CCM, gist), the entries an eviction
                method selected (H2O, SnapKV, ...); its length may differ from layer to layer;
``window``      raw recent tokens, in order (all of the context for ``full``; the recent window of StreamingLLM).

``positions[i][b, h, s]`` is the position id slot ``s`` of layer ``i`` was written at (``-1`` for a blend of
several positions, such as a CCM-merge slot), so that keys can be inspected or re-based later.
``state`` holds tensors a method needs to continue (CCM-merge's step count, gist's uncompressed context,
H2O's accumulated attention): they are saved with the memory but are not key/value memory.

:meth:`Memory.compact` holds a memory's keys/values at a storage precision (bfloat16, float16, int8 with
per-channel scales; :mod:`ccmem.precision`) as a :class:`CompactMemory`, what a server keeping many sessions
holds in RAM; :meth:`CompactMemory.expanded` gives back a usable memory in the model's dtype. Positions and
``state`` are never converted: they stay exact.

:meth:`Memory.to_cache` turns a memory into a fresh transformers ``DynamicCache`` for a forward or
``model.generate(...)``, so generating never mutates the memory itself. Saved files are safetensors with
string metadata, written atomically (at a storage precision: ``save(path, dtype="int8")``), and validated
completely when loaded; a loaded memory is in the model's dtype, whatever precision its file holds.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ccmem.fileio import atomic_path
from ccmem.precision import STORAGE_DTYPES, PackedTensor, dtype_name, pack_keys, pack_values, scale_shapes, storage_name

#: The format this ccmem writes for int8 memories (version 3 added int8 keys/values with their scales). Float
#: memories are written as version 2, whose layout they keep, so an older ccmem still reads them.
FORMAT_VERSION = "3"
READABLE_VERSIONS = ("2", "3")
SEGMENTS = ("sink", "compressed", "window")

KV = tuple[torch.Tensor, torch.Tensor]


class MemoryMismatchError(ValueError):
    """A saved memory that cannot be used here: another model, method or adapter, or a damaged file."""


@dataclass(frozen=True)
class KVShape:
    """What every memory of a model must look like: layers, key/value heads, head size, dtype."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype


class SlotCounts:
    """Slot counts of a memory whose ``layers`` are ``(keys, values)`` pairs shaped ``[batch, heads, slots, dim]``
    (:class:`Memory` and :class:`CompactMemory` alike)."""

    layers: Sequence[tuple[Any, Any]]

    @property
    def slots_per_layer(self) -> list[int]:
        """Key/value positions held by each layer."""
        return [int(k.shape[-2]) for k, _ in self.layers]

    @property
    def num_slots(self) -> int:
        """Key/value positions per layer (their mean, rounded down, where layers hold different numbers)."""
        counts = self.slots_per_layer
        return sum(counts) // len(counts) if counts else 0


@dataclass
class Memory(SlotCounts):
    """Compressed key/value memory of one interaction.

    ``layers[i] = (keys, values)`` with shape ``[batch, kv_heads, slots_i, head_dim]``; ``next_position`` is
    the position id the next token will get; ``sink`` and ``window`` count the leading and trailing slots of
    those segments (the same in every layer); the slots between them are the compressed segment.
    """

    layers: list[KV] = field(default_factory=list)
    positions: list[torch.Tensor] = field(default_factory=list)
    next_position: int = 0
    sink: int = 0
    window: int = 0
    meta: dict[str, str] = field(default_factory=dict)
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    # False for one read from a file whose contents differ from the digest it was saved with (load_memory's verify)
    intact: bool = field(default=True, compare=False, repr=False)

    # ---------------------------------------------------------------- size

    @property
    def nbytes(self) -> int:
        """Bytes taken by all keys and values (``state`` is not key/value memory and is not counted)."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype keys and values are held in (None for a memory without layers)."""
        return self.layers[0][0].dtype if self.layers else None

    def segment_lengths(self, layer: int = 0) -> dict[str, int]:
        """``{"sink": n, "compressed": n, "window": n}`` slots of one layer."""
        if self.layers and not 0 <= layer < len(self.layers):
            raise ValueError(f"layer {layer}: this memory holds layers 0 to {len(self.layers) - 1}")
        total = self.slots_per_layer[layer] if self.layers else 0
        return {"sink": self.sink, "compressed": total - self.sink - self.window, "window": self.window}

    def is_empty(self) -> bool:
        return self.num_slots == 0

    # ---------------------------------------------------------------- derived memories

    def clone(self) -> Memory:
        return replace(
            self,
            layers=[(k.clone(), v.clone()) for k, v in self.layers],
            positions=[p.clone() for p in self.positions],
            meta=dict(self.meta),
            state={k: v.clone() for k, v in self.state.items()},
        )

    def with_layers(
        self,
        layers: list[KV],
        positions: list[torch.Tensor],
        *,
        advance: int = 0,
        **changes: Any,
    ) -> Memory:
        """A new memory holding ``layers``, with positions moved on by ``advance`` tokens (other fields as given)."""
        return replace(
            self,
            layers=layers,
            positions=positions,
            next_position=changes.pop("next_position", self.next_position + advance),
            meta=dict(self.meta),
            state=dict(changes.pop("state", self.state)),
            **changes,
        )

    def select(self, index: torch.Tensor) -> tuple[list[KV], list[torch.Tensor]]:
        """Keys/values and positions at the given slot indices (1-D: the same slots in every layer and head)."""
        layers = [(k.index_select(-2, index), v.index_select(-2, index)) for k, v in self.layers]
        return layers, [p.index_select(-1, index) for p in self.positions]

    def without_window(self) -> Memory:
        """This memory without its trailing window of raw slots (positions, method state and identity kept)."""
        if not self.window:
            return self
        n = self.num_slots - self.window
        layers = [(k[..., :n, :], v[..., :n, :]) for k, v in self.layers]
        return self.with_layers(layers, [p[..., :n] for p in self.positions], window=0)

    def prefix(self, n: int) -> Memory:
        """The first ``n`` slots of every layer (e.g. only the sink); the window is dropped."""
        layers, positions = self.select(torch.arange(n, device=self.device))
        return replace(self, layers=layers, positions=positions, window=0, meta=dict(self.meta), state={})

    @property
    def device(self) -> torch.device:
        return self.layers[0][0].device if self.layers else torch.device("cpu")

    # ---------------------------------------------------------------- use with transformers

    def to_cache(self, room: int = 0) -> DynamicCache:
        """A new ``DynamicCache`` holding this memory (empty memory -> empty cache).

        ``room``: tokens each layer can take after the memory without copying it (:class:`RoomyLayer`). A decoding
        loop gives the tokens it will add, so each step writes its one entry in place: a plain ``DynamicCache``
        copies every layer's whole cache at every step, which costs most where the cache is long (on a 2-core
        CPU, ``full`` with a 2,000-token chat decoded 1.01-1.12x faster with room, a batch of 8 compressed
        memories 0.99-1.06x: ``benchmarks/decode_cache.py``).
        """
        if room:
            cache = DynamicCache()
            cache.layer_class_to_replicate = lambda: RoomyLayer(room)  # type: ignore[assignment]
            for k, v in self.layers:
                layer = RoomyLayer(room)
                layer.update(k, v)
                cache.layers.append(layer)
            return cache
        if not self.layers:
            return DynamicCache()
        return DynamicCache(ddp_cache_data=[(k, v) for k, v in self.layers])

    def generate_inputs(self, query_ids: torch.Tensor) -> dict[str, torch.Tensor | DynamicCache]:
        """Keyword arguments for ``model.generate(**memory.generate_inputs(query))``.

        ``generate`` expects ``input_ids`` to cover the cached positions too, so the memory slots are
        represented by placeholder ids it never reads; position ids continue the interaction's positions.
        Only for memories whose layers hold the same number of slots.
        """
        if len(set(self.slots_per_layer)) > 1:
            raise ValueError("model.generate needs the same number of cached slots in every layer")
        query_ids = query_ids[None] if query_ids.dim() == 1 else query_ids
        batch, n = query_ids.shape
        placeholder = query_ids.new_full((batch, self.num_slots), int(query_ids[0, 0]))
        input_ids = torch.cat([placeholder, query_ids], dim=1)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "position_ids": torch.arange(self.next_position, self.next_position + n, device=query_ids.device)[None],
            "cache": self.to_cache(),
        }

    @staticmethod
    def layers_of(cache: DynamicCache) -> list[KV]:
        """Per-layer ``(keys, values)`` of a filled cache."""
        return [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[union-attr,misc]

    # ---------------------------------------------------------------- storage precision and files

    def compact(self, dtype: str, *, device: torch.device | str | None = None) -> CompactMemory:
        """This memory with keys/values held at storage precision ``dtype`` (``"float32"``, ``"bfloat16"``,
        ``"float16"`` or ``"int8"``; see :mod:`ccmem.precision`), on ``device`` (default: where it is).

        Positions and ``state`` are kept exactly. Expand the result before using it with a model.
        """
        storage = storage_name(dtype)

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.detach() if device is None else t.detach().to(device)

        layers = [(pack_keys(move(k), storage), pack_values(move(v), storage)) for k, v in self.layers]
        return CompactMemory(storage, self.dtype or torch.float32, layers, **_bookkeeping(self, move))

    def save(self, path: str | os.PathLike[str], dtype: str | None = None) -> Path:
        """Write to a safetensors file atomically, keys/values at storage precision ``dtype`` (default: the
        memory's own dtype); see :func:`save_memory`."""
        return save_memory(self, path, dtype=dtype)

    @classmethod
    def load(cls, path: str | os.PathLike[str], **kwargs: Any) -> Memory:
        """Read and validate a saved memory; see :func:`load_memory`."""
        return load_memory(path, **kwargs)

    # ---------------------------------------------------------------- checks

    def check(self, shape: KVShape | None = None, *, where: str = "memory") -> None:
        """Raise :class:`MemoryMismatchError` naming what is wrong, in the user's terms, if the memory is not sound.

        Checks segment counts and positions against the tensors, and (with ``shape``) the model's layers, heads,
        head size and dtype, and that every key and value is finite.
        """

        def bad(message: str) -> MemoryMismatchError:
            return MemoryMismatchError(f"{where} is damaged or not for this model: {message}")

        if len(self.positions) != len(self.layers):
            raise bad(f"{len(self.layers)} key/value layers but {len(self.positions)} position tables")
        if self.next_position < 0 or self.sink < 0 or self.window < 0:
            raise bad(f"negative next_position/sink/window ({self.next_position}/{self.sink}/{self.window})")
        if not self.layers and (self.sink or self.window):  # a file stripped of its tensors loaded as empty
            raise bad(f"it holds no key/value layers, but counts {self.sink} sink and {self.window} window slots")
        if shape is not None and self.layers and len(self.layers) != shape.layers:
            raise bad(f"{len(self.layers)} layers, but the model has {shape.layers}")
        batch = None
        for i, ((k, v), pos) in enumerate(zip(self.layers, self.positions, strict=True)):
            if k.dim() != 4 or k.shape != v.shape:
                raise bad(f"layer {i}: keys {tuple(k.shape)} and values {tuple(v.shape)} must have the same 4-D shape")
            batch = k.shape[0] if batch is None else batch
            if k.shape[0] != batch:
                raise bad(f"layer {i} holds {k.shape[0]} sequences, layer 0 holds {batch}")
            if shape is not None:
                if (k.shape[1], k.shape[3]) != (shape.kv_heads, shape.head_dim):
                    raise bad(
                        f"layer {i} has {k.shape[1]} heads of size {k.shape[3]}, the model "
                        f"{shape.kv_heads} of size {shape.head_dim}"
                    )
                if k.dtype != shape.dtype or v.dtype != shape.dtype:
                    raise bad(f"layer {i} holds {k.dtype}/{v.dtype} tensors, the model computes in {shape.dtype}")
            if not k.is_floating_point() or not v.is_floating_point():
                raise bad(f"layer {i} holds {k.dtype} tensors; keys and values are floating point")
            if not bool(torch.isfinite(k).all()) or not bool(torch.isfinite(v).all()):
                raise bad(f"layer {i} holds NaN or infinite keys/values")
            if self.sink + self.window > k.shape[2]:
                raise bad(f"sink ({self.sink}) + window ({self.window}) exceed the {k.shape[2]} slots of layer {i}")
            if pos.shape != k.shape[:3]:
                raise bad(f"layer {i}: positions of shape {tuple(pos.shape)} for keys of shape {tuple(k.shape)}")
            if pos.numel() and (int(pos.max()) >= max(self.next_position, 1) or int(pos.min()) < -1):
                raise bad(f"layer {i} has slot positions outside -1..next_position-1 ({self.next_position - 1})")
            if pos.shape[-1] > 1:  # two slots of one head at one position: a hand-edited or mis-merged table
                ordered = pos.sort(dim=-1).values
                twice = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)  # -1: an empty slot
                if bool(twice.any()):
                    at = int(ordered[..., 1:][twice][0])
                    raise bad(f"layer {i} holds two slots of one head at position {at}; each position is held once")


@dataclass(frozen=True)
class CompactMemory(SlotCounts):
    """A :class:`Memory` whose keys/values are held at a storage precision (``storage``): what a memory file
    holds, and what a server keeping many sessions in RAM can hold. :meth:`expanded` makes it usable again.

    ``source_dtype`` is the dtype the memory was computed in (what :meth:`expanded` returns by default).
    """

    storage: str
    source_dtype: torch.dtype
    layers: list[tuple[PackedTensor, PackedTensor]]
    positions: list[torch.Tensor]
    next_position: int
    sink: int
    window: int
    meta: dict[str, str]
    state: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        """Bytes held by keys and values, int8 scales included (as :attr:`Memory.nbytes`, ``state`` and
        positions are not counted)."""
        return sum(k.nbytes + v.nbytes for k, v in self.layers)

    def expanded(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Memory:
        """The usable memory, keys/values in ``dtype`` (default: the dtype it was computed in) on ``device``."""
        dtype = dtype or self.source_dtype

        def move(t: torch.Tensor) -> torch.Tensor:
            return t if device is None else t.to(device)

        layers = [(k.unpack(dtype, device), v.unpack(dtype, device)) for k, v in self.layers]
        return Memory(layers=layers, **_bookkeeping(self, move))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to a safetensors file atomically, at this memory's storage precision; see :func:`save_memory`."""
        return save_memory(self, path)


def _bookkeeping(memory: Memory | CompactMemory, move: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
    """What a memory holds besides keys/values (positions, counters, identity, method state), carried exactly."""
    return {
        "positions": [move(p) for p in memory.positions],
        "next_position": memory.next_position,
        "sink": memory.sink,
        "window": memory.window,
        "meta": dict(memory.meta),
        "state": {name: move(t) for name, t in memory.state.items()},
    }


def positions_for(start: int, length: int, like: torch.Tensor) -> torch.Tensor:
    """``[batch, heads, length]`` positions ``start .. start+length-1`` for keys shaped like ``like``."""
    batch, heads = like.shape[0], like.shape[1]
    return torch.arange(start, start + length, device=like.device).expand(batch, heads, length).clone()


def constant_positions(value: int, length: int, like: torch.Tensor) -> torch.Tensor:
    """``[batch, heads, length]`` filled with ``value`` (``-1`` marks blended slots)."""
    return torch.full((like.shape[0], like.shape[1], length), value, dtype=torch.long, device=like.device)


def concat_layers(parts: Sequence[list[KV]]) -> list[KV]:
    """Layer-wise concatenation along the slot axis (empty parts are skipped)."""
    parts = [p for p in parts if p]
    if not parts:
        return []
    return [
        (torch.cat([p[i][0] for p in parts], dim=-2), torch.cat([p[i][1] for p in parts], dim=-2))
        for i in range(len(parts[0]))
    ]


def concat_positions(parts: Sequence[list[torch.Tensor]]) -> list[torch.Tensor]:
    parts = [p for p in parts if p]
    if not parts:
        return []
    return [torch.cat([p[i] for p in parts], dim=-1) for i in range(len(parts[0]))]


# ---------------------------------------------------------------- persistence


def _file_path(path: object, call: str) -> Path:
    """A memory file's path as given (``~`` read as the home folder, as for a model path, not as a folder named
    ``~``); anything but a non-empty str or path is refused in words, not by pathlib."""
    if not isinstance(path, str | os.PathLike) or not str(path).strip():
        raise ValueError(f"{call} takes the memory file's path (a str or Path), got {path!r}")
    return Path(path).expanduser()


def save_memory(memory: Memory | CompactMemory, path: str | os.PathLike[str], *, dtype: str | None = None) -> Path:
    """Write ``memory`` to a safetensors file atomically (a crash never leaves a half-written file).

    ``dtype`` is the storage precision of keys/values (``"float32"``, ``"bfloat16"``, ``"float16"``, ``"int8"``;
    default: the memory's own dtype, or a compact memory's own precision); the file records it, and
    :func:`load_memory` expands keys/values to the model's dtype again. Positions and ``state`` are stored exactly.
    """
    path = _file_path(path, "save_memory")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: give the memory file's name (e.g. {path / 'memory.safetensors'})")
    if isinstance(memory, Memory):
        memory = memory.compact(dtype if dtype is not None else dtype_name(memory.dtype or torch.float32))
    elif dtype is not None and storage_name(dtype) != memory.storage:
        memory = memory.expanded().compact(dtype)
    tensors = {}
    for i, ((k, v), pos) in enumerate(zip(memory.layers, memory.positions, strict=True)):
        for part, packed in (("keys", k), ("values", v)):
            tensors[f"layers.{i}.{part}"] = packed.data.contiguous().cpu()
            if packed.scale is not None:
                tensors[f"layers.{i}.{part}_scale"] = packed.scale.contiguous().cpu()
        tensors[f"layers.{i}.positions"] = pos.contiguous().cpu()
    for name, value in memory.state.items():
        tensors[f"state.{name}"] = value.detach().contiguous().cpu()
    metadata = {
        "format": "ccmem.memory",
        "format_version": FORMAT_VERSION if memory.storage == "int8" else "2",
        "storage": memory.storage,
        "computed_dtype": dtype_name(memory.source_dtype),
        "next_position": str(memory.next_position),
        "sink": str(memory.sink),
        "window": str(memory.window),
        "meta": json.dumps(memory.meta, sort_keys=True),
    }
    metadata["digest"] = _content_digest(tensors, metadata)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def _content_digest(tensors: dict[str, torch.Tensor], header: dict[str, str]) -> str:
    """sha256 (16 hex digits) of a memory file's contents as saved: every header field but ``digest`` and every
    tensor's name, dtype, shape and bytes. What a file that passes every other check can still hold wrong (a
    hand-edited ``window``, merge count or position) shows as a different digest."""
    digest = hashlib.sha256()
    for key in sorted(k for k in header if k != "digest"):
        digest.update(f"{key}={header[key]}\0".encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{dtype_name(tensor.dtype)}:{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _int_field(header: dict[str, Any], key: str, path: Path) -> int:
    raw = header.get(key, "0")
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise MemoryMismatchError(f"memory {path}: {key}={raw!r} is not a whole number") from None


def _packed_layer(
    tensors: dict[str, torch.Tensor], i: int, storage: str, path: Path
) -> tuple[PackedTensor, PackedTensor]:
    """Layer ``i``'s keys and values as stored, refused (naming what is wrong) when they do not match ``storage``."""

    def bad(message: str) -> MemoryMismatchError:
        return MemoryMismatchError(f"memory {path} is damaged: {message}")

    keys, values = tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"]
    for part, t in (("keys", keys), ("values", values)):
        if t.dtype != STORAGE_DTYPES[storage]:
            raise bad(f"layer {i} {part} are stored as {dtype_name(t.dtype)}, but the file records {storage} storage")
    if storage != "int8":
        return PackedTensor(keys), PackedTensor(values)
    if keys.dim() != 4 or keys.shape != values.shape:
        raise bad(f"layer {i}: keys {tuple(keys.shape)} and values {tuple(values.shape)} must have the same 4-D shape")
    packed = []
    for part, data, wanted in zip(("keys", "values"), (keys, values), scale_shapes(tuple(keys.shape)), strict=True):
        name = f"layers.{i}.{part}_scale"
        scale = tensors.get(name)
        if scale is None:
            raise bad(f"{name} is missing (int8 {part} cannot be read without their scales)")
        if tuple(scale.shape) != wanted:
            raise bad(f"{name} has shape {tuple(scale.shape)}; int8 {part} of shape {tuple(data.shape)} need {wanted}")
        if scale.dtype != torch.float32:
            raise bad(f"{name} is {dtype_name(scale.dtype)}; scales are float32")
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise bad(f"{name} holds scales that are not finite and positive")
        packed.append(PackedTensor(data, scale))
    return packed[0], packed[1]


def load_memory(
    path: str | os.PathLike[str],
    *,
    expect: dict[str, str] | None = None,
    shape: KVShape | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    verify: bool = True,
) -> Memory:
    """Read and validate a memory; refuse it when any ``expect`` entry differs from what it was saved with.

    ``verify=False`` leaves the digest to the caller (:func:`check_intact`, after its own checks): the memory comes
    back with ``intact`` False where its contents differ from what was saved.

    Keys/values come back in ``shape.dtype`` (the model's), else ``dtype``, else the dtype the memory was computed
    in, whatever storage precision the file holds (:func:`save_memory`); ``shape`` is then checked in full.
    """
    compact, intact = _read_compact(path, expect)
    memory = compact.expanded(shape.dtype if shape is not None else dtype, device)
    memory.check(shape, where=f"memory {path}")
    # what ccmem writes holds one interaction (several sequences would load, then fail deep inside the attention)
    batches = {int(k.shape[0]) for k, _ in memory.layers}
    if batches - {1}:
        raise MemoryMismatchError(
            f"memory {path} is damaged: its layers hold {sorted(batches)} sequences; a ccmem memory holds one"
        )
    memory.intact = intact
    if verify:  # last: the checks above name what is wrong where they can
        check_intact(memory, f"memory {path}")
    return memory


def check_intact(memory: Memory, where: str) -> None:
    """Refuse a memory read from a file whose contents no longer match the digest it was saved with. Callers that
    check more (a method's state, the sink) load with ``verify=False`` and call this last, so that a specific
    message comes first where there is one."""
    if not memory.intact:
        raise MemoryMismatchError(
            f"{where} is damaged or hand-edited: its contents differ from what was saved (the digest in its header "
            "no longer matches: a changed window, merge count or position passes every other check); compress the "
            "context again, or use the file as ccmem wrote it"
        )


def memory_meta(path: str | os.PathLike[str]) -> dict[str, str]:
    """What a memory file says it was made with (method, its options, model, system prompt), read from its header
    alone; ``{}`` for a file that is not a readable ccmem memory (:func:`load_memory` says what is wrong)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
        meta = json.loads(header.get("meta", "{}")) if header.get("format") == "ccmem.memory" else {}
    except Exception:  # any unreadable file: the full load reports it properly
        return {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def weights_differ(recorded: str, loaded: str) -> bool:
    """Whether two :attr:`~ccmem.loading.LoadedModel.weights_digest` values (``"<dtype>:<hex>"``) name other
    weights. Only digests taken at the same precision compare (a model loaded in bfloat16 rounds its weights, a
    merged LoRA changes them less than that); an empty one (a file written before ccmem recorded it, a model whose
    layers were packed when it was wrapped) compares with anything."""
    if not recorded or not loaded:
        return False
    (recorded_dtype, _, recorded_hex), (loaded_dtype, _, loaded_hex) = recorded.partition(":"), loaded.partition(":")
    return recorded_dtype == loaded_dtype and recorded_hex != loaded_hex


def check_meta(meta: dict[str, str], expect: dict[str, str], where: str) -> None:
    """Refuse (:class:`MemoryMismatchError`) a memory whose identity ``meta`` differs from ``expect`` (the model,
    stage-1 LoRA, method, its options and adapter of the session that would use it)."""
    first = ("model", "stage1", "method", "adapter")  # an adapter carries its options: name it before them
    for key in sorted(expect, key=lambda k: first.index(k) if k in first else len(first)):
        wanted = expect[key]
        found = meta.get(key, "")  # a key older memories lack reads as empty, like stage1 on plain weights
        if key == "weights":  # compared where both record it at one precision (weights_differ)
            if weights_differ(found, wanted):
                made_by = f" ({meta['model_name']!r} as it named it)" if meta.get("model_name") else ""
                raise MemoryMismatchError(
                    f"{where} was made by other weights{made_by} than this model's, though its architecture and "
                    f"embeddings are the same (weights {found}, here {wanted}): a finetune or merged LoRA of the same "
                    "base reads a memory differently; load it with the model that made it"
                )
            continue
        if found != wanted and key == "adapter":
            raise MemoryMismatchError(
                f"{where} was made with adapter {found}, but this session runs adapter {wanted}; use the adapter "
                "that made it (--adapter PATH; the hash is the first 16 hex digits of its sha256)"
            )
        if found != wanted and key == "model" and meta.get("model_name"):
            raise MemoryMismatchError(
                f"{where} was made with model {meta['model_name']!r} (weights {found}), not with this one "
                f"(weights {wanted}); load it with that model (--model {meta['model_name']})"
            )
        if found != wanted and key not in first and key not in meta:
            raise MemoryMismatchError(
                f"{where} was saved by an older ccmem that did not record {key} (this session has {key}="
                f"{wanted!r}); compress its context again"
            )
        if found != wanted:
            raise MemoryMismatchError(
                f"{where} was made with {key}={_shown(found)}, but this session has {key}={_shown(wanted)}; use it "
                "with the same model, stage-1 LoRA, method, method options and adapter that made it"
            )


def _shown(value: str) -> str:
    """A recorded option as ``-O`` takes it: a number or flag bare (``ratio=0.125``: the file records text, and
    ``ratio='0.125'`` read as if the option had been given as text), other text quoted."""
    if value in ("True", "False"):
        return value
    try:
        float(value)
    except ValueError:
        return repr(value)
    return value


class RoomyLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values sit at the front of buffers with room to grow along the sequence.

    ``update`` writes the new entries after the ones held, in place, and returns views of the filled part, the
    same tensors ``DynamicLayer`` returns; only when the room runs out are the buffers copied into larger ones
    (with ``room`` tokens, or a quarter of what they hold, to spare). Assigning ``keys`` or ``values`` (an
    eviction, a batch's rows leaving) takes the tensor as the new contents, without room: the next update copies
    it. Entries once returned are never written again, so a view handed out earlier keeps its values.
    """

    def __init__(self, room: int) -> None:
        self.room = int(room)
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._k_len = self._v_len = 0
        super().__init__()

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[..., : self._k_len, :]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._k, self._k_len = value, (0 if value is None or value.dim() < 2 else int(value.shape[-2]))

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[..., : self._v_len, :]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._v, self._v_len = value, (0 if value is None or value.dim() < 2 else int(value.shape[-2]))

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._k, self._k_len = self._append(self._k, self._k_len, key_states)
        self._v, self._v_len = self._append(self._v, self._v_len, value_states)
        return self.keys, self.values  # type: ignore[return-value]

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor, held: int, room: int) -> RoomyLayer:
        """A layer over the buffers ``keys`` and ``values`` themselves (``[batch, heads, held + spare, dim]``), their
        first ``held`` entries filled: a batch laid out in place (:func:`~ccmem.methods.base.pad_rows`) is not
        copied again. ``room``: the spare entries a buffer that runs out is grown by, at least."""
        layer = cls(room)
        layer._k, layer._v, layer._k_len, layer._v_len = keys, values, held, held
        layer.device, layer.is_initialized = keys.device, True
        return layer

    def drop(self, start: int, stop: int) -> None:
        """Remove entries ``start:stop`` (in the order written), the rest copied once into buffers with room."""
        for name in ("_k", "_v"):
            held = self._k_len if name == "_k" else self._v_len
            old = getattr(self, name)
            if old is None or not 0 <= start <= stop <= held:
                raise ValueError(f"cannot drop entries {start}:{stop} of the {held} held")
            keep = held - (stop - start)
            buffer = old.new_empty(*old.shape[:-2], keep + self.room, old.shape[-1])
            buffer[..., :start, :] = old[..., :start, :]
            buffer[..., start:keep, :] = old[..., stop:held, :]
            setattr(self, name, buffer)
        self._k_len = self._v_len = keep

    def _append(self, buffer: torch.Tensor | None, held: int, new: torch.Tensor) -> tuple[torch.Tensor, int]:
        need = held + int(new.shape[-2])
        fits = (
            buffer is not None
            and buffer.dim() == new.dim()
            and buffer.shape[:-2] == new.shape[:-2]
            and buffer.shape[-1] == new.shape[-1]
            and buffer.dtype == new.dtype
            and buffer.device == new.device
        )
        if buffer is None or not fits or need > buffer.shape[-2]:
            if held and (buffer is None or buffer.dim() != new.dim()):
                raise ValueError(f"cache entries of shape {tuple(new.shape)} cannot follow {held} held otherwise")
            grown = new.new_empty(*new.shape[:-2], need + max(self.room, need // 4), new.shape[-1])
            if held and buffer is not None:
                grown[..., :held, :] = buffer[..., :held, :]
            buffer = grown
        buffer[..., held:need, :] = new
        return buffer, need


def drop_entries(layer: Any, start: int, stop: int) -> None:
    """Remove a cache layer's entries ``start:stop`` (in the order written), its keys and values alike: in one
    copy into the room a :class:`RoomyLayer` keeps for the tokens to come, else by concatenating what is left."""
    if isinstance(layer, RoomyLayer):
        layer.drop(start, stop)
        return
    layer.keys = torch.cat([layer.keys[:, :, :start], layer.keys[:, :, stop:]], dim=2)
    layer.values = torch.cat([layer.values[:, :, :start], layer.values[:, :, stop:]], dim=2)


def _read_compact(path: str | os.PathLike[str], expect: dict[str, str] | None) -> tuple[CompactMemory, bool]:
    """A memory file as stored, its header, identity and storage validated (the key/value tensors themselves are
    checked by :meth:`Memory.check` once expanded), and whether its contents match the digest it was saved with
    (True for a file written before ccmem recorded one)."""
    path = _file_path(path, "load_memory")
    if not path.is_file():
        raise FileNotFoundError(f"no memory file at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header: dict[str, Any] = f.metadata() or {}
            if header.get("format") != "ccmem.memory":
                raise MemoryMismatchError(f"{path} is not a ccmem memory file")
            names = set(f.keys())
            tensors = {name: f.get_tensor(name) for name in names}
    except (OSError, ValueError, SafetensorError) as err:
        if isinstance(err, MemoryMismatchError):
            raise
        raise MemoryMismatchError(
            f"{path} is not a readable safetensors memory file ({err}); a memory file is one that save_memory, "
            "chat's /save or `ccmem compress TEXT --out FILE` wrote (compress reads a text file into one)"
        ) from err
    version = header.get("format_version")
    if version not in READABLE_VERSIONS:
        raise MemoryMismatchError(
            f"memory {path} has format version {version!r}; this ccmem reads versions "
            f"{', '.join(READABLE_VERSIONS)}. Compress the context again to make a new memory file"
        )
    try:
        meta = json.loads(header.get("meta", "{}"))
    except json.JSONDecodeError:
        raise MemoryMismatchError(f"memory {path}: its metadata is not valid JSON") from None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise MemoryMismatchError(f"memory {path}: its metadata must map names to strings")
    check_meta(meta, expect or {}, f"memory {path}")
    n_layers = len([n for n in names if n.startswith("layers.") and n.endswith(".keys")])
    first = tensors.get("layers.0.keys")
    # files written before storage precisions (version 2 without "storage") hold keys/values as computed
    recorded = header.get("storage", dtype_name(first.dtype) if first is not None else "float32")
    if recorded not in STORAGE_DTYPES:
        raise MemoryMismatchError(
            f"memory {path} records storage {recorded!r}; this ccmem reads {', '.join(STORAGE_DTYPES)} "
            "(keys and values are floating point, or int8 with scales)"
        )
    layers, positions = [], []
    for i in range(n_layers):
        missing = [
            f"layers.{i}.{part}" for part in ("keys", "values", "positions") if f"layers.{i}.{part}" not in names
        ]
        if missing:
            raise MemoryMismatchError(f"memory {path} is damaged: {missing[0]} is missing")
        keys, values = _packed_layer(tensors, i, recorded, path)
        layers.append((keys, values))
        table = tensors[f"layers.{i}.positions"]
        if table.is_floating_point() or table.dtype == torch.bool:  # .long() made 2.7 a 2 and True a 1, silently
            raise MemoryMismatchError(
                f"memory {path} is damaged: layers.{i}.positions holds {dtype_name(table.dtype)} values; positions are "
                "whole numbers"
            )
        positions.append(table.long())
    computed = header.get("computed_dtype", dtype_name(first.dtype) if first is not None else "float32")
    source = STORAGE_DTYPES.get(computed)
    if source is None or source == torch.int8:
        raise MemoryMismatchError(f"memory {path}: computed_dtype {computed!r} is not a floating point dtype")
    intact = "digest" not in header or header["digest"] == _content_digest(tensors, header)
    return CompactMemory(
        storage=recorded,
        source_dtype=source,
        layers=layers,
        positions=positions,
        next_position=_int_field(header, "next_position", path),
        sink=_int_field(header, "sink", path),
        window=_int_field(header, "window", path),
        meta=meta,
        state={n.removeprefix("state."): t for n, t in tensors.items() if n.startswith("state.")},
    ), intact
