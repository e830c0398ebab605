"""Two processes on gloo (CPU): `surgery train --nproc 2` launches torchrun; rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

from fixtures.generate import digits_imagefolder
from surgery.adapter.core import adapt, load_adapted
from fixtures.factory import SIZE, load_factory, write_factory
from tests import REPO

warnings.filterwarnings("ignore", category=UserWarning)
ROOT = REPO
# torchrun starts two worker processes: the slow tier (`pytest -m slow`)
pytestmark = pytest.mark.slow


def test_ddp_two_processes_on_cpu(tmp_path):
    arch = write_factory(tmp_path)
    data = digits_imagefolder(tmp_path / "data", classes=range(5, 10), per_class=20, size=SIZE)  # 100 images
    torch.manual_seed(0)
    adapt(load_factory(arch)(5).state_dict(), arch=arch, num_classes=5, input_size=SIZE, out=tmp_path / "ad",
          freeze="head-only", unfreeze_at=1)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "cli.train_cmd", str(tmp_path / "ad"), "--data", str(data), "--epochs", "2",
           "--lr", "5e-3", "--out", str(out), "--batch-size", "16", "--device", "cpu", "--nproc", "2", "--json", "--trust-code"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout[p.stdout.index("{"):])  # rank 0 alone prints
    assert res["world_size"] == 2 and res["epochs_run"] == 2 and not res["cache_used"]
    assert [m["phase"] for m in res["metrics"]] == ["head only", "all"]
    sd = load_file(str(out / "model.safetensors"))
    assert not any(k.startswith("module.") for k in sd)
    model = load_adapted(out, trust_code=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    assert "x2 processes" in (out / "run.log").read_text()
