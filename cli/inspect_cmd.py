"""`surgery inspect PATH...`: what is in a checkpoint (or a model zoo of them), from metadata only."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import console, escaped, handles_errors, human_bytes, human_count, print_json, shared_option

_WRAPPER_NAMES = {"module.": "DataParallel/DDP", "_orig_mod.": "torch.compile", "_forward_module.": "Lightning"}
DEPTH = 2  # the tree depth shown when --depth is not given
TREE_ROWS = 40  # tree rows shown when --depth is not given: a screenful, whatever the checkpoint
GROUP_NAMES = 4  # names shown of one tied or shared group
LONG_TABLE = 200  # rows from which a table is laid out here, not by rich (about 1 ms a row there)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)


@handles_errors
def inspect(
    paths: Annotated[list[str], typer.Argument(metavar="PATH...", show_default=False, help=(
        "Checkpoint file or folder (sharded, DCP), or ORG/NAME in the Hugging Face cache. Several paths, "
        "folders of checkpoints (walked) and glob patterns ('zoo/**/*.pt') scan a model zoo: one table row, "
        "or with --json one JSON line, per checkpoint."))],
    keys: Annotated[bool, typer.Option("--keys", help="List every tensor: name, dtype, shape.")] = False,
    filter: Annotated[Optional[str], typer.Option("--filter", metavar="REGEX", help="Only list tensors whose name matches (implies --keys).")] = None,
    depth: Annotated[Optional[int], typer.Option("--depth", min=0, show_default=False, help=(
        f"Module tree depth (default {DEPTH}; 0 hides the tree). Without it the tree stops after {TREE_ROWS} rows; "
        "with it every row is printed."))] = None,
    select: Annotated[Optional[str], shared_option("select")] = None,
    allow_global: Annotated[Optional[list[str]], shared_option("allow_globals")] = None,
    as_json: Annotated[bool, shared_option("as_json")] = False,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="Processes for a scan (default: one per CPU).")] = None,
) -> None:
    """Show what is in a checkpoint, from metadata only (no tensor data is read).

    Format, container, tensors, dtypes, wrapper prefixes, tied weights, module tree, and the
    torchvision or timm architecture the checkpoint fits. Given many checkpoints, a table of them; the
    exit code is 2 when any could not be read (each is one error row, the scan goes on)."""
    from surgery.inspection.inspect_report import inspect as run_inspect

    if not _is_single(paths):
        from . import zoo_view

        raise typer.Exit(zoo_view.run(paths, as_json=as_json, keys=keys, filter=filter,
                                      depth=DEPTH if depth is None else depth, select=select,
                                      allow_globals=tuple(allow_global or ()), workers=workers))
    from surgery.checkpoint import gc_paused

    # no collections while the report is made and shown: its records (a few per tensor) all live
    # until _show returns and are freed then, by reference counts, so the collection that runs
    # when the pause ends has almost nothing left to walk
    with gc_paused():
        # --depth 0 builds no tree at all; an explicit --depth prints every row it asks for
        _show(run_inspect(paths[0], select=select, allow_globals=tuple(allow_global or ()), keys=keys,
                          filter=filter, depth=DEPTH if depth is None else depth), as_json,
              tree_rows=TREE_ROWS if depth is None else None)


def _show(report, as_json: bool, tree_rows: int | None) -> None:
    if as_json:
        print_json(report.to_json())  # every row: JSON is for programs, which page nothing
        return
    render(report, show_tree=bool(report.depth), tree_rows=tree_rows)


def _is_single(paths: list[str]) -> bool:
    """One checkpoint named: inspect prints its full report. Else (several paths, a pattern, a
    folder with subfolders or with several weights files) it scans."""
    import glob
    import os

    from surgery.errors import InputError
    from surgery.formats import sniff
    from surgery.inspection.zoo_scan import expand, is_checkpoint_folder

    if len(paths) != 1:
        return False
    path = paths[0]
    if glob.has_magic(path) and not os.path.lexists(path):
        return False
    if os.path.isdir(path) and not is_checkpoint_folder(path):
        if any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(path)):
            return False  # a tree of checkpoints
        try:
            sniff(path)
        except InputError:
            return False  # not one checkpoint: a folder of them
        return len(expand([path]).paths) == 1  # else its other checkpoints (a.th beside b.pth) would be ignored
    return True


def render(report, show_tree: bool = True, tree_rows: int | None = TREE_ROWS) -> None:
    """The report as text; the tree stops after ``tree_rows`` rows (None: every row) with one line
    saying what the rest hold and how to see them."""
    from rich.table import Table

    from surgery.inspection.key_analysis import cut_tree

    out = console()
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    for k, v in _summary_rows(report) + _key_rows(report) + _guess_rows(report):
        head.add_row(k, escaped(v))  # values hold key names, paths and metadata from the file
    out.print(head)
    if show_tree and report.tree:
        out.print(f"\n[bold]module tree[/bold] (depth {report.depth}; numbered siblings with identical structure collapse)")
        cut = cut_tree(report.tree, len(report.tree) if tree_rows is None else tree_rows)
        _print_table(out, _TREE_COLUMNS, _tree_cells(cut.shown))
        if cut.hidden:
            out.print(escaped(
                f"  ... {cut.hidden:,} more rows: {cut.modules:,} more module{'s' if cut.modules > 1 else ''} like {cut.like} "
                f"({human_count(cut.params)} parameters, {cut.n_tensors:,} tensors)"))
            out.print(f"  --depth {report.depth} prints all {len(report.tree):,} rows, --json lists them, "
                      "--keys lists every tensor, --filter REGEX those whose names match")
    if report.keys is not None:
        out.print()
        _print_table(out, _KEY_COLUMNS, _key_cells(report))
        out.print(f"{len(report.keys)} of {len(report.ckpt.tensors)} tensors listed")


def _summary_rows(report) -> list[tuple[str, str]]:
    """Where the weights are and what they are: file, format, container, counts, dtypes, devices."""
    from surgery.formats import FORMATS

    c = report.ckpt
    rows: list[tuple[str, str]] = [
        ("checkpoint", str(c.path)),
        ("format", f"{c.format} ({FORMATS[c.format].description}), {human_bytes(c.file_size)}"
         + (f" in {len(c.files)} files" if len(c.files) > 1 else "")),
    ]
    if c.description and c.file_kind != "state_dict":
        rows.append(("contents", c.description))
    others = [p for p in c.containers if p != c.container]
    also = ", ".join(p or "(top level)" for p in others[:8]) + (f", ... {len(others) - 8:,} more (--json lists them)"
                                                                 if len(others) > 8 else "")
    rows.append(("container", (c.container or "(top level)") + (f"   also: {also} (pick with --select)" if others else "")))
    if c.extras:
        items = list(c.extras.items())
        text = "; ".join(f"{k} = {v}" for k, v in items[:8]) + (f"; ... {len(items) - 8} more" if len(items) > 8 else "")
        rows.append(("other entries", text))
    kinds = "".join(f", {n} {k.replace('_', ' ')}" for k, n in c.kinds.items())
    rows.append(("tensors", f"{len(c.tensors)} ({human_count(report.num_params)} parameters, "
                            f"{human_bytes(report.nbytes)}{kinds})"))
    rows.append(("dtypes", "; ".join(f"{d}: {v['tensors']} tensors, {human_bytes(v['bytes'])}" for d, v in report.dtype_summary.items())))
    rows += _fp8_rows(report)
    rows += _fp4_rows(report)
    if c.certificate is not None:
        rows.append(("ranks' chunks", c.certificate.summary() + "; `surgery remap` writes them as one file"))
    devices = report.devices
    if set(devices) != {"cpu"}:
        rows.append(("saved on", ", ".join(f"{d} ({n})" for d, n in devices.items()) + "; opened on the CPU"))
    return rows


def _fp8_rows(report) -> list[tuple[str, str]]:
    """FP8 weights stored with scales beside them: cast alone they are wrong; --dequantize applies them."""
    scaled, config_error = report.scaled_fp8
    groups: dict[tuple[str, str], list] = {}
    for s in scaled:
        groups.setdefault((s.dtype, s.describe()), []).append(s)
    rows = []
    for (dtype, how), group in groups.items():
        names = ", ".join(s.scale for s in group[:2]) + (" ..." if len(group) > 2 else "")
        them = "them" if len(group) > 1 else "it"
        fix = f"--dequantize applies {them}" if group[0].layout else f"--dequantize refuses {them}"
        rows.append(("fp8", f"{len(group)} tensor{'s' if len(group) > 1 else ''} {dtype} with {how} ({names}); {fix}"))
    if config_error and rows:
        rows.append(("fp8", f"block size assumed 128x128: {config_error}"))
    return rows


def _fp4_rows(report) -> list[tuple[str, str]]:
    """Packed FP4 weights with scales: --dtype leaves them packed; --dequantize unpacks them."""
    groups: dict[tuple[str, bool], list] = {}
    for p in report.scaled_fp4:
        groups.setdefault((p.describe(), not p.problem()), []).append(p)
    rows = []
    for (how, fits), group in groups.items():
        names = "; ".join(" + ".join(p.scales) for p in group[:2]) + (" ..." if len(group) > 2 else "")
        them = "them" if len(group) > 1 else "it"
        fix = f"--dequantize unpacks {them}" if fits else f"--dequantize refuses {them}: {group[0].problem()}"
        rows.append(("fp4", f"{len(group)} tensor{'s' if len(group) > 1 else ''} {how} with scales ({names}); {fix}"))
    return rows


def _key_rows(report) -> list[tuple[str, str]]:
    """What the key names say: wrapper prefixes (and how to strip them), tied and shared tensors, metadata."""
    c, rows = report.ckpt, []
    if report.wrapper_prefixes or report.common_prefix:
        parts = [f"{p} ({_WRAPPER_NAMES.get(p, 'wrapper')})" for p in report.wrapper_prefixes]
        own = [k for k in c.tensors if report.wrapper_prefixes and not k.startswith(report.wrapper_prefixes[0])]
        if own:  # the wrapper's own entries (AveragedModel's n_averaged) keep their names
            parts[-1] += f" on {len(c.tensors) - len(own)} of {len(c.tensors)} keys; not on {', '.join(own[:3])}"
        if report.common_prefix:
            parts.append(f"{report.common_prefix} (shared by every key)")
        rows.append(("prefixes", ", ".join(parts)))
        rows.append(("clean with", report.remap_command or ""))
    else:
        rows.append(("prefixes", "none (keys are clean)"))
    tied = report.tied_groups
    if tied:
        rows.append(("tied", "; ".join(_group(g, " = ") for g in tied[:5])
                     + (f"; ... {len(tied) - 5} more groups (--json lists them)" if len(tied) > 5 else "")))
    shared = report.shared_storage()
    if shared:
        rows.append(("shared storage", "; ".join(_group(g, ", ") for g in shared[:5])
                     + (f"; ... {len(shared) - 5} more (--json lists them)" if len(shared) > 5 else "")))
    if c.metadata:
        rows.append(("metadata", ", ".join(f"{k}={v if len(v) < 40 else v[:37] + '...'}" for k, v in list(c.metadata.items())[:6])))
    return rows


def _group(names: list[str], sep: str) -> str:
    """A group of names, the first few of a long one."""
    if len(names) <= GROUP_NAMES:
        return sep.join(names)
    return sep.join(names[:GROUP_NAMES]) + f"{sep}... ({len(names):,} names, --json lists them)"


def _guess_rows(report) -> list[tuple[str, str]]:
    """The torchvision or timm model the keys fit, if a known one does."""
    if not report.guesses:
        return [("architecture", "no known architecture")] if report.ckpt.tensors else []
    g = report.guesses[0]
    if g.score >= 0.5:
        text = f"{g.arch}: {g.matched}/{g.total} keys match (score {g.score:.2f})"
        if g.num_classes is not None:
            text += f", classifier has {g.num_classes} outputs"
        rest = [f"{x.arch} {x.score:.2f}" for x in report.guesses[1:]]
        if rest:
            text += f"; next: {', '.join(rest)}"
    else:
        text = f"no known model fits; nearest: {g.arch} ({g.matched}/{g.total} keys match, score {g.score:.2f})"
    return [("architecture", text)]


_TREE_COLUMNS = (("module", "left"), ("params", "right"), ("tensors", "right"))
_KEY_COLUMNS = (("name", "left"), ("dtype", "left"), ("shape", "left"), ("params", "right"))


def _tree_cells(rows) -> list[tuple[str, ...]]:
    out = []
    for r in rows:
        label = "  " * (r.depth - 1) + r.name
        if r.repeat > 1 and "{" in r.name:
            label += f"  x{r.repeat}"
        out.append((label, human_count(r.params), str(r.n_tensors)))
    return out


def _key_cells(report) -> list[tuple[str, ...]]:
    tensors, out = report.ckpt.tensors, []
    for n in report.keys:
        info = tensors[n]
        dtype = info.dtype if info.kind == "dense" else f"{info.dtype} ({info.kind.replace('_', ' ')})"
        out.append((n, dtype, "x".join(map(str, info.shape)) or "scalar", str(info.numel)))
    return out


def _print_table(out, columns, rows: list[tuple[str, ...]]) -> None:
    """A borderless table, two spaces either side of each cell. ``rows`` hold raw text (names
    from the file): escaped here. A long table (which only --keys, --filter or --depth print) is
    laid out here in one pass, as rich would lay it out when it fits the width, and not wrapped
    when it does not: rich's layout costs about a millisecond a row, a minute for 50,000 keys."""
    from rich.cells import cell_len
    from rich.table import Table

    if len(rows) < LONG_TABLE:
        t = Table(show_edge=False, box=None, padding=(0, 2))
        for name, justify in columns:
            t.add_column(name, justify=justify)
        for row in rows:
            t.add_row(*(escaped(c) for c in row))
        out.print(t)
        return
    rows = [tuple(escaped(c, markup=False) for c in row) for row in rows]
    widths = [len(name) for name, _ in columns]
    lens = [[cell_len(c) for c in row] for row in rows]
    for ls in lens:
        widths = [max(w, n) for w, n in zip(widths, ls)]

    def line(cells, ls) -> str:
        parts = []
        for (_, justify), c, n, w in zip(columns, cells, ls, widths):
            pad = " " * (w - n)
            parts.append(f"  {c}{pad}  " if justify == "left" else f"  {pad}{c}  ")
        return "".join(parts)

    header = tuple(name for name, _ in columns)
    out.print(line(header, [len(h) for h in header]), style="bold", markup=False, highlight=False)
    out.file.write("".join(line(row, ls) + "\n" for row, ls in zip(rows, lens)))
    out.file.flush()
