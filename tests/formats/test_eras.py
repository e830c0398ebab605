"""Every era of torch's file format opens without torch.load and gives the tensors torch.load gives."""

from __future__ import annotations

import collections
import pickle
import pickletools
import tarfile

import pytest
import torch

import surgery
from fixtures import eras
from surgery.errors import FormatError, UnsafeCheckpointError

# fixture -> (format, container, weights-only loadable by torch): the tar era and whole modules
# are refused by torch's weights-only loader, so only those files (ours) load with full unpickling
ERAS = {
    "tar_pt": ("torch-tar", "", False),
    "lpips_v00_pth": ("torch-legacy", "", True),
    "legacy_v1_dp_pth": ("torch-legacy", "state_dict", True),
    "cifar_dp_th": ("torch-legacy", "state_dict", True),
    "legacy_pt": ("torch-legacy", "", True),
    "plain_pt": ("torch-zip", "", True),
}


def torch_reference(path, weights_only: bool) -> dict[str, torch.Tensor]:
    obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    return obj.get("state_dict", obj) if isinstance(obj, dict) else obj


def assert_bit_equal(ours: dict, ref: dict) -> None:
    assert list(ours) == list(ref)
    for k, v in ref.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        assert torch.equal(ours[k].view(torch.uint8) if v.dim() else ours[k], v.view(torch.uint8) if v.dim() else v), k


@pytest.mark.parametrize("name", list(ERAS))
def test_era_reads_like_torch(make, name):
    fmt, container, weights_only = ERAS[name]
    path = make(name)
    ckpt = surgery.open(path)
    assert (ckpt.format, ckpt.container) == (fmt, container)
    assert_bit_equal(ckpt.state_dict(), torch_reference(path, weights_only))


def test_tar_layout(make):
    """The tar has the four members torch <= 0.1.10 wrote, and torch's weights-only loader refuses it."""
    path = make("tar_pt")
    with tarfile.open(path) as tar:
        assert tar.getnames() == ["sys_info", "pickle", "tensors", "storages"]
    with pytest.raises(Exception, match="legacy .tar format"):
        torch.load(path, weights_only=True)


def test_tar_with_other_members_is_refused(tmp_path):
    import io

    path = tmp_path / "notes.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("readme.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(FormatError, match=r"a tar archive, but not a torch checkpoint .*readme\.txt"):
        surgery.open(path)


def test_python2_pickle_layout(make):
    """lpips's v0.0 vgg.pth: Python 2 strings, longs, _rebuild_tensor, a GPU-saved storage."""
    with open(make("lpips_v00_pth"), "rb") as f:
        import pickle

        for _ in range(3):
            pickle.load(f)
        ops = {(op.name, arg if isinstance(arg, str) else None) for op, arg, _ in pickletools.genops(f)}
    assert ("GLOBAL", "torch._utils _rebuild_tensor") in ops and ("GLOBAL", "torch FloatStorage") in ops
    assert ("SHORT_BINSTRING", "cuda:0") in ops and ("LONG1", None) in ops
    ckpt = surgery.open(make("lpips_v00_pth"))
    assert {t.device for t in ckpt.tensors.values()} == {"cuda:0"}


def test_cifar_dataparallel_th(make, cli):
    """The famous CIFAR ResNet .th layout: {'best_prec1', 'state_dict'} with module. keys, GPU-saved."""
    path = make("cifar_dp_th")
    ckpt = surgery.open(path)
    assert ckpt.extras == {"best_prec1": "91.73"}
    assert next(iter(ckpt.tensors)).startswith("module.")
    r = cli("inspect", path, "--depth", "0")
    assert r.exit_code == 0, r.stderr
    assert "resnet18: 102/102" in r.stdout and "cuda:0" in r.stdout


def test_legacy_whole_module_refused_then_read(make, cli):
    path = make("legacy_module_pt")
    with pytest.raises(UnsafeCheckpointError, match=r"whole pickled model.*--allow-global 'fixtures\.\*' --allow-global 'torch\.\*'"):
        surgery.open(path)
    r = cli("inspect", path)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    ckpt = surgery.open(path, allow_globals=["torch.*", "fixtures.*"])
    assert_bit_equal(ckpt.state_dict(), torch_reference(path, weights_only=False))


def test_remap_verify_every_era(make, cli, tmp_path):
    for name in ("tar_pt", "lpips_v00_pth", "cifar_dp_th"):
        out = tmp_path / f"{name}.safetensors"
        r = cli("remap", make(name), out, "--auto", "--verify")
        assert r.exit_code == 0, (name, r.stderr)
        assert out.is_file()


# ---------------------------------------------------------------- zip and link safety


def one_line_error(r) -> str:
    assert r.exit_code == 2, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_duplicate_zip_entry_is_refused(make, cli, tmp_path):
    """Python's zipfile reads the last data.pkl, torch the first: a payload could hide from inspect."""
    import zipfile

    src, bad = make("plain_pt"), tmp_path / "dup.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info.filename))
        zout.writestr("plain_pt/data.pkl", zin.read("plain_pt/data.pkl"))
    line = one_line_error(cli("inspect", bad))
    assert "holds 1 entry twice ('plain_pt/data.pkl')" in line


@pytest.mark.parametrize("delta", [-1, 1, -(1 << 20), 1 << 40])
def test_lying_central_directory_offset_is_one_line(make, cli, tmp_path, delta):
    import struct

    data = bytearray(make("plain_pt").read_bytes())
    z64 = data.rfind(b"PK\x06\x06")
    (off,) = struct.unpack("<Q", data[z64 + 48:z64 + 56])
    data[z64 + 48:z64 + 56] = struct.pack("<Q", max(0, off + delta) % (1 << 64))
    bad = tmp_path / "cd.pt"
    bad.write_bytes(bytes(data))
    one_line_error(cli("inspect", bad))


def _copy_tree(src, dst):
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_dcp_metadata_with_wrong_field_types_is_one_line(make, cli, tmp_path):
    import pickle

    folder = _copy_tree(make("dcp_dir"), tmp_path / "dcp")
    md = pickle.loads((folder / ".metadata").read_bytes())  # our own fixture: a full unpickle is fine
    for info in md.storage_data.values():
        info.offset = "zero"
    (folder / ".metadata").write_bytes(pickle.dumps(md))
    line = one_line_error(cli("inspect", folder))
    assert "DCP metadata has a field of the wrong type" in line


def test_dcp_file_linking_outside_is_refused(make, cli, tmp_path):
    folder = _copy_tree(make("dcp_dir"), tmp_path / "dcp")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for f in folder.glob("*.distcp"):
        target = outside / f.name
        f.rename(target)
        f.symlink_to(target)
    line = one_line_error(cli("inspect", folder))
    assert "outside the checkpoint's folder" in line


def test_shard_linking_outside_is_refused(make, cli, tmp_path):
    folder = _copy_tree(make("sharded_safetensors"), tmp_path / "shards")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shard = sorted(folder.glob("*.safetensors"))[0]
    shard.rename(outside / shard.name)
    shard.symlink_to(outside / shard.name)
    line = one_line_error(cli("inspect", folder))
    assert f"shard {shard.name} is a link to" in line and "outside the checkpoint's folder" in line


def test_hugging_face_cache_links_still_open(make, tmp_path):
    """A Hugging Face cache snapshot links every file, index included, into one blobs folder."""
    src = make("sharded_safetensors")
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        blob = blobs / f"sha{i}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(blob)
    assert len(surgery.open(snap).tensors) == len(surgery.open(src).tensors)


# ---------------------------------------------------------------- torch 0.3 whole models


class _Torch03Pickler(eras._EraPickler):
    """torch 0.2-0.3's ``Variable.__reduce_ex__``: a parameter pickles as ``Parameter(data)``, then
    BUILD with the state ``(requires_grad, volatile, _backward_hooks)``."""

    dispatch = eras._EraPickler.dispatch

    def reducer_override(self, obj):
        if isinstance(obj, torch.nn.Parameter):
            return torch.nn.Parameter, (obj.data,), (obj.requires_grad, False, collections.OrderedDict())
        return super().reducer_override(obj)


@pytest.fixture(params=[False, True], ids=["python3", "python2"])
def torch03_model(request, monkeypatch, tmp_path):
    """A whole model saved by torch 0.3's torch.save(model) (as VDSR's model_epoch_50.pth is), on
    Python 3 and on Python 2, one parameter frozen."""
    from fixtures.generate import tiny_model

    torch.manual_seed(0)
    model = tiny_model("tinynet")
    next(model.parameters()).requires_grad_(False)
    monkeypatch.setattr(eras, "_EraPickler", _Torch03Pickler)
    return eras.write_legacy(model, tmp_path / "model_epoch_50.pth", py2=request.param, tensors="v1", modules=True)


def test_torch03_whole_model_parameters_set_by_build(torch03_model, cli):
    ops = [op.name for op, _, _ in pickletools.genops(_object_pickle(torch03_model))]
    assert ops.count("BUILD") > ops.count("NEWOBJ")  # a BUILD per parameter, beside each module's
    line = one_line_error(cli("inspect", torch03_model))
    assert "--allow-global 'fixtures.*' --allow-global 'torch.*'" in line
    ckpt = surgery.open(torch03_model, allow_globals=["torch.*", "fixtures.*"])
    ref = torch.load(torch03_model, map_location="cpu", weights_only=False)  # our own file
    assert isinstance(ref, torch.nn.Module) and not next(ref.parameters()).requires_grad
    assert_bit_equal(ckpt.state_dict(), ref.state_dict())
    r = cli("inspect", torch03_model, "--allow-global", "torch.*", "--allow-global", "fixtures.*")
    assert r.exit_code == 0, r.stderr


@pytest.mark.parametrize("state", [(True, False, None), {"_backward_hooks": {}}])
def test_parameter_build_states_torch_wrote_are_read(state):
    from surgery.formats.torch_pickle import unpickle

    ref = unpickle(_parameter_pickle(pickle.dumps(state, protocol=2)[2:-1]), "p.pth").obj
    assert ref.shape == (2,) and ref.requires_grad is (state[0] if isinstance(state, tuple) else True)


@pytest.mark.parametrize("state", [(1, 2), ("yes", False, None), [True, False, None], {1: 2}])
def test_other_parameter_build_states_are_refused(state):
    from surgery.formats.torch_pickle import unpickle

    with pytest.raises(FormatError, match=r"sets state \(BUILD\) on a parameter that is not"):
        unpickle(_parameter_pickle(pickle.dumps(state, protocol=2)[2:-1]), "p.pth")


def _parameter_pickle(state: bytes) -> bytes:
    """``Parameter(_rebuild_tensor(storage, 0, (2,), (1,)))`` then BUILD with the pickled ``state``,
    opcode by opcode as torch 0.3 wrote a parameter."""
    def text(s: str) -> bytes:
        return pickle.BINUNICODE + len(s).to_bytes(4, "little") + s.encode()

    storage = (pickle.MARK + text("storage") + pickle.GLOBAL + b"torch\nFloatStorage\n" + text("0") + text("cpu")
               + pickle.BININT1 + b"\x02" + pickle.NONE + pickle.TUPLE + pickle.BINPERSID)
    tensor = (pickle.GLOBAL + b"torch._utils\n_rebuild_tensor\n" + pickle.MARK + storage + pickle.BININT1 + b"\x00"
              + pickle.BININT1 + b"\x02" + pickle.TUPLE1 + pickle.BININT1 + b"\x01" + pickle.TUPLE1 + pickle.TUPLE
              + pickle.REDUCE)
    return (pickle.PROTO + b"\x02" + pickle.GLOBAL + b"torch.nn.parameter\nParameter\n" + tensor + pickle.TUPLE1
            + pickle.REDUCE + state + pickle.BUILD + pickle.STOP)


def _object_pickle(path) -> bytes:
    """The object's pickle of a legacy file: the fourth of its pickles."""
    import io

    f = io.BytesIO(path.read_bytes())
    for _ in range(3):
        pickle.load(f)
    start = f.tell()
    pickletools.dis(f, out=io.StringIO())
    return path.read_bytes()[start:f.tell()]
