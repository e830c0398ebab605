"""`surgery demo`: the README's table has the structure the demo prints and says, there and in
docs/benchmarks.md, what a run on any machine shows (who wins, beyond the noise; figures within a few
standard errors, text exact); the demo runs in-process, imports no test fixtures, and names its optional
dependency when it is missing."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner
from tests import REPO
from tests.cli.readme_claims import README, line_holds, pages, same_accuracy, same_winner, validation_images

ROOT = REPO
SCRATCH, HEAD, TWO = "from scratch", "head only", "two phases (head, then all)"


def _table(text: str) -> tuple[str, list[str], dict[str, dict[str, str]]]:
    """The comparison table's title, columns and rows (run name -> column -> cell, stripped), from the
    README or the demo's output."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("digits 5-9, "))
    header = [c.strip() for c in lines[start + 1].split("┃")]
    rows = {}
    for line in lines[start + 3:]:
        if "│" not in line:
            break
        cells = [c.strip() for c in line.split("│")]
        rows[cells[0]] = dict(zip(header, cells))
    return lines[start].strip(), header, rows


def _readme_table() -> tuple[str, list[str], dict[str, dict[str, str]]]:
    return _table(re.search(r"```text\n(digits 5-9.*?)```", README.read_text(), re.S).group(1))


def _docs_text(*names: str) -> str:
    """The README and the docs/ pages (or those named), whitespace folded: what they say about the demo."""
    return " ".join(" ".join(text.split()) for page, text in pages() if not names or page.name in names)


def _cells_differ(shown: dict[str, str], got: dict[str, str], n: int) -> list[str]:
    """What a run's row says otherwise than the README's: names, epochs and blank cells exact, the
    accuracy within a few standard errors on n images, the best epoch one of the row's epochs, a time."""
    off = [c for c in ("run", "epochs") if shown[c] != got[c]]
    if not same_accuracy(float(shown["val accuracy"]), float(got["val accuracy"]), n):
        off.append("val accuracy")
    span = re.search(r"\((\d+)-(\d+)\)$", got["run"])  # a phase's row: its epochs, numbered as in the run
    first, last = (int(span.group(1)), int(span.group(2))) if span else (1, int(got["epochs"]))
    if not first <= int(got["best epoch"]) <= last:
        off.append("best epoch")
    if (shown["time in epochs"] == "") != (got["time in epochs"] == "") or \
            got["time in epochs"] and not re.fullmatch(r"[0-9]+\.[0-9] s", got["time in epochs"]):
        off.append("time in epochs")
    return [f"{shown['run']}: {c} {shown[c]!r} vs {got[c]!r}" for c in off]


def _winners_differ(shown: dict, got: dict, n: int) -> list[str]:
    """Who wins in the README's table wins in the run: each pretrained run against scratch, and the
    two-phase run after its unfreeze against its own head phase (a collapse cannot hide there)."""
    def acc(rows: dict, start: str) -> float:
        return float(next(row for name, row in rows.items() if name.startswith(start))["val accuracy"])

    pairs = [(HEAD, SCRATCH), (TWO, SCRATCH), ("after unfreeze (", "head phase (")]
    return [f"{a.rstrip(' (')} vs {b.rstrip(' (')}" for a, b in pairs if not same_winner((acc(shown, a), acc(shown, b)),
                                                                (acc(got, a), acc(got, b)), n)]


@pytest.mark.slow
def test_the_readme_table_is_what_the_demo_prints(tmp_path, monkeypatch):
    from cli.main import app

    title, header, rows = _readme_table()
    monkeypatch.chdir(tmp_path)  # the README's paths are relative to where the demo runs
    r = CliRunner(env={"NO_COLOR": "1", "COLUMNS": "200"}).invoke(app, ["demo"])
    assert r.exit_code == 0, r.output
    got_title, got_header, got = _table(r.stdout)
    assert (got_title, got_header, list(got)) == (title, header, list(rows)), r.stdout[-3000:]
    n = validation_images(title)
    off = [d for run in rows for d in _cells_differ(rows[run], got[run], n)] + _winners_differ(rows, got, n)
    assert not off, f"{off}\n{r.stdout[-3000:]}"
    # the narration says what train did
    assert "trained the head on cached backbone features" in r.stdout  # the head-only run, as step 7 says
    assert "feature cache off: " in r.stdout  # the two-phase run: its backbone trains later
    # the scratch row is --compare-scratch's, and the pages on the demo quote its verdict: same words, size within
    # the noise
    quoted = set(re.findall(r"`(verdict: [^`]*)`", _docs_text("README.md", "benchmarks.md")))
    assert quoted
    verdict = [line for line in r.stdout.splitlines() if line.startswith("verdict: ")]
    for claim in quoted:
        assert line_holds(claim, verdict, n) is None, (claim, verdict)


def test_the_readme_table_has_the_demo_structure_and_says_where_it_comes_from():
    from cli.demo_cmd import COLUMNS, RUNS
    from surgery.demo import Plan

    title, header, rows = _readme_table()
    plan = Plan.for_data(20)
    phases = (f"head phase (1-{plan.unfreeze_at})", f"after unfreeze ({plan.unfreeze_at + 1}-{plan.epochs})")
    assert tuple(header) == COLUMNS and tuple(rows) == (*RUNS, *phases)
    assert validation_images(title) == 200
    # the phases' rows have their own best, no time of their own
    assert [bool(rows[run]["time in epochs"]) for run in rows] == [True, True, True, False, False]
    assert all(rows[run]["val accuracy"] and rows[run]["best epoch"] for run in rows)
    assert "same on every run and every machine" not in _docs_text()
    assert "`surgery demo` on a 2-core x86-64 machine" in " ".join(README.read_text().split())


def _run(folder, epochs: list[tuple[float, float | None]], best_epoch: int):
    """A run folder as train writes it: the results in manifest.json, one line per epoch in metrics.jsonl."""
    folder.mkdir(parents=True)
    best = max(max(a, e or 0) for a, e in epochs)
    (folder / "manifest.json").write_text(json.dumps({"results": {"val_acc": best, "best_epoch": best_epoch}}))
    lines = [{"epoch": i + 1, "phase": "x", "val_acc": a, "val_loss": 1.0, "seconds": 0.5}
             | ({"ema_val_acc": e} if e is not None else {}) for i, (a, e) in enumerate(epochs)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    return folder


def test_the_table_shows_the_head_phase_and_the_unfreeze_apart(tmp_path):
    from cli.demo_cmd import RUNS, table_rows

    # the head phase peaks at 0.955; the unfreeze (after epoch 2) collapses: best epoch 2 alone would hide it
    two = _run(tmp_path / "two", [(0.9, None), (0.955, None), (0.395, None), (0.6, 0.62)], best_epoch=2)
    scratch = _run(tmp_path / "scratch", [(0.5, None), (0.8, None), (0.7, None), (0.75, None)], best_epoch=2)
    head = _run(tmp_path / "head", [(0.9, None), (0.97, None)], best_epoch=2)
    rows = table_rows({RUNS[0]: (scratch, 4, None), RUNS[1]: (head, 2, None), RUNS[2]: (two, 4, 2)})
    assert rows == [(RUNS[0], "4", "0.800", "2", "2.0 s"), (RUNS[1], "2", "0.970", "2", "1.0 s"),
                    (RUNS[2], "4", "0.955", "2", "2.0 s"),
                    ("  head phase (1-2)", "2", "0.955", "2", ""), ("  after unfreeze (3-4)", "2", "0.620", "4", "")]


def test_the_new_task_is_on_images_the_checkpoint_never_saw(tmp_path):
    from surgery.demo import digits_imagefolder

    def names(half):
        root = digits_imagefolder(tmp_path / str(half), classes=[5], size=8, half=half)
        return {f.name for f in root.rglob("*.png")}

    first, second, every = names(0), names(1), names(None)
    assert first and second and not first & second
    assert first | second == every


def test_the_demo_names_its_optional_dependency(cli, tmp_path, monkeypatch):
    for name in ("sklearn", "sklearn.datasets"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    r = cli("demo", "--workdir", tmp_path / "w")
    assert r.exit_code == 2
    assert r.stderr == ("error: the demo's images come from scikit-learn, which is not installed; "
                        "pip install 'surgery[demo]'\n")


def test_the_cli_imports_no_test_fixtures():
    code = ("import sys, cli.main, cli.demo_cmd, surgery.demo; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fixtures', 'tests', 'sklearn')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
