"""Flags or keywords: one message text for the shell and for Python.

Messages are written once, naming the command line's flags (``--num-classes``). A Python caller
passed keywords, so the public functions (``surgery.adapt``, ``train``, ``evaluate``, ``predict``)
rewrite the flags of their own parameters as keywords (``num_classes``), unless the CLI is the
caller: it runs every command inside :func:`cli_names`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import re
from typing import Any, Callable, Iterator, Mapping

from .errors import SurgeryError

_IN_CLI: contextvars.ContextVar[bool] = contextvars.ContextVar("surgery_in_cli", default=False)
# a command line a message quotes: in backticks, or from `surgery COMMAND` to the clause's end
_COMMAND_LINE = re.compile(r"`[^`]*`|\bsurgery (?:inspect|remap|adapt|advise|train|evaluate|predict|export|diff|demo|"
                           r"trust)\b[^;()]*")
_FLAG = re.compile(r"(?<![\w.-])(?P<no>\bno )?--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)"
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
        if not _flag_start(m):
            return m.group(0)
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


def _flag_start(m: re.Match) -> bool:
    """Whether ``--`` begins a flag: not inside a word or a path (``a/--b``), but after another
    flag's slash (``--mixup/--cutmix``)."""
    before = m.string[:m.start()]
    if not before.endswith("/"):
        return True
    word = before[:-1].split()[-1] if before[:-1].split() else ""
    return word.startswith("--") or bool(re.fullmatch(r"[a-z_]+(=\S*)?", word))


def _takes_bool(param: inspect.Parameter) -> bool:
    """Whether a bare ``--flag`` is ``flag=True``: a bool default (``force=False``), or a bool among
    the types of a None default (``resume: bool | str | None``); ``augment="light"`` is not."""
    if isinstance(param.default, bool):
        return True
    return param.default is None and "bool" in str(param.annotation).split(" | ")


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
