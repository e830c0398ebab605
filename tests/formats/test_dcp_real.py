"""Checkpoints written by real distributed runs (torchrun, gloo on the CPU: fixtures/fsdp_save.py),
consolidated by `surgery remap` and compared, tensor by tensor and bit for bit, with torch's own
``dcp_to_torch_save``. Slow tier: each case starts two or four ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures.distributed import reference

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """saved(kind, ranks): that run's folder, run once per module (each run starts its ranks)."""
    done: dict[str, Path] = {}

    def _get(kind: str, ranks: int) -> Path:
        if kind not in done:
            done[kind] = _save(kind, ranks, tmp_path_factory.mktemp("runs") / kind)
        return done[kind]

    return _get


def _save(kind: str, ranks: int, out: Path) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           str(ROOT / "fixtures" / "fsdp_save.py"), kind, str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.parametrize("kind,ranks,split", [("fsdp2", 2, [[0]]), ("2d", 4, [[0], [0, 1]]), ("fsdp1", 2, [[0]])])
def test_a_real_sharded_run_consolidates_as_torchs_converter_does(tmp_path, cli, saved, kind, ranks, split):
    src = saved(kind, ranks)
    r = cli("inspect", src, "--json")
    assert r.exit_code == 0, r.output
    cert = json.loads(r.stdout)["certificate"]
    assert cert["complete"] and cert["ranks"] == ranks
    assert sorted(map(list, {tuple(d) for d in cert["split"].values()})) == split
    r = cli("remap", src, tmp_path / "one.safetensors", "--verify")
    assert r.exit_code == 0, r.output
    ref, got = reference(src)["model"], load_file(tmp_path / "one.safetensors")
    assert list(got) == list(ref)
    for name in ref:
        assert got[name].dtype == ref[name].dtype and torch.equal(got[name], ref[name]), name


def test_the_optimizer_state_of_a_real_run_is_selectable(tmp_path, cli, saved):
    src = saved("fsdp2", 2)
    data = json.loads(cli("inspect", src, "--json").stdout)
    assert data["container"] == "model" and data["containers"] == ["model", "optim"]
    r = cli("remap", src, tmp_path / "optim.safetensors", "--select", "optim")
    assert r.exit_code == 0, r.output
    ref = reference(src)["optim"]["state"]
    got = load_file(tmp_path / "optim.safetensors")
    for param, state in ref.items():
        for key, value in state.items():
            assert torch.equal(got[f"state.{param}.{key}"], value), (param, key)


def test_a_written_dcp_folder_seeds_a_fully_sharded_model(tmp_path, cli, saved):
    src = saved("fsdp2", 2)
    assert cli("remap", src, tmp_path / "model.safetensors").exit_code == 0
    assert cli("remap", tmp_path / "model.safetensors", tmp_path / "seed", "--format", "dcp").exit_code == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "fixtures" / "fsdp_save.py"), "load", str(tmp_path / "seed"), str(tmp_path / "model.safetensors")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "seed.loaded").read_text().split(",") == sorted(load_file(tmp_path / "model.safetensors"))


def test_torchs_hugging_face_layout_of_a_real_run_consolidates_as_torch_reads_it(tmp_path, cli, saved):
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    src = saved("hf", 2)
    r = cli("remap", src, tmp_path / "one.safetensors", "--verify")
    assert r.exit_code == 0, r.output
    got = load_file(tmp_path / "one.safetensors")
    ref = {k: torch.zeros_like(v) for k, v in got.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(ref, storage_reader=HuggingFaceStorageReader(str(src)), no_dist=True)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
