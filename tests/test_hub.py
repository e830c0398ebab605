"""ORG/NAME and hf:ORG/NAME[@REVISION]: models in a Hugging Face cache laid out in tmp."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

import surgery

COMMIT = "a" * 40
OTHER = "b" * 40


def hub_repo(cache: Path, repo_id: str, files: list[Path], commit: str = COMMIT, refs: tuple[str, ...] = ("main",)) -> Path:
    """The layout huggingface_hub writes: blobs/SHA, snapshots/COMMIT/NAME -> ../../blobs/SHA, refs/main."""
    org, name = repo_id.split("/")
    repo = cache / f"models--{org}--{name}"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in files:
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / sha)
        os.symlink(os.path.join("..", "..", "blobs", sha), snap / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "hf-cache"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.chdir(tmp_path)
    return root


def test_inspect_a_cached_model_by_name(cache, make, cli):
    snap = hub_repo(cache, "org/tiny", [make("plain_safetensors")])
    (snap / "config.json").write_text("{}")
    for name in ("org/tiny", "hf:org/tiny"):
        r = cli("inspect", name, "--json")
        assert r.exit_code == 0, r.stderr
        data = json.loads(r.stdout)
        assert data["format"] == "safetensors"
        assert data["files"] == [str(snap / "plain_safetensors.safetensors")]
        assert data["architecture"][0]["arch"] == "mobilenet_v3_small"


def test_sharded_snapshot_follows_links_into_blobs(cache, make):
    folder = make("sharded_safetensors")
    snap = hub_repo(cache, "org/sharded", sorted(folder.iterdir()))
    assert (snap / "model.safetensors.index.json").is_symlink()
    ckpt = surgery.open("hf:org/sharded")
    assert ckpt.format == "safetensors-index" and len(ckpt.files) == 3
    assert surgery.open(folder / "model.safetensors.index.json").tensors.keys() == ckpt.tensors.keys()
    import torch

    name = next(iter(ckpt.tensors))
    torch.testing.assert_close(ckpt.tensor(name), surgery.open(folder).tensor(name))


def test_safetensors_preferred_when_a_snapshot_has_both(cache, make, tmp_path):
    bin_copy = tmp_path / "pytorch_model.bin"
    shutil.copyfile(make("plain_pt"), bin_copy)
    st = tmp_path / "model.safetensors"
    shutil.copyfile(make("plain_safetensors"), st)
    hub_repo(cache, "org/both", [bin_copy, st])
    assert surgery.open("org/both").format == "safetensors"


def test_revision_by_tag_and_by_commit(cache, make, tmp_path):
    hub_repo(cache, "org/rev", [make("plain_safetensors")], commit=COMMIT)
    hub_repo(cache, "org/rev", [make("plain_pt")], commit=OTHER, refs=("v2",))
    assert surgery.open("org/rev").format == "safetensors"
    assert surgery.open("org/rev@v2").format == "torch-zip"
    assert surgery.open(f"hf:org/rev@{OTHER}").format == "torch-zip"
    with pytest.raises(surgery.SurgeryError, match=r"org/rev@v3: revision 'v3' is not in the Hugging Face cache.*"
                                                   r"refs there: main, v2.*--revision v3"):
        surgery.open("org/rev@v3")


def test_hf_home_and_default_locations(tmp_path, make, monkeypatch):
    from surgery.hub import cache_dir

    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / "hub"
    hub_repo(tmp_path / "home" / "hub", "org/tiny", [make("plain_safetensors")])
    assert surgery.open("org/tiny").format == "safetensors"
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"


def test_not_cached_is_one_line_naming_where_and_how(cache, cli):
    r = cli("inspect", "org/absent")
    assert r.exit_code == 2
    assert r.stderr.startswith("error: org/absent: no such file or folder, and not in the Hugging Face cache")
    assert str(cache / "models--org--absent") in r.stderr and "huggingface-cli download org/absent" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = cli("inspect", "hf:not a name")
    assert r.exit_code == 2 and "not a Hugging Face model name" in r.stderr


def test_unfinished_download_is_named(cache, make):
    hub_repo(cache, "org/half", [make("plain_safetensors")])
    (cache / "models--org--half" / "refs" / "main").write_text(OTHER)
    with pytest.raises(surgery.SurgeryError, match=r"refs/main names commit 'b{40}' but .* has no such snapshot; "
                                                   r"the download did not finish"):
        surgery.open("org/half")


def test_a_local_path_wins_over_a_hub_name(cache, make, tmp_path):
    hub_repo(cache, "org/tiny", [make("plain_safetensors")])
    local = tmp_path / "org" / "tiny"
    local.mkdir(parents=True)
    shutil.copyfile(make("plain_pt"), local / "weights.pt")
    assert surgery.open("org/tiny").format == "torch-zip"
    assert surgery.open("hf:org/tiny").format == "safetensors"  # hf: asks for the Hub explicitly


def test_missing_local_files_keep_their_message(cache):
    with pytest.raises(surgery.SurgeryError, match=r"^missing/model\.pt: no such file or folder$"):
        surgery.open("missing/model.pt")


def test_remap_and_adapt_from_the_cache(cache, make, tmp_path, cli):
    hub_repo(cache, "org/tiny", [make("plain_safetensors")])
    r = cli("remap", "org/tiny", tmp_path / "clean.pt")
    assert r.exit_code == 0, r.stderr
    assert surgery.open(tmp_path / "clean.pt").tensors.keys() == surgery.open("org/tiny").tensors.keys()
    _, report = surgery.adapt("hf:org/tiny", arch="mobilenet_v3_small", num_classes=3, out=tmp_path / "adapted")
    assert report.load.coverage > 0.9
    assert report.manifest["source"]["format"] == "safetensors"


def test_link_root_is_the_repo_folder_for_snapshots(cache, make):
    from surgery.hub import link_root

    snap = hub_repo(cache, "org/tiny", [make("plain_safetensors")])
    assert link_root(snap) == cache / "models--org--tiny"
    assert link_root(cache) == cache


def test_timm_img_size_sets_the_input_size_without_input_size(tmp_path):
    pytest.importorskip("timm")
    import timm
    import torch

    torch.manual_seed(0)
    kw = {"img_size": 48, "patch_size": 8, "embed_dim": 64, "depth": 1, "num_heads": 2}
    src = timm.create_model("vit_tiny_patch16_224", **kw).state_dict()
    _, report = surgery.adapt(src, arch="timm:vit_tiny_patch16_224", arch_kwargs=kw, num_classes=2)
    assert report.manifest["input"]["size"] == [48, 48]
    assert report.manifest["input"]["mean"] == [0.5, 0.5, 0.5]  # timm's pretrained cfg, not ImageNet's
