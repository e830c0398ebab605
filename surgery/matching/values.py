"""Tensor values compared bit for bit: a digest of each tensor's bytes (and of its dims in another
order, on demand) ranks the candidates; the bytes themselves confirm every pair taken."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from ..checkpoint import tensor_bytes

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .sides import Side


class Values:
    """Digests of the tensors of sides A and B, read once each, kept small."""

    def __init__(self, a: "Side", b: "Side"):
        self.sides = {"a": a, "b": b}
        self.digests: dict[tuple[str, str, tuple[int, ...] | None], bytes] = {}

    def comparable(self, a: str, b: str) -> bool:
        sa, sb = self.sides["a"], self.sides["b"]
        return a in sa.readable and b in sb.readable and sa.dtypes[a] == sb.dtypes[b]

    def digest(self, side: str, key: str, dims: tuple[int, ...] | None = None) -> bytes:
        k = (side, key, dims)
        if k not in self.digests:
            self.digests[k] = hashlib.blake2b(tensor_bytes(self._read(side, key, dims)), digest_size=16).digest()
        return self.digests[k]

    def same_digest(self, a: str, b: str, dims: tuple[int, ...] | None) -> bool:
        """Whether A's ``a`` (its dims in the order ``dims``) has B's ``b``'s digest: a candidate."""
        return self.digest("a", a, dims) == self.digest("b", b)

    def identical(self, a: str, b: str, dims: tuple[int, ...] | None) -> bool:
        """Whether A's ``a`` (dims in the order ``dims``) is B's ``b`` bit for bit: for a pair taken."""
        return tensor_bytes(self._read("a", a, dims)) == tensor_bytes(self._read("b", b, None))

    def _read(self, side: str, key: str, dims: tuple[int, ...] | None) -> "torch.Tensor":
        t = self.sides[side].get(key)  # type: ignore[misc]
        return t if dims is None else t.permute(*dims)
