"""`surgery adapt CKPT --arch ARCH --num-classes N --out DIR`: load, swap the head, freeze."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from surgery.adapter.options import AdaptOptions
from surgery.errors import AdaptError

from .common import (console, escaped, handles_errors, human_count, option_values, print_json, shared_option,
                     with_options)
from .remap_cmd import _KeepsArgOrder, ops_in_order


def register(app: typer.Typer) -> None:
    app.command("adapt", cls=_KeepsArgOrder)(adapt)


@with_options(AdaptOptions)
@handles_errors
def adapt(
    ctx: typer.Context,
    ckpt: Annotated[Optional[Path], typer.Argument(help="Checkpoint to load (any format surgery reads); omit with --weights.", show_default=False)] = None,
    *,
    strip_prefix: Annotated[Optional[list[str]], typer.Option("--strip-prefix", metavar="P", help="Remove prefix P from checkpoint keys first.")] = None,
    rename: Annotated[Optional[list[str]], typer.Option("--rename", metavar="'REGEX=>REPL'", help="re.sub on checkpoint keys first.")] = None,
    drop: Annotated[Optional[list[str]], typer.Option("--drop", metavar="REGEX", help="Ignore checkpoint keys matching REGEX.")] = None,
    rules_file: Annotated[Optional[Path], typer.Option("--rules", help="Rules file (as for remap); its ops run first.")] = None,
    quiet: Annotated[bool, shared_option("quiet")] = False,
    as_json: Annotated[bool, shared_option("as_json")] = False,
    **values: Any,
) -> None:
    """Load a checkpoint into ARCH with a new N-class head, frozen by policy, ready to train.

    Writes DIR/model.safetensors, DIR/manifest.json and DIR/load_report.json.

    Example: surgery adapt ddp.pth --arch resnet18 --num-classes 4 --freeze head-only --out adapted/
    """
    # imported here, not at the top: every command's start (and `surgery --help`) would pay for them
    from surgery.adapter.core import adapt_with

    options = AdaptOptions.create(rules=_rules(ctx, rules_file, strip_prefix, rename, drop),
                                  **option_values(AdaptOptions, values))
    if options.out is None:  # the library may adapt in memory only; the command always writes
        raise AdaptError("--out is required: the folder the adapted model is written to")
    _, report = adapt_with(str(ckpt) if ckpt is not None else None, options)
    if as_json:
        print_json(report.to_json())
        return
    render(report, quiet=quiet)


def _rules(ctx: typer.Context, rules_file: Optional[Path], strip_prefix: Optional[list[str]],
           rename: Optional[list[str]], drop: Optional[list[str]]):
    """The rules file's ops, then the flags' ops in the order they were typed."""
    from surgery.remapping import Rules

    rules = Rules.from_file(rules_file) if rules_file else Rules()
    values = {"strip_prefix": strip_prefix or [], "add_prefix": [], "rename": rename or [], "drop": drop or [],
              "keep": [], "dtype": []}
    raw = [a for a in ctx.meta.get("surgery.raw_args", []) if a.split("=", 1)[0] != "--auto"]
    rules.ops.extend(ops_in_order(raw, values))
    return rules


def render(report, quiet: bool = False) -> None:
    out = console()
    if not quiet:
        _render_load(out, report)
    for w in report.warnings:
        out.print(f"[yellow]warning[/yellow]: {escaped(w)}")
    out.print(f"wrote {escaped(report.out, markup=False)}", markup=False)


def _render_load(out, report) -> None:
    from rich.table import Table

    rep = report.load
    a = rep.alignment
    how = ""
    if a is not None and (a.wrappers or a.method != "identity"):
        bits = [f"stripped {''.join(a.wrappers)}"] if a.wrappers else []
        if a.method == "prefix":
            bits.append(f"mapped {a.ckpt_prefix or '(root)'} -> {a.model_prefix or '(root)'}")
        elif a.method == "suffix":
            bits.append("matched by key suffix")
        how = f" ({', '.join(bits)})"
    out.print(f"loaded {len(rep.loaded)} tensors, coverage {rep.coverage:.1%} of the model's parameters{how}")
    for title, keys in (("missing (newly initialised)", rep.missing), ("unexpected (unused)", rep.unexpected),
                        ("new head", rep.head_new), ("old head, dropped", rep.head_dropped)):
        if keys:
            from surgery.keys import collapse_keys

            grouped = collapse_keys(keys)
            shown = ", ".join(grouped[:8]) + (f", ... ({len(grouped) - 8} more)" if len(grouped) > 8 else "")
            out.print(f"  {title} ({len(keys)} tensors): {escaped(shown)}")
    for ck, m, cs, ms in rep.mismatched:
        out.print(f"  [yellow]shape mismatch, skipped[/yellow]: {escaped(m)} checkpoint {list(cs)} vs model {list(ms)}")
    for n, cs, ms in rep.resized:
        out.print(f"  interpolated {escaped(n)}: {list(cs)} -> {list(ms)}")
    for n in rep.adapted:
        out.print(f"  adapted {escaped(n)} to the input channels")
    table = Table(title="parameter groups", title_justify="left", show_edge=False)
    for col in ("group", "params", "trainable now", "lr mult", "unfreezes"):
        table.add_column(col)
    for g in report.groups:
        # epochs counted from 1, as train prints them: --unfreeze-at 3 trains the group from epoch 4
        when = "-" if g["trainable"] else (f"epoch {g['unfreeze_at'] + 1}" if g["unfreeze_at"] is not None else "never")
        table.add_row(escaped(g["name"]), human_count(g["numel"]), "yes" if g["trainable"] else "no", f"{g['lr_mult']:g}",
                      when)
    out.print(table)
    inp = report.manifest["input"]
    out.print(f"input: {inp['size'][0]}x{inp['size'][1]} px (resize {inp['resize']}, {inp['interpolation']}), "
              f"{inp['channels']} channels, mean {_listed(inp['mean'])}, std {_listed(inp['std'])} "
              f"(from {escaped(inp['source'], markup=False)})", markup=False)
    bn = report.manifest["bn"]
    out.print(f"BatchNorm: {bn_line(bn['policy'], len(report.frozen_bn()), len(bn['modules']))}")


def _listed(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def bn_line(policy: str, held: int, total: int) -> str:
    """What the BatchNorm policy does to this model, in words that stay true when nothing is frozen."""
    if total == 0:
        return "none in the backbone"
    if held == 0:
        why = "nothing is frozen" if policy == "frozen" else "--bn train"
        return f"all {total} layers update their statistics while training ({why})"
    rest = f"; the other {total - held} update theirs" if held < total else ""
    return (f"{held} of {total} layers keep their pretrained statistics for the whole run (eval mode, also after an "
            f"unfreeze){rest}")


__all__ = ["register", "adapt", "render", "json"]

