"""What every command shares: consoles, the error contract, JSON output."""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import sys
import types
import typing
import warnings
from dataclasses import MISSING
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])


def drop_closed_pipe(stream: Any) -> None:
    """Point ``stream``'s file descriptor at /dev/null: the reader went away (``| head``), so
    what is still to be printed, and Python's flush at exit, are dropped instead of failing."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


class _NoTrailingSpace:
    """A text stream that drops the spaces rich pads lines with (table cells, justified text):
    piped output is for grep and diff, not for a screen. ``survive_pipe``: a closed pipe drops
    the output instead of raising (rich would exit 1), for commands whose work must finish."""

    def __init__(self, stream: Any, survive_pipe: bool = False):
        self.stream, self.pending, self.survive_pipe = stream, "", survive_pipe

    def write(self, text: str) -> int:
        lines = (self.pending + text).split("\n")
        self.pending = lines.pop()
        if lines:
            self._write("\n".join(line.rstrip() for line in lines) + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self._write(self.pending)
            self.pending = ""
        self._write("", flush=True)

    def _write(self, text: str, flush: bool = False) -> None:
        try:
            if text:
                self.stream.write(text)
            if flush:
                self.stream.flush()
        except BrokenPipeError:
            if not self.survive_pipe:
                raise
            drop_closed_pipe(self.stream)

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, ...
        return getattr(self.stream, name)


# C0 and C1 control characters (ESC, CSI, BEL, CR, ...) and the bidirectional overrides that
# reorder what a terminal shows
# C0 and C1 controls, and the invisible or direction-changing format characters and separators
# (zero-width spaces and joiners, marks, embeddings and isolates, line and paragraph separators)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u00ad\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def escaped(value: Any, markup: bool = True) -> str:
    """``value`` as text safe to print: every control character as an escape (``\\x1b``,
    ``\\u202e``), so a key, path or metadata value cannot move the cursor, recolour, retitle or
    hide what is shown; with ``markup`` (text a rich console parses) its ``[tags]`` are escaped
    too, so ``layer[bold]1[/bold].weight`` prints as it is. JSON output needs none of this:
    ``json.dumps`` escapes control characters and carries the raw names."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", str(value))
    if markup:
        from rich.markup import escape

        text = escape(text)
    return text


def console(stderr: bool = False, survive_pipe: bool = False):
    """A rich console: colours and live progress on a terminal; plain text with no markup
    styling and no trailing padding when NO_COLOR is set or the stream is not a terminal.
    ``survive_pipe``: when the reader of a pipe goes away, drop the output and carry on."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    plain = bool(os.environ.get("NO_COLOR")) or not stream.isatty()
    # emoji=False: a name holding ":thumbs_up:" prints as it is
    return Console(file=_NoTrailingSpace(stream, survive_pipe) if plain else stream, no_color=plain, highlight=False,
                   emoji=False,
                   soft_wrap=plain, force_terminal=False if plain else None, width=120 if plain else None)


def fail(message: str, code: int = 2) -> typer.Exit:
    sys.stderr.write(f"error: {escaped(' '.join(message.split()), markup=False)}\n")
    return typer.Exit(code)


# warnings torch and torchvision print that a user can do nothing about: GoogLeNet's and
# Inception's notice about their future default init (the weights are loaded anyway), DDP's
# buffer broadcast notes, torch.compile's internals
_NOISE = ((r"The default weight initialization of", FutureWarning, ""),
          (r".*broadcast_buffers", UserWarning, ""),
          (r"", UserWarning, r"torch\._dynamo|torch\._inductor"))


def handles_errors(fn: F) -> F:
    """Map the library's SurgeryError to one line on stderr and exit code 2; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from surgery.errors import SurgeryError
        from surgery.flag_names import cli_names

        try:
            with warnings.catch_warnings(), cli_names():  # errors name the flags the user typed
                for message, category, module in _NOISE:
                    warnings.filterwarnings("ignore", message=message, category=category, module=module)
                return fn(*args, **kwargs)
        except SurgeryError as e:
            raise fail(e.one_line(), e.exit_code) from None
        except KeyboardInterrupt:
            raise fail("interrupted; nothing was left half-written", 130) from None
        except BrokenPipeError:  # `surgery inspect x --keys | head`
            drop_closed_pipe(sys.stdout)
            raise typer.Exit(0) from None

    return wrapper  # type: ignore[return-value]


def skipped_lines(skipped: list, shown: int = 5) -> list[str]:
    """``skipped N unreadable images:``, the first ``shown`` of ``[(path, why)]``, and how many more."""
    if not skipped:
        return []
    lines = [f"skipped {len(skipped)} unreadable image{'s' if len(skipped) != 1 else ''}:"]
    lines += [f"  {escaped(path, markup=False)}: {escaped(why, markup=False)}" for path, why in skipped[:shown]]
    if len(skipped) > shown:
        lines.append(f"  ... {len(skipped) - shown} more")
    return lines


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"


def human_count(n: int) -> str:
    if n >= 1_000_000_000:
        return f"{n / 1e9:.2f}B"
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    if n >= 1_000:
        return f"{n / 1e3:.1f}K"
    return str(n)


# ----------------------------------------------------------------------------- options from the table

def shared_option(name: str) -> Any:
    """The Typer option of a flag several commands take (``--json``, ``--select``, ...), declared
    once in :data:`surgery.option_table.SHARED`: ``as_json: Annotated[bool, shared_option("as_json")] = False``."""
    from surgery.option_table import SHARED

    f = SHARED[name]
    return typer.Option(f.spelled(name), *([f.short] if f.short else []), help=f.help, metavar=f.metavar,
                        show_default=f.show_default)


def _cli_type(entry: Any) -> Any:
    """The command line's type of a table row: its ``cli_type``, else the Python type with None
    made Optional and a tuple made a repeatable option."""
    f = entry.flag
    if f.negated:
        return bool
    if f.cli_type is not None:
        return f.cli_type
    t = entry.type
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        if len(args) != 1:
            raise TypeError(f"option {entry.name}: {t} needs a cli_type")
        return Optional[args[0]]
    if typing.get_origin(t) is tuple:
        return Optional[list[args[0]]]
    return t


def _parameter(entry: Any) -> inspect.Parameter:
    from surgery.option_table import SAME

    f = entry.flag
    default = False if f.negated else (entry.default if f.cli_default is SAME else f.cli_default)
    if isinstance(default, tuple) or default is MISSING:  # a repeatable option, or a value the table requires
        default = None
    if f.argument:  # required on the command line, whatever Python's default
        default = inspect.Parameter.empty
        info = typer.Argument(help=f.help, show_default=f.show_default, metavar=f.metavar)
    else:
        info = typer.Option(f.spelled(entry.name), *([f.short] if f.short else []), help=f.help, metavar=f.metavar,
                            show_default=f.show_default)
    return inspect.Parameter(f.parameter(entry.name), inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[_cli_type(entry), info])


def with_options(table: type) -> Callable[[F], F]:
    """Give a command (which takes them as ``**values``) one option per flagged field of ``table``:
    in ``--help``, the table's arguments, then its options in declaration order, then the
    command's own options (its modes and output: ``--find-lr``, ``--json``)."""

    def give(fn: F) -> F:
        from surgery.option_table import entries

        params = list(inspect.signature(fn, eval_str=True).parameters.values())
        own = [p for p in params if p.kind != inspect.Parameter.VAR_KEYWORD]
        rows = [_parameter(e) for e in entries(table) if e.flag is not None]
        args = [p for p in rows if isinstance(_typer_info(p), typer.models.ArgumentInfo)]
        lead = [p for p in own if p.kind != inspect.Parameter.KEYWORD_ONLY]
        rest = [p for p in own if p.kind == inspect.Parameter.KEYWORD_ONLY]
        fn.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            lead + args + [p for p in rows if p not in args] + rest)
        return fn

    return give


def _typer_info(p: inspect.Parameter) -> Any:
    """The ``typer.Option``/``typer.Argument`` of an ``Annotated[type, info]`` parameter."""
    return getattr(p.annotation, "__metadata__", (None,))[0]


def option_values(table: type, values: dict[str, Any], ctx: Any = None, resuming: bool = False) -> dict[str, Any]:
    """The table's fields from a command's ``**values``: a negated flag turned back (``--no-flip``:
    ``flip=False``), text parsed (``--lr``). ``resuming``: an option whose shell default differs
    from Python's and that the command line left out takes Python's default, so the checkpoint's
    value comes back (``--epochs``)."""
    from surgery.option_table import SAME, entries

    out: dict[str, Any] = {}
    for e in entries(table):
        f = e.flag
        if f is None or f.parameter(e.name) not in values:
            continue
        value = values[f.parameter(e.name)]
        if f.negated:
            value = not value
        elif resuming and f.cli_default is not SAME and _left_out(ctx, e.name):
            value = e.default
        elif f.parse is not None and value is not None:
            value = f.parse(value)
        out[e.name] = value
    return out


def _left_out(ctx: Any, name: str) -> bool:
    return getattr(ctx.get_parameter_source(name), "name", "") != "COMMANDLINE"
