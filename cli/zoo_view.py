"""`surgery inspect` over many checkpoints: a table, or JSON Lines, with a progress bar on a TTY."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext

from .common import console, escaped, human_bytes, human_count


def run(paths: list[str], *, as_json: bool, workers: int | None, **options) -> int:
    """Scan ``paths``; print the rows; return the exit code: 0 when every checkpoint was read,
    2 when any was not (its error is a row of its own)."""
    from surgery.inspection.zoo_scan import scan

    if not as_json and (options.get("keys") or options.get("filter") is not None):
        from surgery.errors import InputError

        raise InputError("--keys/--filter list one checkpoint's tensors; with many checkpoints add --json "
                         "(each line then holds its 'tensors')")
    found = scan(paths, workers=workers, **options)
    if not len(found):
        from surgery.errors import InputError

        raise InputError(f"{' '.join(paths)[:200]}: no checkpoints found: {_skipped(found.skipped)}, no sharded or DCP "
                         f"folder (a file is a checkpoint when its first bytes are safetensors, a torch zip, a legacy "
                         f"torch pickle or a torch tar, whatever its name)")
    rows, failed = [], 0
    with _progress(len(found)) as advance:
        for row in found:
            failed += not row.ok
            if as_json:
                sys.stdout.write(json.dumps(row.to_json(), default=str) + "\n")
                sys.stdout.flush()
            else:
                rows.append(row)
            advance()
    if not as_json:
        _table(rows)
        if found.skipped:
            sys.stdout.write(_skipped(found.skipped) + "\n")
        return 2 if failed else 0
    if found.skipped:  # stdout holds only the rows' JSON lines
        sys.stderr.write(_skipped(found.skipped) + "\n")
    if failed:
        sys.stderr.write(f"error: {failed} of {len(found)} checkpoints could not be read (the lines with an \"error\")\n")
    return 2 if failed else 0


def _skipped(paths: list[str]) -> str:
    return f"{len(paths)} file{'' if len(paths) == 1 else 's'} skipped (not checkpoints)"


def _progress(total: int):
    """advance() per row; a transient bar on stderr when it is a terminal, else nothing."""
    if not sys.stderr.isatty() or total < 2:
        return nullcontext(lambda: None)
    from contextlib import contextmanager

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    @contextmanager
    def bar():
        with Progress(TextColumn("inspecting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console(stderr=True), transient=True) as p:
            task = p.add_task("scan", total=total)
            yield lambda: p.advance(task)

    return bar()


def _arch(data: dict) -> str:
    guesses = data.get("architecture") or []
    if guesses and guesses[0]["score"] >= 0.5:
        return f"{guesses[0]['arch']} ({guesses[0]['score']:.2f})"
    return "-"


COLUMNS = ("path", "format", "tensors", "params", "size", "dtypes", "architecture", "status")
RIGHT = {"tensors", "params", "size"}


def _cells(r) -> list[str]:
    if not r.ok:
        return [escaped(r.path, markup=False), "-", "-", "-", "-", "-", "-", "error"]
    d = r.data
    return [escaped(r.path, markup=False), d["format"], str(d["tensor_count"]), human_count(d["param_count"]),
            human_bytes(d["file_size"]), escaped(",".join(d["dtypes"]), markup=False), _arch(d), "ok"]


def _table(rows: list) -> None:
    """Plain aligned columns, never wrapped or cut: a long path widens its column, so that the
    lines stay one per checkpoint for grep and awk."""
    out = sys.stdout
    cells = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    for line in cells:
        out.write("  ".join(c.rjust(w) if name in RIGHT else c.ljust(w)
                            for c, w, name in zip(line, widths, COLUMNS)).rstrip() + "\n")
    failed = [r for r in rows if not r.ok]
    out.write(f"{len(rows)} checkpoints: {len(rows) - len(failed)} read, {len(failed)} failed\n")
    out.flush()
    for r in failed:
        sys.stderr.write(f"error: {escaped(r.error, markup=False)}\n")
