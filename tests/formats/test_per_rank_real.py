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


def _fsdp1_run(tmp_path: Path, mode: str, ranks: int) -> Path:
    out = tmp_path / mode
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           str(ROOT / "fixtures" / "fsdp_save.py"), mode, str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [f"pytorch_model_fsdp_0_rank{k}.bin" for k in range(ranks)]
    return out


@pytest.mark.parametrize("ranks", [2, 3])
def test_fsdp1_sharded_state_dicts_saved_a_file_a_rank_consolidate_to_the_full_tensors(tmp_path, cli, ranks):
    """accelerate's per-rank names, FSDP1's SHARDED_STATE_DICT (ShardedTensors): 3 ranks cut 7 rows unevenly."""
    out = _fsdp1_run(tmp_path, "fsdp1-sharded", ranks)
    res = cli("remap", out, tmp_path / "full.safetensors", "--verify", "--json")
    assert res.exit_code == 0, res.output
    got, want = load_file(tmp_path / "full.safetensors"), torch.load(str(out) + ".ref.pt", weights_only=True)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    # a rank's file replaced by another rank's: its shards are not the ones the metadata gives it
    (out / "pytorch_model_fsdp_0_rank1.bin").write_bytes((out / "pytorch_model_fsdp_0_rank0.bin").read_bytes())
    res = cli("inspect", out)
    assert res.exit_code == 2 and "metadata does not give rank 1" in res.output, res.output
    (out / f"pytorch_model_fsdp_0_rank{ranks - 1}.bin").unlink()
    res = cli("remap", out, tmp_path / "again.safetensors")
    assert res.exit_code == 2 and not (tmp_path / "again.safetensors").exists(), res.output


def test_fsdp1_local_state_dicts_consolidate_to_the_flat_parameter_and_say_so(tmp_path, cli):
    out = _fsdp1_run(tmp_path, "fsdp1-local", 2)
    res = cli("inspect", out)
    assert res.exit_code == 0 and "LOCAL_STATE_DICT" in res.output, res.output
    res = cli("remap", out, tmp_path / "flat.safetensors")
    assert res.exit_code == 0, res.output
    want = torch.load(str(out) + ".ref.pt", weights_only=True)
    flat = load_file(tmp_path / "flat.safetensors")["_flat_param"]
    assert torch.equal(flat, torch.cat([t.flatten() for t in want.values()]))
