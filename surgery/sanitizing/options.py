"""``sanitize``'s options, each declared once with its flag (:mod:`surgery.option_table`).

Kept apart from the reading and writing code so that ``surgery sanitize``'s flags cost no import of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..option_table import shared


@dataclass(frozen=True)
class SanitizeOptions:
    """How ``sanitize`` writes: the shared flags of a command that writes one file."""

    verify: bool = shared("verify", False)
    force: bool = shared("force", False)
    allow_globals: tuple[str, ...] = shared("allow_globals", ())

    @classmethod
    def from_keywords(cls, **keywords: object) -> "SanitizeOptions":
        return cls(**dict(keywords, allow_globals=tuple(keywords.get("allow_globals") or ())))
