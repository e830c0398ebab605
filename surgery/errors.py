"""The one error family a user can meet.

Every message says what is wrong, where (file or key), and what to do about it. The CLI maps any
SurgeryError to exit code 2 and prints its message on one line; anything else is a bug.
"""

from __future__ import annotations


class SurgeryError(Exception):
    """Base class: bad input or a refused operation, never a bug in surgery itself."""

    exit_code = 2

    def one_line(self) -> str:
        return " ".join(str(self).split())


class InputError(SurgeryError):
    """A path that does not exist, is empty, or is the wrong kind of thing."""


class FormatError(SurgeryError):
    """Bytes that do not form a checkpoint of the format they claim to be."""


class UnsafeCheckpointError(SurgeryError):
    """A pickle that needs globals outside the allowlist; nothing of it was run."""

    def __init__(self, path: str, names: list[str]):
        self.path = path
        self.names = sorted(set(names))
        allow = " ".join(f"--allow-global {n}" for n in self.names)
        super().__init__(
            f"{path}: refusing to unpickle: the checkpoint needs globals that are not on the "
            f"weights-only allowlist: {', '.join(self.names)}. Nothing was executed. If you trust "
            f"the file, accept them as opaque data with {allow} (surgery never imports or calls them)"
        )


class SelectError(SurgeryError):
    """--select names no container in the checkpoint."""


class RuleError(SurgeryError):
    """A remap rule that cannot be applied: bad regex, bad rules file, colliding names."""


class OutputError(SurgeryError):
    """A destination that cannot or must not be written."""
