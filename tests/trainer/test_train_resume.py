"""--resume continues the same run: arguments restored from the checkpoint, differences refused."""

from __future__ import annotations

import json
import re
import shlex
import warnings

import pytest
import torch
from safetensors.torch import load_file

from surgery import train
from surgery.errors import ResumeError, TrainInterrupted
from fixtures.factory import SIZE, adapted_factory_folder

warnings.filterwarnings("ignore", category=UserWarning)

# everything but the defaults: a resumed run that dropped one of them would compute something else
RUN = dict(trust_code=True, epochs=3, lr=4e-3, batch_size=8, seed=5, image_size=SIZE + 4, flip=False, label_smoothing=0.1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return root, adapted_factory_folder(root, 8, freeze="head-only", unfreeze_at=1, bn="train")


def _interrupt_after(epoch: int):
    def obs(event, info):
        if event == "epoch_end" and info["epoch"] == epoch:
            raise KeyboardInterrupt
    return obs


def test_the_printed_command_continues_the_same_run(cli, setup, tmp_path):
    root, data = setup
    full = train(root / "ad", data, out=tmp_path / "full", **RUN)
    with pytest.raises(TrainInterrupted) as ei:
        train(root / "ad", data, out=tmp_path / "cut", observer=_interrupt_after(1), **RUN)
    command = re.search(r"continue with: (surgery train .*--resume(?: --trust-code)?)", str(ei.value)).group(1)
    assert "--image-size" not in command  # nothing to repeat: the checkpoint holds the arguments
    argv = shlex.split(command)[1:]
    r = cli(*argv, "--json")
    assert r.exit_code == 0, r.output
    resumed = json.loads(r.stdout)
    assert resumed["schema"] == "surgery.train/1"
    assert [m["val_loss"] for m in resumed["metrics"]] == [m["val_loss"] for m in full.metrics]
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = (tmp_path / "cut" / "run.log").read_text()
    restored = re.search(r"from the checkpoint: (.*)", log).group(1).split(", ")
    assert {"--lr 0.004", "--seed 5", "--batch-size 8", "--image-size 20", "--no-flip"} <= set(restored)


def test_a_different_argument_is_refused_naming_both_values(cli, setup, tmp_path):
    root, data = setup
    with pytest.raises(TrainInterrupted):
        train(root / "ad", data, out=tmp_path / "cut", observer=_interrupt_after(1), **RUN)
    before = (tmp_path / "cut" / "checkpoints" / "last.pt").read_bytes()
    r = cli("train", "--trust-code", root / "ad", "--data", data, "--out", tmp_path / "cut", "--resume", "--batch-size", 16,
            "--lr", "1e-3")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
    assert "--batch-size 16 (the run was started with --batch-size 8)" in r.stderr
    assert "--lr 0.001 (the run was started with --lr 0.004)" in r.stderr
    assert (tmp_path / "cut" / "checkpoints" / "last.pt").read_bytes() == before
    with pytest.raises(ResumeError, match=r"seed=1 \(the run was started with seed=5\)"):
        train(root / "ad", data, out=tmp_path / "cut", resume=True, seed=1, trust_code=True)


def test_more_epochs_extend_the_run_and_stretch_the_schedule(setup, tmp_path):
    root, data = setup
    with pytest.raises(TrainInterrupted):
        train(root / "ad", data, out=tmp_path / "cut", observer=_interrupt_after(1), **RUN)
    lrs: list[float] = []
    res = train(root / "ad", data, out=tmp_path / "cut", resume=True, epochs=5, trust_code=True,
                observer=lambda e, i: lrs.append(i["lrs"][-1]) if e == "step" else None)
    assert res.epochs_run == 5
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] > 0  # cosine over 5 epochs: still decaying at the end
    assert "--epochs 5 (the run was started with 3)" in (tmp_path / "cut" / "run.log").read_text()
