"""The fixture generator writes what each fixture name promises, deterministically."""

from __future__ import annotations

import argparse
import json
import pickle
import re
import zipfile
from pathlib import Path

import pytest
import torch

from fixtures.generate import KINDS, build, digits_imagefolder, make_large_checkpoint, tiny_model

MOBILENET = "mobilenet_v3_small"
LEGACY_SIGNATURE = b"\x80\x02\x8a\x0a"  # pickle protocol 2, then a 10-byte long: the magic number
# Legacy files name storages by memory address and DCP metadata holds a fresh uuid: only their
# tensors are reproducible. Every other file must come out byte-identical.
NOT_BYTE_EXACT = {"legacy_pt", "legacy_cuda_pt", "malicious_legacy_pt", "dcp_dir/.metadata",
                  # torch.jit.save draws a random serialization id and numbers re-scripted classes
                  "torchscript_pt", "torchscript_traced_pt", "torchscript_nested_pt", "torchscript_resnet18_pt"}


def load(path: Path, **kw):
    return torch.load(path, map_location="cpu", weights_only=True, **kw)


def assert_same(a, b, where="") -> None:
    """Nested containers equal; tensors equal in dtype, shape and values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fx")
    marker = root / "PWNED"
    out = {name: build(name, root, **({"marker": marker} if name.startswith("malicious") else {})) for name in KINDS}
    out["_marker"] = marker
    return out


@pytest.fixture(scope="module")
def mobilenet_sd():
    return tiny_model(MOBILENET).state_dict()


@pytest.fixture(scope="module")
def tinynet_sd():
    return tiny_model("tinynet").state_dict()


def test_registry_names():
    assert set(KINDS) == {
        "plain_pt", "resnet18_pt", "dataparallel_pt", "ddp_pt", "compiled_pt", "compiled_dataparallel_pt",
        "dataparallel_compiled_pt", "lightning_ckpt", "timm_ema_pth", "timm_args_pth", "nested_pt",
        "legacy_pt", "legacy_cuda_pt", "zip_cuda_pt", "plain_safetensors", "fp16_safetensors",
        "bf16_safetensors", "sharded_safetensors", "sharded_bin", "hf_bin", "lfs_pointer", "tied_pt",
        "tied_view_pt", "dcp_dir", "dcp_hf_dir", "malicious_pickle_pt", "malicious_legacy_pt", "digits_imagefolder",
        "tar_pt", "lpips_v00_pth", "cifar_dp_th", "legacy_v1_dp_pth", "legacy_module_pt", "torchscript_pt",
        "torchscript_traced_pt", "torchscript_nested_pt", "torchscript_resnet18_pt", "zero_dir", "per_rank_dir",
    }
    with pytest.raises(KeyError, match="unknown fixture 'nope'"):
        build("nope", Path("unused"))


def test_tiny_model_is_seeded():
    assert_same(tiny_model(MOBILENET).state_dict(), tiny_model(MOBILENET).state_dict())


@pytest.mark.parametrize("name, prefix, arch", [
    ("plain_pt", "", MOBILENET),
    ("resnet18_pt", "", "resnet18"),
    ("hf_bin", "", MOBILENET),
    ("dataparallel_pt", "module.", MOBILENET),
    ("ddp_pt", "module.", "tinynet"),
    ("compiled_pt", "_orig_mod.", MOBILENET),
    ("compiled_dataparallel_pt", "_orig_mod.module.", MOBILENET),
    ("dataparallel_compiled_pt", "module._orig_mod.", MOBILENET),
])
def test_wrapped_state_dicts(built, name, prefix, arch):
    path = built[name]
    assert zipfile.is_zipfile(path)
    sd = load(path)
    ref = tiny_model(arch).state_dict()
    assert list(sd) == [prefix + k for k in ref]
    assert_same({k[len(prefix):]: v for k, v in sd.items()}, dict(ref))


def test_file_names(built):
    assert built["plain_pt"].name == "plain_pt.pt"
    assert built["resnet18_pt"].suffix == ".pth"
    assert built["lightning_ckpt"].suffix == ".ckpt"
    assert built["hf_bin"].name == "pytorch_model.bin"
    assert load(built["resnet18_pt"])["fc.weight"].shape == (10, 512)


def test_lightning_ckpt(built, mobilenet_sd):
    ckpt = load(built["lightning_ckpt"])
    assert ckpt["epoch"] == 3 and ckpt["global_step"] == 120
    assert ckpt["pytorch-lightning_version"] == "2.4.0"
    assert ckpt["hyper_parameters"] == {"lr": 0.001, "num_classes": 10}
    assert ckpt["callbacks"] == {}
    assert list(ckpt["state_dict"]) == ["model." + k for k in mobilenet_sd]
    opt = ckpt["optimizer_states"][0]
    n_params = len(list(tiny_model(MOBILENET).parameters()))
    assert len(opt["state"]) == n_params and set(opt["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt["param_groups"][0]["lr"] == 0.001
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 1
    # one real step moved the weights away from the seeded init
    w = "features.0.0.weight"
    assert not torch.equal(ckpt["state_dict"]["model." + w], mobilenet_sd[w])


def test_timm_checkpoints(built, mobilenet_sd):
    ckpt = load(built["timm_ema_pth"])
    assert {"epoch", "arch", "state_dict", "state_dict_ema", "optimizer", "version"} <= set(ckpt)
    assert ckpt["epoch"] == 5 and ckpt["version"] == 2 and ckpt["arch"] == MOBILENET
    sd, ema = ckpt["state_dict"], ckpt["state_dict_ema"]
    assert list(sd) == list(ema) == list(mobilenet_sd)
    for k, v in sd.items():
        assert ema[k].shape == v.shape and ema[k].dtype == v.dtype
    assert not torch.equal(sd["classifier.3.weight"], ema["classifier.3.weight"])
    torch.testing.assert_close(sd["classifier.3.weight"], ema["classifier.3.weight"], atol=0.1, rtol=0)
    assert "momentum_buffer" in ckpt["optimizer"]["state"][0]

    with pytest.raises(pickle.UnpicklingError, match="argparse"):
        load(built["timm_args_pth"])
    # allow-listing the one global is enough: the rest is plain tensors and containers
    with torch.serialization.safe_globals([argparse.Namespace]):
        args_ckpt = load(built["timm_args_pth"])
    assert args_ckpt["args"] == argparse.Namespace(lr=0.1, model=MOBILENET)
    assert_same({k: v for k, v in args_ckpt.items() if k != "args"}, ckpt)


def test_nested_pt(built, mobilenet_sd):
    obj = load(built["nested_pt"])
    assert set(obj) == {"model", "meta"} and obj["meta"] == {"epoch": 1}
    assert_same(dict(obj["model"]["state_dict"]), dict(mobilenet_sd))


def test_legacy_and_cuda_tags(built):
    cpu, cuda, zcuda = built["legacy_pt"], built["legacy_cuda_pt"], built["zip_cuda_pt"]
    for path in (cpu, cuda):
        assert path.read_bytes().startswith(LEGACY_SIGNATURE) and not zipfile.is_zipfile(path)
    assert b"cuda:0" not in cpu.read_bytes()
    assert b"cuda:0" in cuda.read_bytes()
    with zipfile.ZipFile(zcuda) as zf:
        pkl = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    assert b"cuda:0" in pkl and b"cpu" not in pkl
    ref = load(cpu)
    assert {v.dtype for v in ref.values()} == {torch.float32, torch.float16, torch.int64}
    assert ref["fc.weight"].dtype == torch.float16
    for path in (cuda, zcuda):
        assert_same(load(path), ref)
        if not torch.cuda.is_available():
            with pytest.raises(RuntimeError, match="CUDA"):
                torch.load(path, weights_only=True)


def test_safetensors(built, mobilenet_sd):
    from safetensors import safe_open
    from safetensors.torch import load_file

    for name, dtype in (("plain_safetensors", torch.float32), ("fp16_safetensors", torch.float16),
                        ("bf16_safetensors", torch.bfloat16)):
        with safe_open(built[name], "pt") as f:
            assert f.metadata() == {"format": "pt"}
        sd = load_file(built[name])
        assert set(sd) == set(mobilenet_sd)
        for k, v in sd.items():
            assert v.dtype == (dtype if mobilenet_sd[k].is_floating_point() else torch.int64), k
            assert torch.equal(v, mobilenet_sd[k].to(v.dtype)), k


@pytest.mark.parametrize("name, stem, ext", [("sharded_safetensors", "model", ".safetensors"),
                                             ("sharded_bin", "pytorch_model", ".bin")])
def test_sharded(built, mobilenet_sd, name, stem, ext):
    from safetensors.torch import load_file

    root = built[name]
    shards = [f"{stem}-{i:05d}-of-00003{ext}" for i in (1, 2, 3)]
    assert sorted(p.name for p in root.iterdir()) == sorted(shards + [f"{stem}{ext}.index.json"])
    index = json.loads((root / f"{stem}{ext}.index.json").read_text())
    assert set(index["weight_map"]) == set(mobilenet_sd)
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in mobilenet_sd.values())
    merged = {}
    for shard in shards:
        sd = load_file(root / shard) if ext == ".safetensors" else load(root / shard)
        assert sd and all(index["weight_map"][k] == shard for k in sd)
        merged.update(sd)
    assert_same({k: merged[k] for k in mobilenet_sd}, dict(mobilenet_sd))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_dir(built, tinynet_sd):
    import torch.distributed.checkpoint as dcp

    root = built["dcp_dir"]
    assert sorted(p.name for p in root.iterdir()) == [".metadata", "__0_0.distcp"]
    # the .distcp file is one torch.save zip per tensor, concatenated; .metadata holds the offsets
    assert (root / "__0_0.distcp").read_bytes()[:4] == b"PK\x03\x04"
    out = {k: torch.empty_like(v) for k, v in tinynet_sd.items()}
    dcp.load(out, checkpoint_id=root, no_dist=True)
    assert_same(out, dict(tinynet_sd))


def test_lfs_pointer(built):
    path = built["lfs_pointer"]
    assert path.name == "model.safetensors"
    assert re.fullmatch(r"version https://git-lfs\.github\.com/spec/v1\noid sha256:[0-9a-f]{64}\nsize 12345\n",
                        path.read_text())


def test_tied_pt(built):
    sd = load(built["tied_pt"])
    assert sd["decoder.weight"] is not sd["embed.weight"]
    assert sd["decoder.weight"].untyped_storage().data_ptr() == sd["embed.weight"].untyped_storage().data_ptr()
    with zipfile.ZipFile(built["tied_pt"]) as zf:
        assert sum("/data/" in n for n in zf.namelist()) == 3  # embed (shared), norm.weight, norm.bias


def test_tied_view_pt(built):
    sd = load(built["tied_view_pt"])
    w, t = sd["encoder.weight"], sd["decoder.weight"]
    assert not t.is_contiguous() and t.shape == (8, 16) and torch.equal(t, w.t())
    ptr = w.untyped_storage().data_ptr()
    for k in ("decoder.weight", "tail.weight", "tail_t.weight"):
        assert sd[k].untyped_storage().data_ptr() == ptr, k
    assert sd["tail.weight"].storage_offset() == 64 and torch.equal(sd["tail_t.weight"], w[8:].t())
    with zipfile.ZipFile(built["tied_view_pt"]) as zf:
        assert sum("/data/" in n for n in zf.namelist()) == 2  # w and the bias


def test_malicious_files_are_refused(built):
    # These files are never unpickled here with weights_only=False: that would run the payload.
    marker = built["_marker"]
    zip_path, legacy_path = built["malicious_pickle_pt"], built["malicious_legacy_pt"]
    with zipfile.ZipFile(zip_path) as zf:
        pkl = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    assert b"system" in pkl and str(marker).encode() in pkl
    assert legacy_path.read_bytes().startswith(LEGACY_SIGNATURE) and b"system" in legacy_path.read_bytes()
    for path in (zip_path, legacy_path):
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path, weights_only=True)
    assert not marker.exists()


def test_malicious_default_marker(tmp_path):
    path = build("malicious_pickle_pt", tmp_path)
    with zipfile.ZipFile(path) as zf:
        assert str(tmp_path / "PWNED").encode() in zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_make_large_checkpoint(tmp_path, fmt):
    path = make_large_checkpoint(tmp_path / f"big.{fmt}", fmt, n_tensors=3, rows=5, cols=7)
    names = [f"module.layers.{i}.weight" for i in range(3)]
    if fmt == "safetensors":
        from safetensors.torch import load_file

        sd = load_file(path)
        assert path.stat().st_size > 3 * 5 * 7 * 4
    else:
        with zipfile.ZipFile(path) as zf:
            assert zf.testzip() is None  # the CRCs were patched after filling the records
        sd = load(path)
        assert_same(load(path, mmap=True), sd)
    assert sorted(sd) == names
    for i, name in enumerate(names):
        assert_same(sd[name], torch.full((5, 7), float(i)))


def test_make_large_checkpoint_chunks(tmp_path):
    # rows that do not divide into the chunk size, so the last chunk is partial
    path = make_large_checkpoint(tmp_path / "big.pt", "pt", n_tensors=2, rows=1000, cols=3000, prefix="")
    assert_same(load(path)["layers.1.weight"], torch.ones(1000, 3000))
    with pytest.raises(ValueError, match="fmt"):
        make_large_checkpoint(tmp_path / "x", "npz", 1, 1, 1)


def test_digits_imagefolder(built):
    from PIL import Image

    root = built["digits_imagefolder"]
    counts = {split: {d.name: len(list(d.glob("*.png"))) for d in (root / split).iterdir()} for split in ("train", "val")}
    assert sorted(counts["train"]) == sorted(counts["val"]) == [str(c) for c in range(10)]
    assert sum(counts["train"].values()) + sum(counts["val"].values()) == 1797
    for c in counts["train"]:
        total = counts["train"][c] + counts["val"][c]
        assert counts["val"][c] == round(total * 0.2)
    with Image.open(next((root / "val" / "3").glob("*.png"))) as img:
        assert img.size == (32, 32) and img.mode == "RGB"
    train = {p.name for p in (root / "train" / "3").glob("*.png")}
    assert not train & {p.name for p in (root / "val" / "3").glob("*.png")}


def test_digits_subset(tmp_path):
    from PIL import Image

    root = digits_imagefolder(tmp_path, classes=[3, 7], per_class=10, size=16)
    assert sorted(p.name for p in (root / "train").iterdir()) == ["3", "7"]
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    assert len(files) == 20 and sum(f.startswith("val/") for f in files) == 4
    with Image.open(next(root.rglob("*.png"))) as img:
        assert img.size == (16, 16)


def test_determinism(built, tmp_path):
    """A second build gives identical bytes, or identical tensors where the format embeds
    addresses or uuids."""
    marker = built["_marker"]
    for name in KINDS:
        first = built[name]
        second = build(name, tmp_path, **({"marker": marker} if name.startswith("malicious") else {}))
        pairs = ([(first, second)] if first.is_file() else
                 [(p, second / p.relative_to(first)) for p in sorted(first.rglob("*")) if p.is_file()])
        assert len(pairs) == (1 if second.is_file() else sum(p.is_file() for p in second.rglob("*"))), name
        for a, b in pairs:
            rel = a.relative_to(first.parent).as_posix()
            if name in NOT_BYTE_EXACT or rel in NOT_BYTE_EXACT:
                continue
            assert a.read_bytes() == b.read_bytes(), rel
    for name in ("legacy_pt", "legacy_cuda_pt"):
        assert_same(load(built[name]), load(tmp_path / built[name].name))


def test_cli(tmp_path, capsys):
    from fixtures.generate import main

    assert main(["--list"]) == 0
    listed = capsys.readouterr().out.split("\n")
    assert [line.split()[0] for line in listed if line] == list(KINDS)
    assert main([str(tmp_path), "--only", "lfs_pointer", "tied_pt"]) == 0
    assert (tmp_path / "tied_pt.pt").is_file() and (tmp_path / "lfs_pointer" / "model.safetensors").is_file()
