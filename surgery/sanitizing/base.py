"""What the converters share: the drop marker, the error that drops a value, the path of a value."""

from __future__ import annotations

from typing import Any

DROP: Any = object()  # a value with no weights-only form: left out of its container


class Unsupported(ValueError):
    """A value that has no weights-only form: the message says why, for the dropped list."""


def label(path: str, key: Any) -> str:
    """``path.key`` (a key that is not a string as its repr); lists add ``[i]`` themselves."""
    part = key if isinstance(key, str) else repr(key)
    return part if not path else f"{path}.{part}"
