"""Where each tensor's bytes are: a `TensorInfo` from a tensor record and the offsets of the
storages it views, checked to lie inside its storage. Shared by every pickle-based format."""

from __future__ import annotations

import dataclasses
import math

from ..checkpoint import PACKED_DTYPES, TensorInfo, contiguous_stride, itemsize
from ..errors import FormatError
from .torch_records import TensorRef


def tensor_infos(refs: dict[str, TensorRef], offsets: dict[str, tuple[int, int]], file: str, src: str) -> dict[str, TensorInfo]:
    out = {}
    dense = TensorInfo.dense
    # (shape, stride, dtype) -> (last element's distance from the first or -1 if none, item size)
    spans: dict[tuple, tuple[int, int]] = {}
    for name, t in refs.items():
        if t.kind != "dense":  # quantized, sparse, nested, meta: built from parts
            out[name] = tensor_info(name, t, offsets, file, src)
            continue
        s = t.storage
        start, nbytes = offsets[s.key]
        key = (t.shape, t.stride, t.dtype)
        lay = spans.get(key)
        if lay is None:
            lay = spans[key] = (-1 if 0 in t.shape else sum((n - 1) * st for n, st in zip(t.shape, t.stride)),
                                itemsize(t.dtype))
        span, size = lay
        if span >= 0 and (t.storage_offset + span + 1) * size > nbytes:
            _check_extent(name, t, nbytes, src)  # raises, with the tensor named
        out[name] = dense(name, t.dtype, t.shape, file, start, nbytes, t.storage_offset, t.stride, s.key, s.location)
    return out


def _check_extent(name: str, t: TensorRef, storage_bytes: int, src: str) -> None:
    last = t.storage_offset
    for n, st in zip(t.shape, t.stride):
        if n == 0:
            return
        last += (n - 1) * st
    if (last + 1) * itemsize(t.dtype) > storage_bytes:
        raise FormatError(f"{src}: tensor {name!r} {list(t.shape)} reaches past the end of its storage "
                          f"({storage_bytes} bytes); the file is corrupt")


def tensor_info(name: str, t: TensorRef, offsets: dict[str, tuple[int, int]], file: str, src: str) -> TensorInfo:
    """The `TensorInfo` of a quantized, sparse, nested or meta tensor record: its parts located
    like any dense tensor, its quantizer and flags kept as they are."""
    if any(p.kind != "dense" for p in t.parts.values()):
        raise FormatError(f"{src}: tensor {name!r} ({t.kind}) is built from tensors that are not plain ones")
    located = tensor_infos({f"{name}.{k}": p for k, p in t.parts.items()}, offsets, file, src)
    parts = {k: located[f"{name}.{k}"] for k in t.parts}
    if t.kind == "quantized":
        # a packed dtype (quint4x2: two values a byte) is checked as the bytes its values fill
        pack = PACKED_DTYPES.get(t.dtype, 1)
        shape = (-(-math.prod(t.shape) // pack),) if pack > 1 else t.shape
        plain = TensorRef(t.storage, t.storage_offset, shape, contiguous_stride(shape) if pack > 1 else t.stride, t.dtype)
        info = dataclasses.replace(tensor_infos({name: plain}, offsets, file, src)[name], shape=t.shape, stride=t.stride)
        return dataclasses.replace(info, kind=t.kind, parts=parts, params=dict(t.params))
    device = parts["values"].device if "values" in parts else parts["buffer"].device if "buffer" in parts else "meta"
    return TensorInfo(name=name, dtype=t.dtype, shape=t.shape, file=file, data_offset=0, storage_nbytes=0,
                      stride=t.stride, device=device, kind=t.kind, parts=parts, params=dict(t.params))
