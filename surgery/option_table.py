"""Each option of adapt, train and remap declared once: a dataclass field that carries its flag.

:class:`surgery.trainer.options.TrainOptions`, :class:`surgery.adapter.options.AdaptOptions` (with
the :class:`surgery.adapter.freeze.FreezeOptions` inside it) and
:class:`surgery.remapping.options.RemapOptions` declare their fields with
:func:`option` (type, default, help, metavar, how the command line spells it); their checks live
beside them. From that one table:

- the CLI builds the command's options (``cli/common.py``: ``with_options``, ``option_values``);
- ``surgery.adapt`` / ``surgery.train`` take the options object, or keywords checked against the
  same fields (:func:`options_from`), and show them in their signature (:func:`signature`);
- errors name the flag from the shell and the keyword from Python (:mod:`surgery.flag_names`).

A field without a flag (``rules``, ``class_names``) is for Python callers only. A few flags are shared
by several commands and declared once here (:data:`SHARED`), whether an options table holds them or
a command takes them itself.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional


class _Same:
    """``Flag.cli_default`` when the shell's default is Python's."""

    def __repr__(self) -> str:
        return "SAME"


SAME: Any = _Same()


@dataclass(frozen=True)
class Flag:
    """How one option reads on the command line. ``flag``: the spelling (default ``--name``);
    ``negated``: the flag turns a True-by-default option off (``--no-flip``: ``flip=False``);
    ``cli_type``/``cli_default``: where the shell's type or default differs from Python's (``--lr``
    is text, ``auto`` or a number; ``--epochs`` defaults to 10 there; on ``--resume``, such a flag
    left off the command line takes Python's default, so the checkpoint's value comes back);
    ``parse``: text to value; ``argument``: a positional argument."""

    help: str
    flag: str = ""
    metavar: Optional[str] = None
    short: Optional[str] = None
    negated: bool = False
    cli_type: Any = None
    cli_default: Any = SAME
    parse: Optional[Callable[[Any], Any]] = None
    argument: bool = False
    show_default: bool = True

    def spelled(self, name: str) -> str:
        return self.flag or "--" + name.replace("_", "-")

    def parameter(self, name: str) -> str:
        """The CLI function's parameter name: the field's, or the flag's for a negated one (``no_flip``)."""
        return self.spelled(name).lstrip("-").replace("-", "_") if self.negated else name


#: flags several commands take, declared once (a command or an options table refers to them by name)
SHARED = {
    "select": Flag("Container inside the checkpoint, e.g. state_dict_ema.", metavar="PATH", show_default=False),
    "allow_globals": Flag("Accept this pickled global as opaque data (never imported or run).", flag="--allow-global",
                          metavar="module.Class", cli_type=Optional[list[str]], show_default=False),
    "device": Flag("auto: CUDA when present.", metavar="auto|cpu|cuda"),
    "as_json": Flag("Print the result as JSON on stdout, nothing else there.", flag="--json"),
    "quiet": Flag("Only the final summary (and warnings).", short="-q"),
    "verify": Flag("Re-read the output and compare every tensor bit for bit."),
    "force": Flag("Replace DST if it exists."),
}


def option(default: Any = MISSING, help: str = "", *, factory: Any = MISSING, **how: Any) -> Any:
    """A dataclass field with its flag: ``option(32, "Images per step.")``."""
    meta = {"flag": Flag(help, **how)}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def shared(name: str, default: Any = None) -> Any:
    """A dataclass field whose flag is the shared one of that name."""
    return field(default=default, metadata={"flag": SHARED[name]})


def nested(factory: Callable[[], Any]) -> Any:
    """A field holding another options table whose fields are flat keywords and flags (``freezing``)."""
    return field(default_factory=factory, metadata={"nested": True})


@dataclass(frozen=True)
class Entry:
    """One row of the table: the field's name, its Python type and default, and its flag (None:
    Python only)."""

    name: str
    type: Any
    default: Any
    flag: Optional[Flag]


def entries(cls: type) -> Iterator[Entry]:
    """The table's rows in declaration order, nested tables flattened in place."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.metadata.get("nested"):
            yield from entries(hints[f.name])
            continue
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)
        yield Entry(f.name, hints[f.name], default, f.metadata.get("flag"))


def keywords_of(cls: type) -> list[str]:
    return [e.name for e in entries(cls)]


def options_from(cls: type, options: Any, keywords: dict, caller: str) -> Any:
    """``options`` (an instance of ``cls``) with ``keywords`` laid over it, or ``cls`` from the
    keywords alone, always made by ``cls.from_keywords``: each table checks and normalises its
    values there (or, for TrainOptions, whose defaults may come from a checkpoint, in
    ``validated()`` once they are known). A keyword the table lacks is a TypeError, as for any
    Python function, with the nearest name."""
    names = keywords_of(cls)
    for k in keywords:
        if k not in names:
            near = difflib.get_close_matches(k, names, n=1)
            raise TypeError(f"{caller}() got an unexpected keyword argument {k!r}"
                            + (f"; did you mean {near[0]!r}?" if near else ""))
    if options is None:
        return cls.from_keywords(**keywords)
    if not isinstance(options, cls):
        raise TypeError(f"{caller}(): options must be {cls.__name__} or None, got {type(options).__name__}")
    return cls.from_keywords(**{**flat_values(options), **keywords})  # an object built by hand is checked too


def flat_values(options: Any) -> dict[str, Any]:
    """An options object as the flat keywords that make it again."""
    out: dict[str, Any] = {}
    for f in fields(options):
        value = getattr(options, f.name)
        out.update(flat_values(value) if f.metadata.get("nested") and is_dataclass(value) else {f.name: value})
    return out


def signature(fn: Callable, cls: type, skip: tuple[str, ...] = ()) -> inspect.Signature:
    """``fn``'s signature with its ``**keywords`` spelled out as the table's fields, so that
    ``help()``, editors and :mod:`surgery.flag_names` see every keyword."""
    params = list(inspect.signature(fn).parameters.values())
    var = [p for p in params if p.kind == inspect.Parameter.VAR_KEYWORD]
    own = [p for p in params if p.kind != inspect.Parameter.VAR_KEYWORD]
    taken = {p.name for p in own} | set(skip)
    table = [inspect.Parameter(e.name, inspect.Parameter.KEYWORD_ONLY,
                               default=e.default if e.default is not MISSING else inspect.Parameter.empty,
                               annotation=e.type)
             for e in entries(cls) if e.name not in taken]
    return inspect.Signature(own + table if var else own)


def text_to_path(value: Any) -> Any:
    """A str or os.PathLike as a Path; None as it is."""
    return None if value is None else Path(value)


__all__ = ["Flag", "SAME", "SHARED", "option", "shared", "nested", "Entry", "entries", "keywords_of", "options_from",
           "flat_values", "signature", "text_to_path"]
