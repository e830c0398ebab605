"""The converted object with real tensors, saved by torch.save, and the re-read that checks it.

Each storage of SRC is read once and every dense tensor viewing it is set on it, so tensors that
shared a storage still do; other kinds (quantized, sparse, nested, meta) are rebuilt by the one
`materialize` every command uses. ``verify`` re-reads DST with ``torch.load(weights_only=True)``
and compares each tensor bit for bit with a fresh read of SRC's bytes, not with what was written.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

from ..checkpoint import materialize, read_range, torch_dtype
from ..errors import FormatError
from ..formats.locate import tensor_infos
from ..formats.torch_records import DType, TensorRef
from .base import Device, label
from .numpy_records import ArrayData
from .read import Source


class Builder:
    """Placeholders (tensor records, numpy arrays, dtypes) made into torch objects, each once."""

    def __init__(self, source: Source):
        self.source = source
        self.storages: dict[str, Any] = {}
        self.memo: dict[int, Any] = {}
        self.expected: dict[str, Callable[[], Any]] = {}  # path -> the tensor SRC holds there, read afresh

    def build(self, x: Any, path: str = "") -> Any:
        if id(x) in self.memo and not isinstance(x, (TensorRef, ArrayData)):
            return self.memo[id(x)]
        out = self._build(x, path)
        self.memo[id(x)] = out
        return out

    def _build(self, x: Any, path: str) -> Any:
        if isinstance(x, TensorRef):
            self.expected[path] = lambda: materialize(self._info(x, path))
            return self.memo[id(x)] if id(x) in self.memo else self._tensor(x, path)
        if isinstance(x, ArrayData):
            self.expected[path] = lambda: array_tensor(x)
            return self.memo[id(x)] if id(x) in self.memo else array_tensor(x)
        if isinstance(x, DType):
            return torch_dtype(x.dtype)
        if isinstance(x, Device):
            import torch

            return torch.device(x.name)
        if isinstance(x, dict):
            out = type(x)() if type(x) in (dict, collections.OrderedDict, collections.Counter) else dict()
            self.memo[id(x)] = out
            out.update({k: self.build(v, label(path, k)) for k, v in x.items()})
            if "_metadata" in getattr(x, "__dict__", {}):
                out._metadata = x._metadata
            return out
        if isinstance(x, list):
            out = self.memo[id(x)] = []  # before its items: a list may hold itself
            out.extend(self.build(v, f"{path}[{i}]") for i, v in enumerate(x))
            return out
        if isinstance(x, tuple):
            return tuple(self.build(v, f"{path}[{i}]") for i, v in enumerate(x))
        if isinstance(x, set):
            return {self.build(v, path) for v in x}
        return x

    def _info(self, ref: TensorRef, path: str) -> Any:
        s = self.source
        return tensor_infos({path: ref}, s.offsets, str(s.path), str(s.path))[path]

    def _tensor(self, ref: TensorRef, path: str) -> Any:
        import torch

        info = self._info(ref, path)  # checks the view lies inside its storage
        if info.kind != "dense":
            return materialize(info)
        key = ref.storage.key
        if key not in self.storages:
            start, nbytes = self.source.offsets[key]
            raw = read_range(str(self.source.path), start, start + nbytes)
            self.storages[key] = torch.frombuffer(raw, dtype=torch.uint8).untyped_storage() if nbytes else \
                torch.UntypedStorage(0)
        t = torch.empty(0, dtype=torch_dtype(ref.dtype))
        t.set_(self.storages[key], ref.storage_offset, ref.shape, ref.stride)
        if ref.requires_grad and (t.is_floating_point() or t.is_complex()):
            t.requires_grad_(True)
        return t


def array_tensor(a: ArrayData) -> Any:
    """A numpy array's values as a tensor of its dtype, C order, little-endian."""
    import torch

    dt = torch_dtype(a.dtype)
    raw = torch.frombuffer(bytearray(a.data), dtype=torch.uint8) if a.data else torch.empty(0, dtype=torch.uint8)
    if a.swap:
        raw = raw.reshape(-1, a.swap).flip(1).reshape(-1)
    t = raw.view(dt) if raw.numel() else torch.empty(0, dtype=dt)
    if a.fortran:
        return t.reshape(a.shape[::-1]).permute(*reversed(range(len(a.shape)))).contiguous()
    return t.reshape(a.shape).clone()


def save(obj: Any, path: Any) -> None:
    import torch

    try:
        torch.save(obj, path)
    except RuntimeError as e:  # torch reports a failed write (a full disk) as RuntimeError
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise OSError(f"torch.save could not finish writing ({first}); is the disk full?") from None


def verify(path: Any, expected: dict[str, Callable[[], Any]], shown: str) -> int:
    """Re-read ``path`` with ``torch.load(weights_only=True)`` (which runs no pickled code) and
    compare every tensor with SRC's bytes. Returns how many were compared."""
    import torch

    try:
        loaded = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # any refusal by torch is the failure --verify exists to catch
        raise FormatError(f"{shown}: --verify: torch.load(weights_only=True) refuses the output "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); nothing was written") from None
    found = tensors_by_path(loaded)
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    bad = [p for p in sorted(set(expected) & set(found)) if not same_bits(found[p], expected[p]())]
    if missing or extra or bad:
        what = "; ".join(f"{n} {', '.join(ps[:3])}" for n, ps in (("missing", missing), ("unexpected", extra),
                                                                  ("different", bad)) if ps)
        raise FormatError(f"{shown}: --verify: the output's tensors differ from the source's ({what}); nothing was written")
    return len(found)


def tensors_by_path(obj: Any) -> dict[str, Any]:
    """Every tensor of a loaded object by its path, as `Builder` names them (each container once)."""
    import torch

    out: dict[str, Any] = {}
    seen: set[int] = set()
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:
        x, path = stack.pop()
        if isinstance(x, torch.Tensor):
            out[path] = x
        elif isinstance(x, (dict, list, tuple)) and id(x) not in seen:
            seen.add(id(x))
            items = x.items() if isinstance(x, dict) else enumerate(x)
            # pushed last-first: popped in the order Builder walks, so a shared container has the same path
            stack.extend(reversed([(v, label(path, k) if isinstance(x, dict) else f"{path}[{k}]") for k, v in items]))
    return out


def same_bits(a: Any, b: Any) -> bool:
    """Same dtype, shape, layout and bytes (NaN payloads and -0.0 included)."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape or a.layout != b.layout or a.is_quantized != b.is_quantized:
        return False
    if a.device.type == "meta" or b.device.type == "meta":
        return a.device == b.device
    if a.is_quantized:
        return a.qscheme() == b.qscheme() and same_bits(a.int_repr(), b.int_repr()) and \
            same_bits(*(x.q_per_channel_scales() if a.qscheme() != torch.per_tensor_affine else
                        torch.tensor(x.q_scale()) for x in (a, b)))
    if a.layout != torch.strided:
        return same_bits(a.to_dense(), b.to_dense())
    if a.is_nested:
        return all(same_bits(x, y) for x, y in zip(a.unbind(), b.unbind()))
    return torch.equal(_bytes(a), _bytes(b))


def _bytes(t: Any) -> Any:
    import torch

    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.element_size() > 0 and flat.numel() else torch.empty(0, dtype=torch.uint8)
