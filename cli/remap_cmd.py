"""`surgery remap SRC DST`: rename, drop, cast and convert, applied in the order given."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand

from .common import console, handles_errors, human_bytes, print_json

# option flag -> op kind; the order on the command line is the order ops apply
_OP_FLAGS = {"--auto": "auto", "--strip-prefix": "strip_prefix", "--add-prefix": "add_prefix",
             "--rename": "rename", "--drop": "drop", "--keep": "keep", "--dtype": "dtype",
             "--densify": "densify", "--dequantize": "dequantize"}


class _KeepsArgOrder(TyperCommand):
    """Records the raw arguments: Click groups repeated options, losing their interleaving."""

    def parse_args(self, ctx, args):
        ctx.meta["surgery.raw_args"] = list(args)
        return super().parse_args(ctx, args)


def ops_in_order(raw: list[str], values: dict[str, list]) -> list:
    """Rebuild the op list in command-line order from the raw args and each option's values."""
    from surgery.rules import FLAG_OPS, Op, parse_rename

    seen = {k: 0 for k in _OP_FLAGS.values()}
    ops = []
    i = 0
    while i < len(raw):
        tok = raw[i]
        if tok == "--":
            break
        flag = tok.split("=", 1)[0]
        kind = _OP_FLAGS.get(flag)
        if kind is not None:
            if kind in FLAG_OPS:
                ops.append(Op(kind))
            else:
                vals = values[kind]
                if seen[kind] < len(vals):
                    v = vals[seen[kind]]
                    ops.append(parse_rename(v) if kind == "rename" else Op(kind, v))
                seen[kind] += 1
                if "=" not in tok:
                    i += 1  # skip the value
        i += 1
    return ops


def register(app: typer.Typer) -> None:
    app.command("remap", cls=_KeepsArgOrder)(remap)


@handles_errors
def remap(
    ctx: typer.Context,
    src: Annotated[Path, typer.Argument(help="Checkpoint to read (never modified).", show_default=False)],
    dst: Annotated[Path, typer.Argument(help="Output: .safetensors, .pt/.pth/.bin, or a folder for sharded safetensors.", show_default=False)],
    auto: Annotated[bool, typer.Option("--auto", help="Strip module./_orig_mod. (any order, repeatedly) where every key has them.")] = False,
    strip_prefix: Annotated[Optional[list[str]], typer.Option("--strip-prefix", metavar="P", help="Remove prefix P from keys that start with it.")] = None,
    add_prefix: Annotated[Optional[list[str]], typer.Option("--add-prefix", metavar="P", help="Put prefix P in front of every key.")] = None,
    rename: Annotated[Optional[list[str]], typer.Option("--rename", metavar="'REGEX=>REPL'", help="re.sub on every key, e.g. '^fc\\.=>head.'.")] = None,
    drop: Annotated[Optional[list[str]], typer.Option("--drop", metavar="REGEX", help="Drop keys matching REGEX (re.search).")] = None,
    keep: Annotated[Optional[list[str]], typer.Option("--keep", metavar="REGEX", help="Keep only keys matching REGEX.")] = None,
    dtype: Annotated[Optional[list[str]], typer.Option("--dtype", metavar="fp16|bf16|fp32", help="Cast floating tensors.")] = None,
    densify: Annotated[bool, typer.Option("--densify", help="Write sparse tensors (COO, CSR, ...) as dense ones.")] = False,
    dequantize: Annotated[bool, typer.Option("--dequantize", help="Write quantized tensors as float32 (t.dequantize()).")] = False,
    rules_file: Annotated[Optional[Path], typer.Option("--rules", help="YAML or JSON rules file; its ops run before the command-line ones.")] = None,
    select: Annotated[Optional[str], typer.Option("--select", metavar="PATH", help="Container inside the checkpoint, e.g. state_dict_ema.")] = None,
    allow_global: Annotated[Optional[list[str]], typer.Option("--allow-global", metavar="module.Class", help="Accept this pickled global as opaque data (never imported or run).")] = None,
    shard_size: Annotated[str, typer.Option("--shard-size", help="Largest shard when DST is a folder.")] = "5GB",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the old -> new table; write nothing.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Re-read the output and compare every tensor bit for bit.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace DST if it exists.")] = False,
    in_place: Annotated[bool, typer.Option("--in-place", help="Allow DST to be SRC (written to a temp file, then renamed).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Rewrite a checkpoint's keys and format. Ops apply in the order given.

    Example: surgery remap dp.pth clean.safetensors --auto --drop 'num_batches_tracked$' --verify
    """
    from surgery.rules import Rules, remap as run_remap

    rules = Rules.from_file(rules_file) if rules_file else Rules()
    values = {"strip_prefix": strip_prefix or [], "add_prefix": add_prefix or [], "rename": rename or [],
              "drop": drop or [], "keep": keep or [], "dtype": dtype or []}
    rules.ops.extend(ops_in_order(ctx.meta.get("surgery.raw_args", []), values))
    if select is not None:
        rules.select = select
    report = run_remap(src, dst, rules, force=force, in_place=in_place, dry_run=dry_run, verify=verify,
                       shard_size=shard_size, allow_globals=tuple(allow_global or ()))
    if as_json:
        print_json(report.to_json())
        return
    out = console()
    if dry_run or len(report.rows) <= 40:
        from rich.table import Table

        table = Table(title=f"{report.src} -> {report.dst}" + (" (dry run: nothing written)" if dry_run else ""),
                      title_justify="left", show_edge=False)
        table.add_column("old")
        table.add_column("new")
        table.add_column("dtype")
        for r in report.rows:
            new = "[red](dropped)[/red]" if r.new is None else ("=" if r.new == r.old else r.new)
            if r.alias_of:
                new += f" (tied to {r.alias_of})"
            dt = r.new_dtype if r.new_dtype == r.dtype else f"{r.dtype} -> {r.new_dtype}"
            if r.kind != "dense" or r.new_kind != "dense":
                dt += f" ({r.kind})" if r.kind == r.new_kind else f" ({r.kind} -> {r.new_kind})"
            table.add_row(r.old, new, dt)
        out.print(table)
    for op, n in report.op_counts:
        out.print(f"  {op}: {n} keys" + ("  [yellow](matched nothing)[/yellow]" if n == 0 else ""))
    summary = f"{report.kept} tensors kept ({report.renamed} renamed), {report.dropped} dropped"
    if dry_run:
        out.print(f"{summary}; dry run, nothing written")
        return
    verified = ", verified bit for bit" if report.verified else ""
    files = f" in {len(report.files)} files" if len(report.files) > 1 else ""
    out.print(f"{summary}; wrote {report.dst_format} {report.dst} ({human_bytes(report.bytes_written)}{files}){verified}")
