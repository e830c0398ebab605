"""Ctrl-C during `surgery train ... --compare-scratch`: the printed command finishes the comparison
(the pretrained run, then the scratch run from the same seeded init, then compare.json) exactly
as an uninterrupted run writes it."""

from __future__ import annotations

import json
import re
import shlex
import warnings
from pathlib import Path

import pytest

import surgery
from surgery.errors import ResumeError, TrainInterrupted
from fixtures.factory import adapted_factory_folder

warnings.filterwarnings("ignore", category=UserWarning)

RUN = dict(trust_code=True, epochs=2, lr=1e-2, batch_size=16, flip=False, seed=3)
CURVES = ("train_loss", "val_loss", "val_acc")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The adapted folder, its data, and the comparison run without interruption."""
    root = tmp_path_factory.mktemp("compare_resume")
    data = adapted_factory_folder(root, 8, freeze="head-only")
    full = surgery.compare_scratch(root / "ad", data, out=root / "full", **RUN)
    return root, data, full


def _interrupt(run: str | None, event: str, epoch: int | None = None):
    """An observer that presses Ctrl-C at ``event`` of the pretrained (None) or scratch run."""
    def obs(e, info):
        if e == event and info.get("run") == run and (epoch is None or info["epoch"] == epoch):
            raise KeyboardInterrupt
    return obs


def _command(err: TrainInterrupted) -> list[str]:
    command = re.search(r"continue with: (surgery train .*?--resume[^(;]*?)(?: \(|$)", str(err)).group(1)
    return shlex.split(command)[1:]


def _curves(folder) -> list[tuple]:
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return [tuple(r[k] for k in CURVES) for r in rows]


def _same_comparison(out, full: dict) -> None:
    rep = json.loads((out / "compare.json").read_text())
    for side in ("pretrained", "scratch"):
        for k in ("best_epoch", "best_val_acc", "best_val_loss", "epochs_run"):
            assert rep[side][k] == full[side][k], (side, k)
    assert rep["verdict"] == full["verdict"]
    full_out = Path(full["pretrained"]["out"])
    assert _curves(out / "scratch") == _curves(full_out / "scratch")
    assert _curves(out) == _curves(full_out)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(m)["scratch_val_acc"] is not None for m in lines)
    assert (out / "compare.png").stat().st_size > 1000
    assert not list(out.glob(".scratch-init-*"))


def test_ctrl_c_in_the_scratch_run_is_finished_by_the_printed_command(cli, setup, tmp_path):
    root, data, full = setup
    out = tmp_path / "cut"
    with pytest.raises(TrainInterrupted) as ei:
        surgery.compare_scratch(root / "ad", data, out=out, observer=_interrupt("scratch", "epoch_end", 1), **RUN)
    assert "scratch" in str(ei.value) and not (out / "compare.json").exists()
    argv = _command(ei.value)
    assert argv[-3:] == ["--resume", "--compare-scratch", "--trust-code"] and "--epochs" not in argv
    # the scratch run's log names the comparison's command too, not the scratch run's own
    assert f"continue with: surgery {shlex.join(argv)}" in (out / "scratch" / "run.log").read_text()
    r = cli(*argv, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == json.loads((out / "compare.json").read_text())
    _same_comparison(out, full)
    assert "resumed from" in (out / "scratch" / "run.log").read_text()


@pytest.mark.slow  # two more interrupted comparisons, each resumed: about 15 s
def test_ctrl_c_in_the_pretrained_run_resumes_both_in_python(setup, tmp_path):
    root, data, full = setup
    out = tmp_path / "cut"
    with pytest.raises(TrainInterrupted) as ei:
        surgery.compare_scratch(root / "ad", data, out=out, observer=_interrupt(None, "epoch_end", 1), **RUN)
    assert _command(ei.value)[-3:] == ["--resume", "--compare-scratch", "--trust-code"]
    assert not (out / "scratch").exists()
    # the scratch run starts with the arguments the pretrained run saved (seed 3, batch 16, ...), not defaults
    surgery.compare_scratch(root / "ad", data, out=out, resume=True, trust_code=True)
    _same_comparison(out, full)


@pytest.mark.slow  # two more interrupted comparisons, each resumed: about 15 s
def test_ctrl_c_before_the_scratch_run_saved_anything_starts_it_again(cli, setup, tmp_path):
    root, data, full = setup
    out = tmp_path / "cut"
    with pytest.raises(TrainInterrupted, match="pretrained run is done") as ei:
        surgery.compare_scratch(root / "ad", data, out=out, observer=_interrupt("scratch", "start"), **RUN)
    r = cli(*_command(ei.value))
    assert r.exit_code == 0, r.output
    assert "pretrained run in" in r.stdout and "had finished" in r.stdout and "verdict:" in r.stdout
    _same_comparison(out, full)
    # everything finished: the comparison stands and is written again, the same
    before = json.loads((out / "compare.json").read_text())
    r = cli(*_command(ei.value), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == before


def test_resume_path_with_compare_scratch_is_refused_in_one_line(cli, setup, tmp_path):
    root, data, _ = setup
    last = root / "full" / "checkpoints" / "last.pt"
    r = cli("train", "--trust-code", root / "ad", "--data", data, "--out", tmp_path / "x", "--compare-scratch",
            "--resume", last)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
    assert "the PATH after --resume" in r.stderr and not (tmp_path / "x").exists()
    with pytest.raises(ResumeError, match="pass resume=True"):
        surgery.compare_scratch(root / "ad", data, out=tmp_path / "x", resume=str(last), trust_code=True)


def test_the_scratch_init_is_made_again_the_same_from_the_seed(setup, tmp_path):
    """What resuming the scratch run relies on: no init is kept between the two processes."""
    import torch
    from safetensors.torch import load_file

    from surgery.trainer.compare import scratch_init

    root, _, _ = setup
    a, b = (load_file(str(scratch_init(root / "ad", tmp_path / name, 3, trust_code=True) / "model.safetensors"))
            for name in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
