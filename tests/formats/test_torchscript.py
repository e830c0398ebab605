"""TorchScript archives: weights named as torch.jit.load(f).state_dict() names them, no code run."""

from __future__ import annotations

import warnings
import zipfile

import pytest
import torch

import surgery
from surgery.errors import FormatError

SCRIPTED = ["torchscript_pt", "torchscript_traced_pt", "torchscript_nested_pt", "torchscript_resnet18_pt"]


def jit_state_dict(path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu").state_dict()


@pytest.mark.parametrize("name", SCRIPTED)
def test_reads_like_jit_load(make, name):
    path = make(name)
    ckpt = surgery.open(path)
    assert ckpt.format == "torchscript"
    ours, ref = ckpt.state_dict(), jit_state_dict(path)
    assert list(ours) == list(ref)
    for k, v in ref.items():
        assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), k


def test_nested_buffers_and_attributes(make):
    """Parameters, buffers (TorchScript keeps non-persistent ones in its state dict), submodules;
    plain attributes (a float, a list, a string) are not tensors and are left out."""
    names = list(surgery.open(make("torchscript_nested_pt")).tensors)
    assert names[:5] == ["bias", "block.offset", "block.cache", "block.lin.weight", "block.lin.bias"]
    assert "head.1.num_batches_tracked" in names and not any("scale" in n or "sizes" in n for n in names)


def test_no_code_runs_and_no_global_is_refused(make, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def guarded(name, *a, **kw):
        assert not name.startswith("__torch__"), name
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", guarded)
    ckpt = surgery.open(make("torchscript_resnet18_pt"))
    assert len(ckpt.tensors) == 122


def test_inspect_and_remap(make, cli, tmp_path):
    path = make("torchscript_resnet18_pt")
    r = cli("inspect", path, "--depth", "0")
    assert r.exit_code == 0, r.stderr
    assert "torchscript" in r.stdout and "resnet18: 102/102" in r.stdout
    out = tmp_path / "r18.safetensors"
    r = cli("remap", path, out, "--verify")
    assert r.exit_code == 0, r.stderr
    from safetensors.torch import load_file

    ref = jit_state_dict(path)
    got = load_file(out)
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def test_adapt_scripted_resnet18(make, tmp_path):
    model, report = surgery.adapt(make("torchscript_resnet18_pt"), arch="resnet18", num_classes=4,
                                  freeze="head-only", out=tmp_path / "r18-4")
    ref = jit_state_dict(make("torchscript_resnet18_pt"))
    assert torch.equal(model.state_dict()["layer4.1.conv2.weight"], ref["layer4.1.conv2.weight"])
    assert model.fc.out_features == 4


def test_missing_code_is_one_line(make, tmp_path):
    src = make("torchscript_pt")
    bad = tmp_path / "nocode.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            if "/code/" not in info.filename:
                zout.writestr(info, zin.read(info.filename))
    with pytest.raises(FormatError, match=r"TorchScript archive has no code for class __torch__\.fixtures"):
        surgery.open(bad)


def test_old_model_json_archive_is_refused(tmp_path):
    bad = tmp_path / "old.pt"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("old/model.json", "{}")
        z.writestr("old/code/old.py", "op_version_set = 0\n")
    with pytest.raises(FormatError, match=r"TorchScript archive of torch < 1\.4 \(model\.json\)"):
        surgery.open(bad)
