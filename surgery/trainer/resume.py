"""Continuing a run: which checkpoint, its arguments back, its tensors back, and the command to
continue an interrupted run."""

from __future__ import annotations

import contextlib
import contextvars
import shlex
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..adapter.core import load_weights
from ..errors import ResumeError
from .options import DEFAULTS, TrainOptions
from .state import CHECKPOINT_DIR, LAST, load_checkpoint, unwrap

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

# what a resumed run may do differently: its length (the schedule follows it), and how it runs
_MAY_CHANGE = ("epochs", "workers", "device")
_NEGATED = {"augment": "--no-augment", "flip": "--no-flip", "amp": "--no-amp"}


def inside(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or under it."""
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def open_resume(resume: Any, out: Path) -> tuple[dict, bool]:
    """The checkpoint ``resume`` names (True: OUT's last.pt), and whether it continues OUT."""
    if resume is True:
        where = out / CHECKPOINT_DIR / LAST
        if not where.is_file():
            raise ResumeError(f"{where}: no checkpoint to resume from; --resume continues a run in OUT "
                              f"(or give --resume PATH)")
        return load_checkpoint(where), True
    where = Path(resume)
    return load_checkpoint(where), out.is_dir() and inside(where, out)


def _flag(name: str, value: Any) -> str:
    if name in _NEGATED:
        return _NEGATED[name] if not value else f"{name} on"
    if isinstance(value, bool):
        return f"--{name}" if value else f"no --{name}"
    return f"--{name.replace('_', '-')} {value}"


def restore_args(opts: TrainOptions, saved: dict, where: str) -> tuple[TrainOptions, list[str]]:
    """The run's options as the checkpoint saved them. An option left at its default takes the
    saved value; one given differently is refused, naming both, so that a resumed run never
    silently computes something else. Other epochs (the schedule follows), workers or device are
    allowed. Returns the options and the flags restored (for run.log)."""
    args = opts.hyper()
    changes, restored, conflicts = {}, [], []
    for k, was in saved.items():
        if k not in args or args[k] == was:
            continue
        now = args[k]
        if now is None or now == DEFAULTS[k]:
            changes[k] = was
            restored.append(_flag(k, was))
        elif k in _MAY_CHANGE:
            continue
        else:
            conflicts.append(f"{_flag(k, now)} (the run was started with {_flag(k, was)})")
    if conflicts:
        raise ResumeError(f"{where}: --resume continues a run with its own arguments, but {'; '.join(conflicts)}; "
                          f"drop them to continue the same run (--epochs may change), or start a new run")
    return replace(opts, **changes), restored


# a run that is one part of a larger command (the scratch half of --compare-scratch) is continued by
# continuing that command: its run.log and its interruption name the command, never the part alone
_WHOLE: contextvars.ContextVar[str | None] = contextvars.ContextVar("surgery_continue_whole", default=None)


def continue_command(adapted: Path, data: Path, out: Path, trust_code: bool = False,
                     compare_scratch: bool = False) -> str:
    """The command that continues an interrupted run (its other arguments are in the checkpoint;
    consent to run the folder's factory is not, so it is repeated when it was given; a comparison
    is continued as a comparison). Inside :func:`continued_by`, that command instead."""
    whole = _WHOLE.get()
    if whole is not None:
        return whole
    return " ".join(["surgery train", shlex.quote(str(adapted)), "--data", shlex.quote(str(data)),
                     "--out", shlex.quote(str(out)), "--resume", *(["--compare-scratch"] if compare_scratch else []),
                     *(["--trust-code"] if trust_code else [])])


@contextlib.contextmanager
def continued_by(command: str) -> Iterator[None]:
    """Every run interrupted inside names ``command`` as the one that continues it."""
    token = _WHOLE.set(command)
    try:
        yield
    finally:
        _WHOLE.reset(token)


def load_moving(model: "nn.Module", state: dict, moving: set[str], where: str) -> None:
    """Load a checkpoint's tensors: those the run can change. The rest are the adapted weights."""
    missing, unexpected = load_weights(unwrap(model), state, strict=False)
    lacking = sorted(set(missing) & moving)
    if lacking or unexpected:
        raise ResumeError(f"{where}: does not match this run's model (missing {lacking[:3]}, unexpected "
                          f"{sorted(unexpected)[:3]}); it was written by a different run")
