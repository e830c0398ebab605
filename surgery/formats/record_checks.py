"""Checks of the tensor records once the pickle is done: every size, stride, offset and byte
count within what torch itself accepts, and every tensor inside its storage."""

from __future__ import annotations

from typing import Any

from ..checkpoint import DTYPES, PACKED_DTYPES, itemsize
from ..errors import FormatError
from .torch_records import MAX_INT64, MAX_LOGICAL, MAX_NAME, MAX_RANK, Opaque, StorageRef, TensorRef

def _int64(x: Any) -> bool:
    return type(x) is int and 0 <= x <= MAX_INT64


def _storage_problem(s: StorageRef) -> str | None:
    if s.dtype not in DTYPES:
        return f"storage {str(s.key)[:60]!r} has unknown dtype {str(s.dtype)[:30]!r}"
    if not (isinstance(s.key, str) and len(s.key) <= MAX_NAME and isinstance(s.location, str) and len(s.location) <= MAX_NAME):
        return "storage record has a malformed key or location"
    if not _int64(s.numel) or s.numel * itemsize(s.dtype) > MAX_INT64:
        return f"storage {s.key[:60]!r} declares an impossible size"
    return None


def _storage_problems(storages: dict[str, StorageRef]) -> list[str]:
    """`_storage_problem` of each storage; one whose fields are plainly sound (what torch.save
    writes, once per tensor) is passed in one line, any other goes through it (which words the error)."""
    out = []
    for s in storages.values():
        key, loc, numel, entry = s.key, s.location, s.numel, DTYPES.get(s.dtype) if type(s.dtype) is str else None
        if (entry is not None and type(key) is str and type(loc) is str and type(numel) is int and len(key) <= MAX_NAME
                and len(loc) <= MAX_NAME and 0 <= numel and numel * entry[0] <= MAX_INT64):
            continue
        problem = _storage_problem(s)
        if problem:
            out.append(problem)
    return out


def _int64s(values: tuple) -> bool:
    for x in values:
        if type(x) is not int or not 0 <= x <= MAX_INT64:
            return False
    return True


_FIELDS = ("shape", "stride", "storage_offset", "dtype", "kind", "parts")


def _shape_problem(t: TensorRef) -> str | None:
    # a TensorRef itself always has its fields (BUILD cannot reach it); a legacy one is filled by BUILD
    if type(t) is not TensorRef and not all(hasattr(t, a) for a in _FIELDS):
        return "tensor record is incomplete (a legacy tensor never given its state)"
    shape, stride = t.shape, t.stride
    if not (type(shape) is tuple and type(stride) is tuple and len(shape) == len(stride) <= MAX_RANK):
        return "tensor record's size and stride are not two tuples of one rank (at most 64)"
    if not (_int64s(shape) and _int64s(stride) and _int64(t.storage_offset)):
        return "tensor record has a size, stride or offset outside 0..2**63-1"
    if t.dtype not in DTYPES:
        return f"tensor has unknown dtype {str(t.dtype)[:30]!r}"
    # a tensor with bytes fits int64 as torch counts them; one without (meta, the logical shape of
    # a sparse or nested one) is only kept far below the float range that sums and reports use
    limit = MAX_INT64 if t.storage is not None else MAX_LOGICAL
    numel = 1
    for n in shape:
        numel *= n
        if numel > limit:
            return f"tensor's {len(shape)} dimensions hold more than {'2**63' if limit == MAX_INT64 else '2**256'} elements"
    if t.storage is not None and numel * itemsize(t.dtype) > MAX_INT64:
        return "tensor holds more than 2**63 bytes"
    return None


def _tensor_problem(t: TensorRef, storages: dict[str, StorageRef]) -> str | None:
    problem = _shape_problem(t)
    if problem:
        return problem
    s = t.storage
    if s is None:  # sparse, nested, meta: their parts (indices, values, ...) have the storages
        if t.kind == "dense":
            return "dense tensor record has no storage"
        for part in t.parts.values():
            problem = _tensor_problem(part, storages) if isinstance(part, TensorRef) else "tensor part is not a tensor"
            if problem:
                return problem
        return None
    if not isinstance(s, StorageRef) or storages.get(s.key) is not s:
        return "tensor record points at a storage the checkpoint does not declare"
    if 0 in t.shape:
        return None
    last = t.storage_offset + sum((n - 1) * st for n, st in zip(t.shape, t.stride))
    per_byte = PACKED_DTYPES.get(t.dtype, 0)
    need = -(-(last + 1) // per_byte) if per_byte else (last + 1) * itemsize(t.dtype)
    if need > s.numel * itemsize(s.dtype):
        return (f"tensor {list(t.shape)} (offset {t.storage_offset}, stride {list(t.stride)}) reaches past the end of its "
                f"storage {s.key[:60]!r} ({s.numel} elements)")
    return None


def _records(obj: Any) -> list[TensorRef]:
    """Every tensor record reachable from the unpickled object, each once."""
    return reachable(obj, TensorRef)


def reachable(obj: Any, kind: type) -> list[Any]:
    """Every ``kind`` instance reachable from ``obj`` through containers and inert records, each
    once (a loop: no recursion)."""
    out: list[Any] = []
    seen: set[int] = set()
    stack = [obj]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen or isinstance(x, (str, bytes, int, float)):
            continue
        seen.add(id(x))
        if isinstance(x, kind):
            out.append(x)
        elif isinstance(x, dict):
            for v in x.values():  # a state dict's values, taken here: one loop step per tensor, not three
                if type(v) is kind:
                    if id(v) not in seen:
                        seen.add(id(v))
                        out.append(v)
                else:
                    stack.append(v)
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)
        elif isinstance(x, Opaque):
            stack.extend((x.state, x.args, x.kwargs, x.__dict__.get("_items", ())))
    return out


def check_records(tensors: list[TensorRef], storages: dict[str, StorageRef], source: str) -> None:
    """Validate the final tensor and storage records in one pass, after the pickle is done (so
    nothing a later opcode changed escapes): dtypes known, sizes, strides and offsets in int64,
    rank at most MAX_RANK, every view inside its storage; parts of sparse, nested and quantized
    tensors likewise. Raises one FormatError for all."""
    problems = _storage_problems(storages)
    if not problems:
        problems = _tensor_problems(tensors, storages)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise FormatError(f"{source}: {'; '.join(problems[:3])}{more}; the file is corrupt or crafted")


def _tensor_problems(tensors: list[TensorRef], storages: dict[str, StorageRef]) -> list[str]:
    """`_tensor_problem` of each tensor. A model repeats a few (shape, stride, dtype) layouts
    many times: each layout is checked once, and a dense tensor of a sound layout then needs only
    its offset and its storage checked here; any other tensor, and any problem, goes through
    `_tensor_problem` itself (which words the error)."""
    layouts: dict[tuple, tuple[bool, int, int, int]] = {}
    sizes: dict[str, int] = {}  # storage key -> bytes (storages are checked already)
    out: list[str] = []
    for t in tensors:
        s = t.storage
        if type(t) is TensorRef and type(s) is StorageRef and type(t.shape) is tuple and type(t.stride) is tuple \
                and type(t.dtype) is str:
            key = (t.shape, t.stride, t.dtype)
            lay = layouts.get(key)
            if lay is None:
                lay = layouts[key] = _layout(t)
            sound, span, per_byte, size = lay
            off = t.storage_offset
            if sound and type(off) is int and 0 <= off <= MAX_INT64 and storages.get(s.key) is s:
                if span < 0:
                    continue
                last = off + span
                need = -(-(last + 1) // per_byte) if per_byte else (last + 1) * size
                have = sizes.get(s.key)
                if have is None:
                    have = sizes[s.key] = s.numel * itemsize(s.dtype)
                if need <= have:
                    continue
        problem = _tensor_problem(t, storages)
        if problem:
            out.append(problem)
    return out


def _layout(t: TensorRef) -> tuple[bool, int, int, int]:
    """(sound, span, values per byte or 0, item size) of a dense tensor's shape, stride and dtype:
    sound when `_shape_problem` finds nothing in them; span is the last element's distance from
    the first (-1 for a tensor with no elements)."""
    if _shape_problem(TensorRef(t.storage, 0, t.shape, t.stride, t.dtype)) is not None:
        return False, -1, 0, 0
    span = -1 if 0 in t.shape else sum((n - 1) * st for n, st in zip(t.shape, t.stride))
    return True, span, PACKED_DTYPES.get(t.dtype, 0), itemsize(t.dtype)
