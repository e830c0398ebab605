from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

# One intra-op thread per process (the demo runs on one too), set before torch is imported and
# inherited by the CLI subprocesses tests start. The tests' models are tiny: a second thread gains
# nothing on an idle machine, and on a busy one the two threads wait on each other at every op
# (the trainer tests took three times the CPU time and wall time on two threads under load).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): one worker per core for the default tier, whose tests each
    use one thread. The slow tier (``-m slow``) runs in this process, one test at a time: its
    SIGKILL and disk-full races, torchrun's ranks and the timed replays start processes of their
    own and must not share the cores with another test. ``-n 0`` runs any selection in-process."""
    expr = (config.option.markexpr or "").replace(" ", "")
    if "slow" in expr and "notslow" not in expr:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, 8)


@pytest.fixture(scope="session")
def make(tmp_path_factory):
    """Build a named fixture (see fixtures/generate.py) once per test session; returns its path."""
    from fixtures.generate import build

    root = tmp_path_factory.mktemp("fixtures")
    cache: dict[str, Path] = {}

    def _make(name: str) -> Path:
        if name not in cache:
            cache[name] = build(name, root / name)
        return cache[name]

    return _make


@pytest.fixture
def cli():
    """Run the real CLI in-process: cli(*args) -> result with .exit_code, .stdout, .stderr."""
    from cli.main import app

    runner = CliRunner(env={"NO_COLOR": "1", "COLUMNS": "200"})

    def _run(*args: str):
        return runner.invoke(app, [str(a) for a in args])

    return _run


@pytest.fixture(scope="session", autouse=True)
def quick_plots():
    """Every training run draws its curves and confusion matrix (and lr-find and compare-scratch
    theirs). Drawn at 20 dpi without the constrained-layout pass, the same figures, axes, marks and
    PNG files cost half as much. Tests marked ``real_plots`` (the plots' own tests, compare-scratch,
    the end-to-end fine-tune) draw them as users get them. Session-wide, so that module fixtures
    that train draw quickly too."""
    from surgery.trainer import plots

    real = getattr(plots, "_figure", None)
    if real is None:
        yield None
        return

    def _figure(width: float, height: float):
        from matplotlib.figure import Figure

        return Figure(figsize=(width, height), dpi=20)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "_figure", _figure)
        yield real


@pytest.fixture(autouse=True)
def _real_plots_when_marked(request, quick_plots, monkeypatch):
    if quick_plots is not None and request.node.get_closest_marker("real_plots"):
        from surgery.trainer import plots

        monkeypatch.setattr(plots, "_figure", quick_plots)
