"""Command-line values of the plain types (str, int, bool and lists of them) taken without pydantic.

Typer coerces every parameter through a pydantic TypeAdapter that it builds on first use, even
for a flag left at its default: importing pydantic and building the adapters is about 0.15 s of
every command's start-up. `install` wraps Typer's builder so that a value that is already what
the annotation asks for (a str for str, a bool for bool, a decimal string or an int within the
bounds for int, a list of those) is taken as it is; any other value, and every other annotation,
goes to Typer's own coercion, built when first needed, which converts it or words the error as
before. Nothing changes where this Typer lacks the hook.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, get_args, get_origin

_DECIMAL = re.compile(r"[0-9]{1,18}\Z")


def _plain(value: Any, annotation: Any, info: Any) -> tuple[bool, Any]:
    """(True, value as the annotation wants it) when it needs no conversion or check, else (False, None)."""
    if annotation is str:
        return type(value) is str, value
    if annotation is bool:
        return type(value) is bool, value
    if annotation is int:
        if type(value) is str and _DECIMAL.match(value):
            value = int(value)
        if type(value) is not int:
            return False, None
        low, high = getattr(info, "min", None), getattr(info, "max", None)
        return (low is None or value >= low) and (high is None or value <= high), value
    return False, None


def _leaf(annotation: Any) -> Any:
    """The element type of ``list[X]``, or the annotation itself."""
    return get_args(annotation)[0] if get_origin(annotation) is list and len(get_args(annotation)) == 1 else annotation


def install() -> None:
    try:
        from typer import _coercion, core
    except ImportError:  # pragma: no cover - a Typer without the hook
        return
    build = getattr(core, "build_runtime_param", None)
    base = getattr(_coercion, "RuntimeParam", None)
    if build is None or base is None or getattr(build, "plain_types_first", False):
        return

    @dataclass(frozen=True)
    class PlainFirst(base):  # type: ignore[misc, valid-type]
        descriptor: Any

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            leaf, info = _leaf(self.annotation), self.parameter_info
            if leaf is not self.annotation:  # list[X]
                if isinstance(value, (list, tuple)):
                    out = [_plain(v, leaf, info) for v in value]
                    if all(ok for ok, _ in out):
                        return [v for _, v in out]
            else:
                ok, v = _plain(value, leaf, info)
                if ok:
                    return v
            return build(self.descriptor)._coerce_value(value, param=param, ctx=ctx)

    def build_plain_first(descriptor: Any) -> Any:
        info = descriptor.parameter_info
        simple = (descriptor.file_annotation is None and getattr(info, "parser", None) is None
                  and getattr(info, "click_type", None) is None and not getattr(info, "clamp", False)
                  and _leaf(descriptor.annotation) in (str, int, bool))
        if not simple:
            return build(descriptor)
        try:
            return PlainFirst(parameter_info=info, annotation=descriptor.annotation, descriptor=descriptor)
        except TypeError:  # a Typer whose RuntimeParam asks for more: its own coercion, as without this module
            return build(descriptor)

    build_plain_first.plain_types_first = True  # type: ignore[attr-defined]
    core.build_runtime_param = build_plain_first
