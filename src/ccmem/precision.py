"""Storage precisions for key/value memory: float32, bfloat16, float16, and int8 with per-channel scales.

A memory computed in the model's dtype can be *held* (in RAM by a session store, or in a file) at a lower
precision and expanded back to the model's dtype before use. :class:`PackedTensor` is one key or value tensor
at a storage precision; :func:`pack_keys` and :func:`pack_values` make one, :meth:`PackedTensor.unpack` reads
it back. The float precisions are plain casts; int8 is symmetric (no zero point) with one float32 scale per
channel, ``x ≈ q * scale`` with ``q`` in -127..127, so every element is within ``scale / 2`` of the original.

Which axis shares a scale differs for keys and values (as in KIVI, Liu et al. 2024,
https://arxiv.org/abs/2402.02750): see :func:`pack_keys` and :func:`pack_values`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Storage precision name -> the dtype its data is held in.
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,
}
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
INT8_MAX = 127
#: The storage choice that picks a precision from the model's dtype (:func:`auto_storage`).
AUTO = "auto"


class PrecisionRangeError(ValueError):
    """A memory holds values beyond what the storage precision can represent (float16 past 65504)."""


def auto_storage(model_dtype: torch.dtype) -> str | None:
    """The storage precision ``"auto"`` stands for: float16 for a model computing in float32 (half the bytes; on
    the persona benchmark no answer moved, README: Memory density), else ``None``, the model's own dtype (a
    half-precision model's memory is already half precision). Where a memory reaches past float16's range
    (:class:`PrecisionRangeError`), the caller holds it at bfloat16 instead (as ``ccmem serve`` does)."""
    return "float16" if model_dtype == torch.float32 else None


def storage_name(name: str | torch.dtype) -> str:
    """The canonical storage precision for ``name`` (``bf16`` -> ``bfloat16``, ``torch.float16`` -> ``float16``);
    refuse an unknown one."""
    if isinstance(name, torch.dtype):
        name = dtype_name(name)
    if not isinstance(name, str):
        raise ValueError(f"memory storage dtype must be a name such as 'bfloat16' or a torch.dtype, got {name!r}")
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in STORAGE_DTYPES:
        raise ValueError(
            f"unknown memory storage dtype {name!r}; use one of {', '.join(STORAGE_DTYPES)} (or bf16, fp16, fp32)"
        )
    return key


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class PackedTensor:
    """A key or value tensor held at a storage precision: ``data`` in that dtype and, for int8 only, the float32
    ``scale`` (broadcastable to ``data``) that ``data`` is multiplied by."""

    data: torch.Tensor
    scale: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held, scales included."""
        held = self.data.numel() * self.data.element_size()
        return held + (self.scale.numel() * self.scale.element_size() if self.scale is not None else 0)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def unpack(self, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
        """The tensor in ``dtype`` (on ``device``, default where it is held)."""
        data = self.data if device is None else self.data.to(device)
        if self.scale is None:
            return data.to(dtype)
        scale = self.scale.to(data.device)
        return (data.float() * scale).to(dtype)

    def to(self, device: torch.device | str) -> PackedTensor:
        return PackedTensor(self.data.to(device), None if self.scale is None else self.scale.to(device))


def _pack(tensor: torch.Tensor, storage: str, reduce_dim: int, what: str) -> PackedTensor:
    storage = storage_name(storage)
    tensor = tensor.detach()
    if storage != "int8":
        dtype = STORAGE_DTYPES[storage]
        if tensor.dtype == dtype:
            return PackedTensor(tensor)
        if tensor.numel() and dtype == torch.float16:
            largest = float(tensor.abs().max())
            if largest > torch.finfo(torch.float16).max:
                raise PrecisionRangeError(
                    f"{what} reach {largest:.3g}, beyond float16's range ({torch.finfo(torch.float16).max:.0f}); "
                    "store this memory as bfloat16 or int8"
                )
        return PackedTensor(tensor.to(dtype))
    x = tensor.float()
    peak = x.abs().amax(dim=reduce_dim, keepdim=True) if x.numel() else x.sum(dim=reduce_dim, keepdim=True)
    # an all-zero channel gets scale 1, so it packs to zeros instead of dividing by zero; so does one whose peak is
    # so small (subnormal) that peak / 127 rounds to 0, which a file would record as a damaged scale
    scale = peak / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return PackedTensor(q, scale)


def pack_keys(keys: torch.Tensor, storage: str) -> PackedTensor:
    """``keys`` ``[batch, kv_heads, slots, head_dim]`` at ``storage`` precision.

    int8: one scale per (sequence, kv-head, head_dim channel), shared by all slots of a layer. Keys have
    *outlier channels*: a few head_dim channels are far larger than the rest in nearly every token (KIVI,
    KVQuant). A scale per token would be set by those channels and round the small ones to zero; a scale per
    channel gives each channel the resolution of its own range.
    """
    return _pack(keys, storage, reduce_dim=-2, what="keys")


def pack_values(values: torch.Tensor, storage: str) -> PackedTensor:
    """``values`` ``[batch, kv_heads, slots, head_dim]`` at ``storage`` precision.

    int8: one scale per (sequence, kv-head, slot), shared by the head_dim channels of that slot. Values have no
    fixed outlier channels, and attention mixes whole value vectors, so the error of the output is bounded by
    each slot's own error; a slot with large values (a CCM-merge average, the attention sink) then costs no
    precision to the others.
    """
    return _pack(values, storage, reduce_dim=-1, what="values")


def scale_shapes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The int8 scale shapes of keys and of values shaped ``shape`` (``[batch, kv_heads, slots, head_dim]``)."""
    batch, heads, slots, dim = shape
    return (batch, heads, 1, dim), (batch, heads, slots, 1)
