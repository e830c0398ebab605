"""Paths: a shard index never leads outside its folder or to another format; DST is checked first."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

import surgery
from surgery.errors import FormatError, OutputError, SurgeryError
from tests import REPO


@pytest.fixture
def sharded(make, tmp_path):
    src = make("sharded_safetensors")
    dst = tmp_path / "sharded"
    shutil.copytree(src, dst)
    return dst


def _rewrite(index_dir, shard_name):
    p = index_dir / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    first = next(iter(idx["weight_map"]))
    idx["weight_map"][first] = shard_name
    p.write_text(json.dumps(idx))
    return p


@pytest.mark.parametrize("name", ["../x.safetensors", "../../../../etc/passwd", "/etc/passwd", "sub/x.safetensors",
                                  "", ".", "..", "a/../../x.safetensors"])
def test_index_naming_paths_outside_is_refused(sharded, tmp_path, name):
    (tmp_path / "x.safetensors").write_bytes((sharded / "model-00001-of-00003.safetensors").read_bytes())
    _rewrite(sharded, name)
    with pytest.raises(FormatError, match="refusing to follow|missing|not a plain file"):
        surgery.open(sharded)


def test_index_naming_absolute_path_to_a_real_shard(sharded, tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((sharded / "model-00001-of-00003.safetensors").read_bytes())
    _rewrite(sharded, str(outside))
    with pytest.raises(FormatError, match="not a plain file name"):
        surgery.open(sharded)


@pytest.mark.parametrize("kind", ["legacy", "index", "dcp-folder", "text", "symlink-out"])
def test_index_naming_another_file_type_is_refused(sharded, make, tmp_path, kind):
    if kind == "legacy":
        shutil.copy(make("legacy_pt"), sharded / "other.bin")
    elif kind == "index":
        (sharded / "other.bin").write_text(json.dumps({"weight_map": {"a": "other.bin"}}))
    elif kind == "dcp-folder":
        (sharded / "other.bin").mkdir()
        (sharded / "other.bin" / ".metadata").write_bytes(b"\x80\x02}.")
    elif kind == "text":
        (sharded / "other.bin").write_text("hello")
    else:  # a plain name that is a symlink out of the folder: it must still be a shard format
        (tmp_path / "secret.txt").write_text("secret")
        (sharded / "other.bin").symlink_to(tmp_path / "secret.txt")
    _rewrite(sharded, "other.bin")
    with pytest.raises(SurgeryError) as info:
        surgery.open(sharded)
    assert "\n" not in info.value.one_line()


def test_remap_refuses_dst_symlink_to_input(make, tmp_path, cli):
    src = tmp_path / "in.safetensors"
    shutil.copy(make("plain_safetensors"), src)
    before = src.read_bytes()
    link = tmp_path / "out.safetensors"
    link.symlink_to(src)
    for extra in ([], ["--force"]):
        with pytest.raises(OutputError, match="source"):
            surgery.remap(src, link, [], force=bool(extra))
        r = cli("remap", src, link, *extra)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "source" in r.stderr
    assert src.read_bytes() == before and link.is_symlink()


def test_remap_refuses_dst_symlink_to_a_shard(sharded, tmp_path):
    link = tmp_path / "o.safetensors"
    link.symlink_to(sharded / "model-00002-of-00003.safetensors")
    with pytest.raises(OutputError, match="source"):
        surgery.remap(sharded, link, [], force=True)


def test_dst_folder_missing(make, tmp_path, cli):
    src = make("plain_safetensors")
    dst = tmp_path / "no" / "such" / "o.safetensors"
    r = cli("remap", src, dst)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert "does not exist" in r.stderr and "create it first" in r.stderr
    assert not (tmp_path / "no").exists()
    r = cli("adapt", make("ddp_pt"), "--arch", "resnet18", "--num-classes", "3", "--out", tmp_path / "nope" / "out")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr, r.stderr


def test_dst_inside_a_file_and_dangling_symlink(make, tmp_path, cli):
    src = make("plain_safetensors")
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = cli("remap", src, afile / "o.safetensors")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    dangling = tmp_path / "dangling.safetensors"
    dangling.symlink_to(tmp_path / "missing-target")
    r = cli("remap", src, dangling)
    assert r.exit_code == 2 and "exists" in r.stderr
    assert not (tmp_path / "missing-target").exists()


def test_source_symlink_loop_and_long_names(tmp_path, cli):
    loop = tmp_path / "loop.pt"
    loop.symlink_to(loop)
    for p in (loop, "z" * 5000):
        r = cli("inspect", p)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.stderr
    assert os.path.islink(loop)


# ----------------------------------------------------------------------------- destinations never destroy

def _snapshot(folder):
    """Every file under ``folder`` with its bytes (and its type for special files)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            out[os.path.relpath(p, folder)] = (kind, open(p, "rb").read() if stat.S_ISREG(st.st_mode) else None)
    return out


def _one_line_refusal(r, *words):
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


def test_remap_into_the_folder_holding_the_source_is_refused(make, tmp_path, cli):
    run = tmp_path / "run1"
    run.mkdir()
    shutil.copy(make("plain_pt"), run / "model.pt")
    (run / "notes.txt").write_text("mine")
    before = _snapshot(tmp_path)
    for extra in ([], ["--force"]):
        r = cli("remap", run / "model.pt", run, *extra)
        _one_line_refusal(r, "contains the source")
    r = cli("remap", run / "model.pt", run / "sub" / "..", "--force")
    _one_line_refusal(r, "contains the source")
    assert _snapshot(tmp_path) == before


def test_dst_inside_a_source_folder_is_refused(sharded, cli):
    before = _snapshot(sharded)
    r = cli("remap", sharded, sharded / "clean.safetensors")
    _one_line_refusal(r, "lies inside the source")
    assert _snapshot(sharded) == before


def test_adapt_out_holding_the_checkpoint_is_refused(make, tmp_path, cli):
    exp = tmp_path / "exp"
    exp.mkdir()
    shutil.copy(make("resnet18_pt"), exp / "r18.pt")
    (exp / "README").write_text("my experiment")
    before = _snapshot(tmp_path)
    r = cli("adapt", exp / "r18.pt", "--arch", "resnet18", "--num-classes", 3, "--out", exp, "--force")
    _one_line_refusal(r, "contains the source")
    link = tmp_path / "link"
    link.symlink_to(exp)  # the same folder through a symlink
    r = cli("adapt", exp / "r18.pt", "--arch", "resnet18", "--num-classes", 3, "--out", link / ".", "--force")
    _one_line_refusal(r, "contains the source")
    assert {k: v for k, v in _snapshot(tmp_path).items() if k != "link"} == before


def test_force_replaces_only_what_surgery_wrote(make, tmp_path, cli):
    src = make("resnet18_pt")
    out = tmp_path / "out"
    args = ["adapt", src, "--arch", "resnet18", "--num-classes", 3, "--out", out]
    assert cli(*args).exit_code == 0
    r = cli(*args, "--force")  # only adapt's own files there: replaced
    assert r.exit_code == 0, r.output
    (out / "README.md").write_text("notes")
    (out / "data").mkdir()
    (out / "data" / "x.png").write_bytes(b"img")
    before = _snapshot(out)
    r = cli(*args, "--force")
    _one_line_refusal(r, "holds files surgery did not write", "README.md", "data/")
    assert _snapshot(out) == before
    shards = tmp_path / "shards"
    assert cli("remap", src, shards, "--shard-size", "10MB").exit_code == 0
    (shards / "config.json").write_text("{}")
    before = _snapshot(shards)
    r = cli("remap", src, shards, "--shard-size", "20MB", "--force")
    _one_line_refusal(r, "config.json")
    assert _snapshot(shards) == before
    (tmp_path / "old.pt").write_text("old")
    r = cli("remap", src, tmp_path / "old.pt", "--force")  # a file output replaces a file: what --force is for
    assert r.exit_code == 0 and surgery.open(tmp_path / "old.pt").tensors
    r = cli("remap", src, out / "data", "--force")
    _one_line_refusal(r, "x.png")


def test_in_place_on_a_sharded_folder_keeps_the_other_files(make, tmp_path, cli):
    hf = tmp_path / "hf"
    shutil.copytree(make("sharded_safetensors"), hf)
    (hf / "config.json").write_text('{"model_type": "x"}')
    (hf / "tokenizer.json").write_text("{}")
    (hf / "extra").mkdir()
    (hf / "extra" / "a.txt").write_text("a")
    kept = {k: v for k, v in _snapshot(hf).items() if not k.startswith("model")}
    before = surgery.open(hf).state_dict()
    r = cli("remap", hf, hf, "--in-place", "--shard-size", "1GB", "--dtype", "fp16")
    assert r.exit_code == 0, r.output
    assert {k: v for k, v in _snapshot(hf).items() if not k.startswith("model")} == kept
    after = surgery.open(hf).state_dict()
    assert list(after) == list(before) and sorted(p.name for p in hf.glob("model*")) == [
        "model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("node", ["fifo", "chardev", "socket"])
def test_special_files_are_never_destinations(make, tmp_path, cli, node):
    target = tmp_path / "dst"
    if node == "fifo":
        os.mkfifo(target)
    elif node == "chardev":
        try:
            os.mknod(target, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except (PermissionError, OSError):
            pytest.skip("cannot create a device node here")
    else:
        import socket

        s = socket.socket(socket.AF_UNIX)
        s.bind(str(target))
        s.close()
    mode = os.lstat(target).st_mode
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)  # a symlink to the node: resolved, refused the same way
    for args in (["remap", make("plain_pt"), target, "--force"], ["remap", make("plain_pt"), link, "--force"],
                 ["adapt", make("resnet18_pt"), "--arch", "resnet18", "--num-classes", 3, "--out", target, "--force"]):
        r = cli(*args)
        _one_line_refusal(r, "is a ")
    assert os.lstat(target).st_mode == mode


def test_special_file_sources_fail_fast(make, tmp_path):
    """A FIFO or a device as the checkpoint: refused at once, never a read that blocks."""
    import subprocess
    import sys

    fifo = tmp_path / "ckpt.pt"
    os.mkfifo(fifo)
    repo = str(REPO)
    for args in (["inspect", fifo], ["remap", fifo, tmp_path / "o.safetensors"],
                 ["adapt", fifo, "--arch", "resnet18", "--num-classes", "3", "--out", tmp_path / "a"],
                 ["inspect", "/dev/zero"]):
        r = subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=repo, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and r.stderr.startswith("error: "), (args, r.stderr)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and not (tmp_path / "a").exists()


def test_a_shard_index_linked_to_a_fifo_fails_fast(tmp_path):
    """A folder whose only index links to a FIFO: one line and exit 2, never an open that blocks."""
    import subprocess
    import sys

    folder = tmp_path / "hf"
    folder.mkdir()
    os.mkfifo(tmp_path / "pipe")
    (folder / "model.safetensors.index.json").symlink_to(tmp_path / "pipe")
    repo = str(REPO)
    r = subprocess.run([sys.executable, "-m", "cli.main", "inspect", str(folder)], cwd=repo, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1, r.stderr


def test_train_force_replaces_only_its_own_run(tmp_path, cli):
    import torch

    from fixtures.generate import digits_imagefolder
    from fixtures.factory import SIZE, load_factory, write_factory

    arch = write_factory(tmp_path)
    data = digits_imagefolder(tmp_path / "data", classes=range(5, 10), per_class=4, size=SIZE)
    torch.manual_seed(0)
    surgery.adapt(load_factory(arch)(5).state_dict(), arch=arch, num_classes=5, input_size=SIZE, out=tmp_path / "ad",
                  freeze="head-only")
    out = tmp_path / "run"
    args = ["train", tmp_path / "ad", "--data", data, "--epochs", 1, "--out", out, "--quiet", "--trust-code"]
    assert cli(*args).exit_code == 0
    r = cli(*args, "--force")
    assert r.exit_code == 0, r.output
    (out / "my-notes.txt").write_text("notes")
    (out / "checkpoints" / "keep.pt").write_text("mine")
    before = _snapshot(out)
    r = cli(*args, "--force")
    _one_line_refusal(r, "holds files surgery did not write", "my-notes.txt", "checkpoints/keep.pt")
    assert _snapshot(out) == before
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = cli(*args[:-3], fifo, "--quiet", "--trust-code", "--force")
    _one_line_refusal(r, "is a FIFO")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
