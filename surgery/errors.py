"""The one error family a user can meet.

Every message says what is wrong, where (file or key), and what to do about it. The CLI maps any
SurgeryError to exit code 2 and prints its message on one line; anything else is a bug.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import re
from typing import Any, Callable, Iterator, Mapping


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
    """A pickle that needs globals outside the allowlist; nothing of it was run.

    ``--allow-global`` is suggested only where accepting the names as inert records still gives
    the tensors: ``names`` may carry ``builds_tensors`` (globals that build tensor data by running
    code) and ``tensors_found`` (whether any tensor is left with every name accepted).
    """

    def __init__(self, path: str, names: list[str]):
        self.path = path
        builds = sorted(set(getattr(names, "builds_tensors", ())))
        found = getattr(names, "tensors_found", True)
        self.names = sorted(set(names))
        if builds:
            others = [n for n in self.names if n not in builds]
            also = f" (it also needs {_listed(others)})" if others else ""
            what = (f"its tensors are built by code: {_listed(builds)}{also}. Nothing was executed. surgery never runs "
                    f"such code, and accepting these names as data would lose those tensors; load the file with torch "
                    f"where you trust it and save model.state_dict()")
        elif not found:
            what = (f"the checkpoint needs globals that are not on the weights-only allowlist: {_listed(self.names)}, "
                    f"and even accepted as opaque data they leave no tensor surgery can read. Nothing was executed")
        elif any(n.startswith("torch.nn.modules.") for n in self.names):
            # torch.save(model): many classes; one pattern per package reads the weights
            packages = sorted({n.split(".")[0] for n in self.names})
            allow = " ".join(f"--allow-global '{p}.*'" for p in packages)
            what = (f"this is a whole pickled model (torch.save(model)), which needs its classes: "
                    f"{_listed(self.names)}. Nothing was executed. "
                    f"To read its weights without running its code, accept the classes as opaque data with {allow}")
        else:
            allow = " ".join(f"--allow-global {n}" for n in self.names)
            what = (f"the checkpoint needs globals that are not on the weights-only allowlist: "
                    f"{', '.join(self.names)}. Nothing was executed. If you trust the file, accept them as "
                    f"opaque data with {allow}")
        super().__init__(f"{path}: refusing to unpickle: {what} (surgery never imports or calls them)")


def _listed(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" ... ({len(names)} in all)" if len(names) > 4 else "")


class SelectError(SurgeryError):
    """--select names no container in the checkpoint."""


class RuleError(SurgeryError):
    """A remap rule that cannot be applied: bad regex, bad rules file, colliding names."""


class OutputError(SurgeryError):
    """A destination that cannot or must not be written."""


# ----------------------------------------------------------------------------- training (surgery.trainer)

class DataError(SurgeryError):
    """The training data cannot be used as given: missing, empty, malformed or inconsistent."""


class TrainError(SurgeryError):
    """A training run that cannot start or continue as asked."""


class ResumeError(TrainError):
    """A checkpoint that is missing, unreadable, or belongs to another model or dataset."""


class TrainInterrupted(TrainError):
    """Ctrl-C or SIGTERM: the state of the last finished epoch is in last.pt."""

    exit_code = 130


# ----------------------------------------------------------------------------- adapt

class AdaptError(SurgeryError):
    """An adaptation that cannot be done as asked: bad option, unknown arch, unloadable checkpoint."""


class ArchError(AdaptError):
    """ARCH names no model surgery can build (unknown name, factory that fails to import or run)."""


class TrustError(ArchError):
    """A folder's manifest names code (a factory) and the caller did not pass trust_code."""


class AlignError(AdaptError):
    """The checkpoint's keys cannot be matched to the model unambiguously, or match almost nothing."""


class ManifestError(AdaptError):
    """A manifest.json that is missing, of another schema version, or inconsistent with its weights."""


# ----------------------------------------------------------------------------- flags or keywords

# Messages are written once, naming the command line's flags (``--num-classes``). A Python caller
# passed keywords, so the public functions (``surgery.adapt``, ``train``, ``evaluate``, ``predict``)
# rewrite the flags of their own parameters as keywords (``num_classes``), unless the CLI is the
# caller: it runs every command inside :func:`cli_names`.
_IN_CLI: contextvars.ContextVar[bool] = contextvars.ContextVar("surgery_in_cli", default=False)
# a command line a message quotes: in backticks, or from `surgery COMMAND` to the clause's end
_COMMAND_LINE = re.compile(r"`[^`]*`|\bsurgery (?:inspect|remap|adapt|advise|train|evaluate|predict|export|diff|demo|"
                           r"trust)\b[^;()]*")
_FLAG = re.compile(r"(?<![\w/.-])(?P<no>\bno )?--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)"
                   r"(?: ('[^']*'|\"[^\"]*\"|-?\d[\w.+-]*|[A-Z][A-Z_]*)(?![\w-]))?")


@contextlib.contextmanager
def cli_names() -> Iterator[None]:
    """While the CLI runs a command, errors name its flags, as the user typed them."""
    token = _IN_CLI.set(True)
    try:
        yield
    finally:
        _IN_CLI.reset(token)


def keyword_text(text: str, params: Mapping[str, inspect.Parameter]) -> str:
    """``text`` with each ``--flag [VALUE]`` that names one of ``params`` written as the keyword
    (``flag=VALUE``; a boolean flag ``flag=True``, ``--no-flag`` ``flag=False``); other flags, and
    the command lines a message quotes (``continue with: surgery train ...``), as they are.

    >>> import inspect
    >>> keyword_text("--num-classes 0; pass --force", inspect.signature(lambda num_classes, force=False: 0).parameters)
    'num_classes=0; pass force=True'
    """
    def keyword(m: re.Match) -> str:
        name, value = m.group(2).replace("-", "_"), m.group(3)
        if m.group("no") and name in params and _takes_bool(params[name]):  # "no --balanced-sampler"
            return f"{name}=False" + (f" {value}" if value else "")
        if m.group("no"):
            return "no " + keyword_flag(m, name, value)
        return keyword_flag(m, name, value)

    def keyword_flag(m: re.Match, name: str, value: str | None) -> str:
        if name not in params and name + "s" in params:  # --allow-global: allow_globals
            name += "s"
        if name not in params and name.startswith("no_") and name[3:] in params:  # --no-flip: flip=False
            return f"{name[3:]}=False" + (f" {value}" if value else "")
        if name not in params:
            return m.group(0)[len(m.group("no") or ""):]
        if value is None:
            return f"{name}=True" if _takes_bool(params[name]) else name
        return f"{name}={value}"

    parts, last = [], 0
    for line in _COMMAND_LINE.finditer(text):
        parts += [_FLAG.sub(keyword, text[last:line.start()]), line.group(0)]
        last = line.end()
    parts.append(_FLAG.sub(keyword, text[last:]))
    return re.sub(r"(\S+) \(\1 in Python\)", r"\1", "".join(parts))  # "trust_code=True (trust_code=True in Python)"


def _takes_bool(param: inspect.Parameter) -> bool:
    """Whether a bare ``--flag`` is ``flag=True`` (``force: bool``, ``resume: bool | str | None``)."""
    return isinstance(param.default, bool) or "bool" in str(param.annotation).split(" | ")


def keyword_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` for Python callers: its SurgeryErrors name ``fn``'s keywords where they name flags."""
    params = inspect.signature(fn).parameters

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SurgeryError as e:
            if not _IN_CLI.get() and e.args and isinstance(e.args[0], str):
                e.args = (keyword_text(e.args[0], params), *e.args[1:])
            raise

    return wrapper
