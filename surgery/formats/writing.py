"""What a format's writer is given: the tensors to store and the file's metadata.

Every writer in the registry (``Format.writer``) is ``writer(dst, payload) -> [files written]``
and writes through a temp file or folder beside ``dst``, renamed into place only once complete.
Each format takes what it stores: safetensors streams ``entries`` (bytes copied from their
source ranges), a torch file saves ``state_dict()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..checkpoint import dense_nbytes, read_range, torch_dtype, torch_shape

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass
class Entry:
    """One tensor to write: its bytes come from a file range or from a function."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: tuple[str, int, int] | Callable[[], bytes]

    @property
    def nbytes(self) -> int:
        return dense_nbytes(self.dtype, self.shape)

    def tensor(self) -> "torch.Tensor":
        """The entry as a tensor, from its bytes (for formats that save tensors)."""
        import torch

        data = self.source() if callable(self.source) else read_range(*self.source)
        if len(data) == 0:
            return torch.empty(torch_shape(self.dtype, self.shape), dtype=torch_dtype(self.dtype))
        buf = data if isinstance(data, bytearray) else bytearray(data)
        return torch.frombuffer(buf, dtype=torch_dtype(self.dtype)).reshape(torch_shape(self.dtype, self.shape))


def _nothing() -> dict[str, str]:
    return {}


@dataclass
class Payload:
    entries: list[Entry]  # tensors stored once, in order
    names: list[str]  # every name written, in order: the stored ones and their aliases
    aliases: dict[str, str]  # tied names: alias -> the stored name whose bytes it shares
    metadata: dict[str, str]  # the file's own metadata (a safetensors header's __metadata__)
    state_dict: Callable[[], dict[str, Any]]  # every name -> tensor, for formats that save tensors
    shard_bytes: int = 5 * 10**9  # a sharded format's largest shard
    index_metadata: dict[str, str] = field(default_factory=dict)  # a sharded format's index, besides its total_size
    keep: list[str] = field(default_factory=list)  # a folder rewritten in place: its entries that stay
    # Called once the tensors are written, before the rename: placeholder -> final value, for
    # metadata values known only then (a hash computed while the bytes were copied). A
    # placeholder is replaced in place, so the final value must be as long.
    finish: Callable[[], dict[str, str]] = _nothing
