"""`surgery remap SRC DST --format dcp`: a torch.distributed.checkpoint folder torch loads, as
``torch_save_to_dcp`` writes one (a real FSDP2 load on 2 ranks is in test_dcp_real.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from fixtures.distributed import reference


@pytest.fixture
def weights(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"conv.weight": torch.randn(4, 3, 3, 3, generator=g), "fc.weight": torch.randn(5, 6, generator=g).half(),
          "fc.bias": torch.zeros(0), "bn.num_batches_tracked": torch.tensor(3), "emb": torch.randn(2, 7).bfloat16()}
    save_file(sd, tmp_path / "model.safetensors")
    return tmp_path / "model.safetensors", sd


def test_a_written_dcp_folder_loads_in_torch_and_converts_back(weights, cli, tmp_path):
    src, sd = weights
    r = cli("remap", src, tmp_path / "seed", "--format", "dcp", "--verify")
    assert r.exit_code == 0, r.output
    assert "wrote torch-dcp" in r.stdout and "verified bit for bit" in r.stdout
    into = {k: torch.full_like(v, 9) if v.is_floating_point() else torch.zeros_like(v) for k, v in sd.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.load(into, checkpoint_id=str(tmp_path / "seed"), no_dist=True)
    ref = reference(tmp_path / "seed")
    for k, v in sd.items():
        assert into[k].dtype == v.dtype and torch.equal(into[k], v), k
        assert torch.equal(ref[k], v), k
    assert cli("remap", tmp_path / "seed", tmp_path / "back.safetensors").exit_code == 0
    back = load_file(tmp_path / "back.safetensors")
    assert all(torch.equal(back[k], v) for k, v in sd.items())


def test_format_is_checked_and_a_foreign_folder_is_not_replaced(weights, cli, tmp_path):
    src, _ = weights
    r = cli("remap", src, tmp_path / "x", "--format", "onnx")
    assert r.exit_code == 2 and "--format 'onnx': choose one of safetensors, folder, pt, dcp" in r.output
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    r = cli("remap", src, theirs, "--format", "dcp", "--force")
    assert r.exit_code == 2 and (theirs / "notes.txt").read_text() == "keep me"
    assert cli("remap", src, tmp_path / "ours", "--format", "dcp").exit_code == 0
    r = cli("remap", src, tmp_path / "ours", "--format", "dcp", "--force")
    assert r.exit_code == 0, r.output
