"""A training run killed with SIGKILL (no chance to save) leaves only complete files and temp files
named after their output; it resumes from its last finished epoch and removes those temp files."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fixtures.generate import digits_imagefolder
from surgery.adapter.core import adapt
from surgery.trainer.state import LAST, load_checkpoint
from fixtures.factory import SIZE, load_factory, write_factory
from tests import REPO

# a training killed mid-run in a subprocess, then resumed: the slow tier (`pytest -m slow`)
pytestmark = pytest.mark.slow


def test_sigkill_mid_run_then_resume(tmp_path):
    arch = write_factory(tmp_path)
    data = digits_imagefolder(tmp_path / "data", classes=range(5, 10), per_class=40, size=SIZE)
    torch.manual_seed(0)
    adapt(load_factory(arch)(5).state_dict(), arch=arch, num_classes=5, input_size=SIZE, out=tmp_path / "ad",
          freeze="none")
    out = tmp_path / "run"
    args = [sys.executable, "-m", "cli.main", "train", str(tmp_path / "ad"), "--data", str(data), "--epochs", "40",
            "--lr", "1e-3", "--batch-size", "8", "--no-flip", "--out", str(out), "--quiet", "--trust-code"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = out / "checkpoints" / LAST
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:  # wait until at least two epochs are saved, then kill
            if last.is_file() and (out / "metrics.jsonl").is_file() and \
                    len((out / "metrics.jsonl").read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        t1 = time.monotonic()
        while time.monotonic() - t1 < 10 and proc.poll() is None:  # aim the kill at a write in flight
            if any(p.startswith(".") for d in (out, out / "checkpoints") for p in os.listdir(d)):
                break
            time.sleep(0.0005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved = load_checkpoint(last)  # whatever moment the kill hit, last.pt is a whole checkpoint
    done = int(saved["epoch"])
    assert 2 <= done < 40
    left = _check_left_after_kill(out)
    print("temp files the kill left:", left)
    # a kill mid-write of last.pt leaves what atomic_file left in flight; one more makes the case certain
    stale = out / "checkpoints" / f".{LAST}.k1LLed00.tmp"
    stale.write_bytes(b"half a checkpoint")
    r = subprocess.run(args[:args.index("--epochs") + 1] + [str(done + 2)] + args[args.index("--epochs") + 2:]
                       + ["--resume", "--json"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["epochs_run"] == done + 2
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs[-2:] == [done + 1, done + 2] and epochs == sorted(set(epochs))
    assert (out / "model.safetensors").is_file()
    remaining = [str(p.relative_to(out)) for p in out.rglob(".*")]
    assert not remaining, f"resume left temp files: {remaining} (the kill left {left})"


OUTPUT_FILES = {"metrics.jsonl", "run.log", "manifest.json", "model.safetensors", "load_report.json", "curves.png",
                "confusion.png", "failures.jsonl", "checkpoints", "checkpoints/last.pt", "checkpoints/best.pt"}
TEMP = re.compile(r"(?:(?P<dir>.*)/)?\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp")


def _check_left_after_kill(out: Path) -> list[str]:
    """Everything in OUT after SIGKILL is a complete output, or a temp file named after the output
    it was becoming (so a resume can recognise and remove it). Returns the temp files."""
    temps = []
    for p in sorted(out.rglob("*")):
        rel = str(p.relative_to(out))
        m = TEMP.fullmatch(rel)
        if m:
            target = (m["dir"] + "/" if m["dir"] else "") + m["name"]
            assert target in OUTPUT_FILES, f"temp file {rel} is for no output of a run"
            temps.append(rel)
            continue
        assert rel in OUTPUT_FILES, f"unexpected file {rel} after the kill"
        if rel.endswith(".pt"):
            load_checkpoint(p)
        elif rel.endswith(".jsonl"):
            [json.loads(line) for line in p.read_text().splitlines()]
        elif rel.endswith(".json"):
            json.loads(p.read_text())
    return temps
