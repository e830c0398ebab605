"""What the converters share: the drop marker, the error that drops a value, the path of a value."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..formats.torch_records import _Sealed

DROP: Any = object()  # a value with no weights-only form: left out of its container


class Unsupported(ValueError):
    """A value that has no weights-only form: the message says why, for the dropped list."""


def label(path: str, key: Any) -> str:
    """``path.key`` (a key that is not a string as its repr); lists add ``[i]`` themselves."""
    part = key if isinstance(key, str) else repr(key)
    return part if not path else f"{path}.{part}"


@dataclass(frozen=True)
class Device(_Sealed):
    """``torch.device(...)`` as a record, so that DST holds a torch.device again, not its name."""

    name: str
