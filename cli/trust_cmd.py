"""`surgery trust DIR [--repin]`: the factory file a folder runs, its pinned and current sha256."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from .common import console, escaped, handles_errors, print_json, shared_option


def register(app: typer.Typer) -> None:
    app.command("trust")(trust)


@handles_errors
def trust(
    folder: Annotated[Path, typer.Argument(help="An adapted folder or a trained run (manifest.json).", show_default=False)],
    repin: Annotated[bool, typer.Option("--repin", help="Pin the factory file's current sha256 in the manifest (after you reviewed the file).")] = False,
    as_json: Annotated[bool, shared_option("as_json")] = False,
) -> None:
    """Show the factory file DIR's manifest pins: its path, size, pinned and current sha256.

    A folder built from a factory file runs it only with --trust-code and only while the file's
    sha256 is the pinned one. After you edit the file and review the change, --repin records the
    new sha256; nothing is ever re-pinned without it, and this command runs no factory.

    Example: surgery trust run/ --repin
    """
    from surgery.trust import repin_factory, review_factory

    rep = repin_factory(folder) if repin else review_factory(folder)
    if as_json:
        print_json(rep.to_json())
        return
    out = console()
    for line in _lines(rep, folder):  # paths and names come from a folder under review: escaped
        out.print(escaped(line, markup=False), markup=False)


def _lines(rep, folder: Path) -> list[str]:
    if rep.status == "no-code":
        return [f"{rep.folder}: the model is {rep.arch}, rebuilt by name; it runs no code, nothing to trust"]
    head = f"{rep.folder}: the model is built by code ({rep.kind} {rep.arch}); it runs only with --trust-code"
    if rep.status == "not-a-file":
        return [head, "  not a file, so it is not pinned by hash: trust it only if you trust what it imports"]
    lines = [head]
    lines += [f"  looked at  {f['path']}: not there" for f in rep.files if not f["exists"]]
    if rep.status == "missing":
        return [*lines, "  the factory file is missing: put it back beside the folder, or re-run surgery adapt"]
    lines += [f"  file       {rep.factory} ({rep.size} bytes)",
              f"  pinned     sha256 {rep.pinned_sha256 or '(none)'}",
              f"  current    sha256 {rep.current_sha256}"]
    if rep.status == "matches":
        return [*lines, "the file is the one pinned; --trust-code runs it"]
    what = "was never pinned" if rep.status == "unpinned" else "changed since it was pinned"
    if rep.repinned:
        return [*lines, f"the file {what}; re-pinned: {rep.folder}/manifest.json now pins sha256 {rep.current_sha256}"]
    return [*lines, f"the file {what}; --trust-code refuses it until you review it and run: "
                    f"surgery trust {shlex.quote(str(folder))} --repin"]
