"""What `surgery train` looks like: in a real terminal (tmux), piped, and with NO_COLOR."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torchvision

from fixtures.generate import digits_imagefolder
from surgery.adapter.core import adapt
from tests import REPO

warnings.filterwarnings("ignore", category=UserWarning)
ROOT = REPO


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("term")
    data = digits_imagefolder(root / "data", classes=range(5, 10), per_class=5, size=32)
    torch.manual_seed(0)
    adapt(dict(torchvision.models.mnasnet0_5(num_classes=10).state_dict()), arch="mnasnet0_5", num_classes=5,
          input_size=32, out=root / "ad", freeze="head-only", unfreeze_at=1)
    return root, data


# what the run says before and after the epochs: it must reach the screen, not only run.log
HEADER = ("classes (5): 5, 6, 7, 8, 9", "images: 20 train, 5 val", "feature cache off: ", "best epoch ")


def _train_args(root: Path, data: Path, out: Path) -> list[str]:
    return ["train", str(root / "ad"), "--data", str(data), "--epochs", "2", "--lr", "1e-3", "--batch-size", "8",
            "--out", str(out)]


def test_piped_output_is_plain_text_without_padding(cli, setup, tmp_path):
    root, data = setup
    r = cli(*_train_args(root, data, tmp_path / "run"))
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert all(line == line.rstrip() for line in lines), [line for line in lines if line != line.rstrip()]
    assert "\x1b[" not in r.stdout
    for want in HEADER:
        assert any(want in line for line in lines), (want, r.stdout)
    assert any(line.startswith("epoch 1 [head only] train loss") for line in lines)
    # metrics.jsonl: which groups were frozen, and the lr they trained at (0 while frozen)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["frozen"]["head"] is False and metrics[0]["lr"]["head"] > 0
    backbone = [g for g, f in metrics[0]["frozen"].items() if f]
    assert backbone and all(metrics[0]["lr"][g] == 0.0 for g in backbone)
    assert not any(metrics[1]["frozen"].values()) and all(v > 0 for v in metrics[1]["lr"].values())
    r = cli("evaluate", tmp_path / "run", "--data", data)
    assert r.exit_code == 0 and all(line == line.rstrip() for line in r.stdout.splitlines())


def _tmux(tmp_path: Path, argv: list[str], env: dict[str, str]) -> str:
    """Run ``python -m cli.main ARGV`` in a detached 120x40 tmux session; the screen at exit."""
    sock = str(tmp_path / "tmux.sock")
    done = tmp_path / "done"
    exports = " ".join(f"{k}={v}" for k, v in env.items())
    cmd = (f"cd {ROOT} && env {exports} {sys.executable} -m cli.main {' '.join(argv)} 2>&1; "
           f"touch {done}; sleep 30")
    subprocess.run(["tmux", "-S", sock, "new-session", "-d", "-x", "120", "-y", "40", cmd], check=True)
    try:
        deadline = time.monotonic() + 300
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        return subprocess.run(["tmux", "-S", sock, "capture-pane", "-p", "-e", "-S", "-200"], check=True,
                              capture_output=True, text=True).stdout
    finally:
        subprocess.run(["tmux", "-S", sock, "kill-server"], capture_output=True)


@pytest.mark.slow  # a real terminal: tmux, polled until the run ends
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux for a real terminal")
@pytest.mark.parametrize("no_color", [False, True])
def test_in_a_terminal_log_lines_print_above_the_progress_bar(setup, tmp_path, no_color):
    root, data = setup
    env = {"TERM": "xterm-256color", "OMP_NUM_THREADS": "1"}
    if no_color:
        env["NO_COLOR"] = "1"
    screen = _tmux(tmp_path, _train_args(root, data, tmp_path / "run"), env)
    for want in HEADER:
        assert want in screen, (want, screen)
    assert "epoch 1/2 [head only]" in screen or no_color  # the progress bar's label keeps its tag
    assert "epoch 1 [head only] train loss" in screen
    assert ("\x1b[" in screen) != no_color, screen  # colour on a terminal, none with NO_COLOR
