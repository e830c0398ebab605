"""Every fixture format opens without torch.load and gives the same tensors torch.load gives."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

import surgery
from surgery.errors import FormatError, RuleError, SelectError, UnsafeCheckpointError
from surgery.formats import FOLDER, FORMATS
from tests import REPO as REPO_PATH

REPO = str(REPO_PATH)

# fixture name -> (format, container, first-key prefix)
CASES = {
    "plain_pt": ("torch-zip", "", ""),
    "dataparallel_pt": ("torch-zip", "", "module."),
    "ddp_pt": ("torch-zip", "", "module."),
    "compiled_pt": ("torch-zip", "", "_orig_mod."),
    "compiled_dataparallel_pt": ("torch-zip", "", "_orig_mod.module."),
    "dataparallel_compiled_pt": ("torch-zip", "", "module._orig_mod."),
    "lightning_ckpt": ("torch-zip", "state_dict", "model."),
    "timm_ema_pth": ("torch-zip", "state_dict", ""),
    "nested_pt": ("torch-zip", "model.state_dict", ""),
    "legacy_pt": ("torch-legacy", "", ""),
    "legacy_cuda_pt": ("torch-legacy", "", ""),
    "zip_cuda_pt": ("torch-zip", "", ""),
    "fp16_safetensors": ("safetensors", "", ""),
    "bf16_safetensors": ("safetensors", "", ""),
    "plain_safetensors": ("safetensors", "", ""),
    "tied_pt": ("torch-zip", "", ""),
    "tied_view_pt": ("torch-zip", "", ""),
    "sharded_safetensors": ("safetensors-index", "", ""),
    "sharded_bin": ("safetensors-index", "", ""),
    "hf_bin": ("torch-zip", "", ""),
    "dcp_dir": ("torch-dcp", "", ""),
    "dcp_hf_dir": ("torch-dcp-hf", "", ""),
    "zero_dir": ("deepspeed-zero", "", ""),
    "per_rank_dir": ("torch-per-rank", "", ""),
    "tar_pt": ("torch-tar", "", ""),
    "torchscript_pt": ("torchscript", "", ""),
}


def reference(path, container, fmt):
    """What torch itself loads, for parity."""
    if os.path.isdir(path):
        per_rank = any(n.startswith("model_world_size_") for n in os.listdir(path))
        if os.path.exists(os.path.join(path, "latest")) or per_rank:  # ZeRO, per-rank files: the full tensors beside it
            return torch.load(str(path) + ".ref.pt", weights_only=True)
        if os.path.exists(os.path.join(path, ".metadata")):
            from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

            out = os.path.join(os.path.dirname(path), os.path.basename(path) + ".ref.pt")
            if not os.path.exists(out):
                dcp_to_torch_save(path, out)
            return torch.load(out, weights_only=True)
        if any(p.startswith("shard-") for p in os.listdir(path)):  # the Hugging Face layout: torch's reader
            return _hf_dcp_reference(path)
        import json

        index = next(p for p in os.listdir(path) if p.endswith(".index.json"))
        wm = json.load(open(os.path.join(path, index)))["weight_map"]
        sd = {}
        for shard in dict.fromkeys(wm.values()):
            sp = os.path.join(path, shard)
            if shard.endswith(".safetensors"):
                from safetensors.torch import load_file

                sd.update(load_file(sp))
            else:
                sd.update(torch.load(sp, weights_only=True, map_location="cpu"))
        return sd
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load is deprecated, still the reference
            return torch.jit.load(path, map_location="cpu").state_dict()
    # torch's weights-only loader refuses the tar era: our own fixture loads with full unpickling
    obj = torch.load(path, weights_only=fmt != "torch-tar", map_location="cpu")
    for part in container.split(".") if container else []:
        obj = obj[part]
    return obj


def _hf_dcp_reference(path):
    """torch's HuggingFaceStorageReader, loading into tensors shaped as the pieces say."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    md = HuggingFaceStorageReader(str(path)).read_metadata()
    into = {k: torch.zeros(tuple(m.size), dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.load(into, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=True)
    return into


@pytest.mark.parametrize("name", sorted(CASES))
def test_open_matches_torch(make, name):
    fmt, container, prefix = CASES[name]
    path = make(name)
    ckpt = surgery.open(path)
    assert ckpt.format == fmt
    assert ckpt.format in FORMATS
    assert ckpt.container == container
    assert all(k.startswith(prefix) for k in ckpt.tensors)
    ref = reference(path, container, fmt)
    assert list(ckpt.tensors) == list(ref) or set(ckpt.tensors) == set(ref)
    sd = ckpt.state_dict()
    for k, v in ref.items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=0, equal_nan=True)
        assert sd[k].dtype == v.dtype and sd[k].device.type == "cpu"


def test_every_registered_format_has_a_case():
    assert {fmt for fmt, _, _ in CASES.values()} == set(FORMATS)


# every output suffix of every writable format, from the registry
WRITTEN = [(f.name, suffix) for f in FORMATS.values() if f.writer for suffix in f.suffixes]


@pytest.mark.parametrize(("fmt", "suffix"), WRITTEN)
def test_each_output_suffix_writes_its_format(make, tmp_path, fmt, suffix):
    dst = tmp_path / ("out" if suffix == FOLDER else f"out{suffix}")
    report = surgery.remap(make("tied_pt"), dst, [])
    assert report.dst_format == fmt and surgery.open(dst).format == fmt
    ref = torch.load(make("tied_pt"), weights_only=True)
    back = surgery.open(dst).state_dict()
    assert list(back) == list(ref) and all(torch.equal(back[k], v) for k, v in ref.items())


def test_an_unknown_output_suffix_names_every_writable_one(make, tmp_path):
    known = [s for f in FORMATS.values() for s in f.suffixes if s != FOLDER]
    with pytest.raises(RuleError, match=re.escape(", ".join(known))):
        surgery.remap(make("plain_pt"), tmp_path / "out.onnx", [])
    assert all(not f.suffixes for f in FORMATS.values() if f.writer is None)


def test_other_entries_are_reported(make):
    ckpt = surgery.open(make("lightning_ckpt"))
    assert ckpt.extras["epoch"] == "3"
    assert ckpt.extras["optimizer_states"].startswith("list")
    timm = surgery.open(make("timm_ema_pth"))
    assert "state_dict_ema" in timm.containers and "state_dict_ema" in timm.extras


def test_select_picks_the_ema_copy(make):
    path = make("timm_ema_pth")
    plain = surgery.open(path)
    ema = surgery.open(path, select="state_dict_ema")
    assert ema.container == "state_dict_ema" and set(ema.tensors) == set(plain.tensors)
    ref = torch.load(path, weights_only=True)["state_dict_ema"]
    k = next(k for k, v in ref.items() if v.is_floating_point())
    torch.testing.assert_close(ema.tensor(k), ref[k], rtol=0, atol=0)
    with pytest.raises(SelectError, match="names no tensor dict.*state_dict_ema"):
        surgery.open(path, select="nope")


def test_cuda_tagged_storages_open_on_cpu(make):
    for name in ("legacy_cuda_pt", "zip_cuda_pt"):
        ckpt = surgery.open(make(name))
        assert {t.device for t in ckpt.tensors.values()} == {"cuda:0"}
        assert all(v.device.type == "cpu" for v in ckpt.state_dict().values())


def test_tied_tensors_are_detected(make):
    ckpt = surgery.open(make("tied_pt"))
    groups = ckpt.tied_groups()
    assert groups and all(len(g) == 2 for g in groups)
    sd = ckpt.state_dict()
    a, b = groups[0]
    assert sd[a] is sd[b]
    assert ckpt.num_params == sum(t.numel for t in ckpt.unique_tensors())


def test_unsafe_globals_are_named_not_run(make, tmp_path):
    path = make("timm_args_pth")
    with pytest.raises(UnsafeCheckpointError, match=r"argparse\.Namespace.*--allow-global argparse\.Namespace"):
        surgery.open(path)
    ckpt = surgery.open(path, allow_globals=["argparse.Namespace"])
    assert ckpt.container == "state_dict"
    assert ckpt.extras["args"] == "argparse.Namespace (opaque)"


@pytest.mark.parametrize("name", ["malicious_pickle_pt", "malicious_legacy_pt"])
def test_malicious_pickle_never_runs(tmp_path, name):
    from fixtures.generate import build

    marker = tmp_path / "PWNED"
    path = build(name, tmp_path / "evil", marker=marker)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        surgery.open(path)
    # even an explicit allow only yields an inert record: nothing is imported or called
    surgery.open(path, allow_globals=["posix.system", "os.system"])
    assert not marker.exists()


def test_lfs_pointer_says_fetch(make):
    with pytest.raises(FormatError, match="Git LFS pointer.*git lfs pull"):
        surgery.open(make("lfs_pointer"))


def test_metadata_paths_do_not_import_torch(make):
    paths = [make("plain_pt"), make("plain_safetensors"), make("sharded_safetensors"), make("legacy_pt")]
    code = ("import sys, surgery\n"
            f"for p in {[str(p) for p in paths]!r}:\n"
            "    c = surgery.open(p); assert len(c.tensors) > 0\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_whole_pickled_model_is_read_without_running_it(tmp_path, cli):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    model[1].register_buffer("scratch", torch.ones(1), persistent=False)
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(UnsafeCheckpointError, match=r"whole pickled model.*--allow-global 'torch\.\*'"):
        surgery.open(path)
    ckpt = surgery.open(path, allow_globals=["torch.*"])
    ref = model.state_dict()
    assert list(ckpt.tensors) == list(ref)  # the non-persistent buffer is left out, as state_dict does
    for k, v in ckpt.state_dict().items():
        assert torch.equal(v, ref[k])
    r = cli("remap", path, tmp_path / "w.safetensors", "--allow-global", "torch.*", "--verify")
    assert r.exit_code == 0, r.stderr
