"""Paths: a shard index never leads outside its folder or to another format; DST is checked first."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import surgery
from surgery.errors import FormatError, OutputError, SurgeryError


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
