"""`surgery remap SRC DST`: rename, drop, cast, convert and reorder, applied in the order given
(a --profile's ops first, then --rules', then the command line's)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import typer
from typer.core import TyperCommand

from surgery.remapping.ops import OP_KINDS, Op, OpKind
from surgery.remapping.options import RemapOptions

from .common import (console, escaped, handles_errors, human_bytes, option_values, print_json, shared_option,
                     with_options)

if TYPE_CHECKING:  # pragma: no cover
    from rich.table import Table

    from surgery.remapping.report import RemapReport


class _KeepsArgOrder(TyperCommand):
    """Records the raw arguments: Click groups repeated options, losing their interleaving."""

    def parse_args(self, ctx, args):
        ctx.meta["surgery.raw_args"] = list(args)
        return super().parse_args(ctx, args)


def ops_in_order(raw: list[str], values: dict[str, list]) -> list[Op]:
    """Rebuild the op list in command-line order from the raw args and each option's values
    (``values``: op kind -> the values its option collected; flags need none)."""
    by_flag = {k.flag: k for k in OP_KINDS.values()}
    seen = {name: 0 for name in OP_KINDS}
    ops = []
    i = 0
    while i < len(raw) and raw[i] != "--":
        tok = raw[i]
        kind = by_flag.get(tok.split("=", 1)[0])
        if kind is not None and kind.form.metavar is None:
            ops.append(Op(kind.name))
        elif kind is not None:
            vals = values.get(kind.name) or []
            if seen[kind.name] < len(vals):
                ops.append(Op.from_cli(kind.name, vals[seen[kind.name]]))
            seen[kind.name] += 1
            i += "=" not in tok  # skip the value
        i += 1
    return ops


def _option(kind: OpKind) -> inspect.Parameter:
    """The command-line option of one op kind: a flag, or a repeatable option with a value."""
    if kind.form.metavar is None:
        annotation: Any = Annotated[bool, typer.Option(kind.flag, help=kind.help)]
        return inspect.Parameter(kind.name, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=annotation)
    annotation = Annotated[Optional[list[str]], typer.Option(kind.flag, metavar=kind.form.metavar, help=kind.help)]
    return inspect.Parameter(kind.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


def _with_op_options(fn: Callable) -> Callable:
    """Give ``fn`` (which takes them as ``**values``) one option per op kind, in the table's
    order, before its own options: the command line's ops come from `OP_KINDS`."""
    params = list(inspect.signature(fn, eval_str=True).parameters.values())
    own = [p for p in params if p.kind != inspect.Parameter.VAR_KEYWORD]
    first_option = next(i for i, p in enumerate(own) if p.kind == inspect.Parameter.KEYWORD_ONLY)
    ops = [_option(k) for k in OP_KINDS.values()]
    fn.__signature__ = inspect.Signature(own[:first_option] + ops + own[first_option:])  # type: ignore[attr-defined]
    return fn


def _list_profiles(value: bool) -> None:
    """--list-profiles: each shipped profile on one line, then exit (before SRC and DST are asked for)."""
    if not value:
        return
    from surgery.remapping.profiles import list_profiles

    out = console()
    for name, description in list_profiles():
        out.print(f"{escaped(name)}  {escaped(description)}", soft_wrap=True)
    raise typer.Exit()


def register(app: typer.Typer) -> None:
    app.command("remap", cls=_KeepsArgOrder)(remap)


@_with_op_options
@with_options(RemapOptions)
@handles_errors
def remap(
    ctx: typer.Context,
    src: Annotated[Path, typer.Argument(help="Checkpoint to read (never modified).", show_default=False)],
    dst: Annotated[Path, typer.Argument(help="Output: .safetensors, .pt/.pth/.bin, or a folder for sharded safetensors.", show_default=False)],
    *,
    rules_file: Annotated[Optional[Path], typer.Option("--rules", help="YAML or JSON rules file; its ops run before the command-line ones.")] = None,
    profile: Annotated[Optional[str], typer.Option("--profile", metavar="NAME", help="A shipped rules file (--list-profiles); its ops run first.")] = None,
    heads: Annotated[Optional[int], typer.Option("--heads", metavar="N", help="Attention heads, for a profile's {heads}; by default from config.json or params.json beside SRC.")] = None,
    kv_heads: Annotated[Optional[int], typer.Option("--kv-heads", metavar="M", help="Key/value heads (grouped-query attention), for a profile's {kv_heads}; by default from config.json or params.json beside SRC.")] = None,
    list_profiles: Annotated[bool, typer.Option("--list-profiles", is_eager=True, callback=_list_profiles, help="List the shipped profiles, one line each, and exit.")] = False,
    select: Annotated[Optional[str], shared_option("select")] = None,
    as_json: Annotated[bool, shared_option("as_json")] = False,
    **values: Any,
) -> None:
    """Rewrite a checkpoint's keys and format. Ops apply in the order given.

    Example: surgery remap dp.pth clean.safetensors --auto --drop 'num_batches_tracked$' --verify
    """
    from surgery.remapping import Rules, remap as run_remap  # the rest of remap loads only when it runs
    from surgery.remapping.profiles import profile_path, variables

    known = variables(src, heads, kv_heads)
    rules = Rules.from_file(profile_path(profile), known) if profile else Rules()
    if rules_file:
        more = Rules.from_file(rules_file, known)
        rules.ops.extend(more.ops)
        rules.select = more.select or rules.select
    rules.ops.extend(ops_in_order(ctx.meta.get("surgery.raw_args", []), values))
    if select is not None:
        rules.select = select
    report = run_remap(src, dst, rules, RemapOptions.from_keywords(**option_values(RemapOptions, values)))
    if as_json:
        print_json(report.to_json())
        return
    _render(report)


def _render(report: RemapReport) -> None:
    out = console()
    if report.dry_run or len(report.rows) <= 40:
        out.print(_table(report))
    for op, n in report.op_counts:
        out.print(f"  {escaped(op)}: {n} keys" + ("  [yellow](matched nothing)[/yellow]" if n == 0 else ""))
    summary = f"{report.kept} tensors kept ({report.renamed} renamed), {report.dropped} dropped"
    if report.dry_run:
        out.print(f"{summary}; dry run, nothing written")
        return
    if report.certificate is not None:
        c = report.certificate
        where = ("the output's metadata (surgery.certificate) and --json" if report.dst_format.startswith("safetensors")
                 else "--json (this format keeps no metadata of its own)")
        out.print(f"source: {c['tensors']:,} tensors in {c['chunks']:,} chunks from {c['ranks']} ranks, each covered "
                  f"exactly once; the certificate and the sha256 of the {len(c['digests']):,} tensors written are in "
                  f"{where}")
    verified = ", verified bit for bit" if report.verified else ""
    if report.roundtrip is not None:
        verified += f", round trip A -> B -> A bit-exact ({report.roundtrip} tensors)"
    files = f" in {len(report.files)} files" if len(report.files) > 1 else ""
    out.print(f"{summary}; wrote {report.dst_format} {escaped(report.dst)} ({human_bytes(report.bytes_written)}{files})"
              f"{verified}")


def _table(report: RemapReport) -> Table:
    from rich.table import Table

    dry = " (dry run: nothing written)" if report.dry_run else ""
    table = Table(title=f"{escaped(report.src)} -> {escaped(report.dst)}{dry}",
                  title_justify="left", show_edge=False)
    table.add_column("old")
    table.add_column("new")
    table.add_column("dtype")
    for r in report.rows:
        new = "[red](dropped)[/red]" if r.new is None else ("=" if r.new == r.old else escaped(r.new))
        if r.into is not None:
            new = f"into {escaped(r.into)}"
        if r.alias_of:
            new += f" (tied to {escaped(r.alias_of)})"
        dt = r.new_dtype if r.new_dtype == r.dtype else f"{r.dtype} -> {r.new_dtype}"
        if r.group is not None:  # and the tensor ops after it
            dt += f" ({', '.join([r.group.kind, *(s.kind.replace('_', '-') for s in r.steps)])})"
        if r.src_shape is not None:
            dt += f" {list(r.src_shape)} -> {list(r.shape)}"
        elif r.steps:
            dt += f" ({', '.join(s.kind.replace('_', '-') for s in r.steps)})"
        if r.kind != "dense" or r.new_kind != "dense":
            dt += f" ({r.kind})" if r.kind == r.new_kind else f" ({r.kind} -> {r.new_kind})"
        table.add_row(escaped(r.old), new, escaped(dt))
    return table
