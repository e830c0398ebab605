"""Per-rank files a real 2-rank FSDP2 run saves (torchrun, gloo on the CPU: fixtures/fsdp_save.py
``perrank``), consolidated by `surgery remap` and compared bit for bit with the full tensors the run
gathered itself (``full_tensor()``). Slow tier: the run starts two ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_a_real_fsdp2_runs_rank_files_consolidate_to_its_full_tensors(tmp_path, cli):
    out = tmp_path / "ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "fixtures" / "fsdp_save.py"), "perrank", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["model_world_size_2_rank_0.pt", "model_world_size_2_rank_1.pt"]
    res = cli("remap", out, tmp_path / "full.safetensors", "--verify")
    assert res.exit_code == 0, res.output
    got, want = load_file(tmp_path / "full.safetensors"), torch.load(str(out) + ".ref.pt", weights_only=True)
    assert list(got) == list(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert "5.weight" in got and got["5.weight"].shape == (1, 6)  # rank 1's piece of it is empty
