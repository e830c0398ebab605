"""A folder is data, and its metadata is checked before anything uses it: every manifest field
against its schema (one line naming the field, exit 2), no kwargs that fetch weights, files named
only inside the folder, metadata files read with a size cap; a Hub cache's refs are small regular
files inside the cache, never quoted; a resumed run never writes through a linked checkpoints folder."""

from __future__ import annotations

import json
import os
import shutil
import tracemalloc
import warnings
from pathlib import Path

import pytest

import surgery
from surgery.errors import InputError, ManifestError, ResumeError

warnings.filterwarnings("ignore", category=UserWarning)
SIZE = 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A torchvision model (no code to trust) adapted with an MLP head: every head field is set."""
    from fixtures.generate import tiny_model

    out = tmp_path_factory.mktemp("fm") / "ad"
    surgery.adapt(tiny_model("mobilenet_v3_small").state_dict(), arch="mobilenet_v3_small", num_classes=3,
                  input_size=SIZE, head="mlp", out=out, seed=1)
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "a.png"
    Image.new("RGB", (40, 40), (90, 30, 200)).save(path)
    return path


def _edited(folder: Path, dst: Path, edit) -> Path:
    """A copy of ``folder`` whose manifest went through ``edit(manifest_dict)``."""
    shutil.copytree(folder, dst)
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def _set(path: str, value):
    def edit(m: dict) -> None:
        *parents, key = path.split(".")
        holder = m
        for p in parents:
            holder = holder[p]
        holder[key] = value
    return edit


# field edited -> (edits, what the one line says)
FIELDS = {
    "files.weights=5": ([_set("files.weights", 5)], r"files\.weights must be a file name inside the folder"),
    "mlp with pool=null": ([_set("head.pool", None)], r"head\.pool and head\.block must name modules"),
    "linear head, mlp kind": ([_set("head.kind", "mlp"), _set("head.pool", None), _set("head.block", None)],
                              r"head\.pool and head\.block must name modules when head\.kind is mlp"),
    "classifier": ([_set("head.kind", "linear"), _set("head.classifier", "no.such")],
                   r"head\.classifier 'no\.such' names no module of mobilenet_v3_small"),
    "in_features": ([_set("head.in_features", "x")], r"head\.in_features must be an integer >= 1, got 'x'"),
    "first_conv": ([_set("head.first_conv", "nope")], r"head\.first_conv 'nope' names no module"),
    "first_conv kind": ([_set("head.first_conv", "classifier.0")], r"head\.first_conv 'classifier\.0' is a "),
    "input.size": ([_set("input.size", "abc")], r"input\.size must be \[height, width\]"),
    "class_names": ([_set("class_names", 5)], r"class_names must be a list of non-empty strings"),
    "class_names count": ([_set("class_names", ["a", "b"])], r"class_names has 2 names but num_classes is 3"),
    "seed": ([_set("seed", "x")], r"seed must be an integer >= 0, got 'x'"),
    "std": ([_set("input.std", [0.2, 0, 0.2])], r"input\.std must be a list of positive numbers"),
    "interpolation": ([_set("input.interpolation", "cubic!")], r"input\.interpolation must be nearest"),
    "dropout": ([_set("head.dropout", 3)], r"head\.dropout must be a number from 0 to below 1"),
    "group lr": ([lambda m: m["groups"][0].__setitem__("lr_mult", "fast")], r"groups\[0\]: name is a string"),
    "param group a list": ([lambda m: next(iter(m["params"].values())).__setitem__("group", ["x"])],
                           r"params\[.*\] is in group \['x'\], which is not in 'groups'"),
}


@pytest.mark.parametrize("case", FIELDS)
def test_a_wrong_manifest_field_is_one_line_naming_it(cli, folder, image, tmp_path, case):
    edits, said = FIELDS[case]
    bad = _edited(folder, tmp_path / "f", lambda m: [e(m) for e in edits])
    r = cli("predict", bad, image)
    assert r.exit_code == 2, (r.output, r.exception)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "invalid manifest" in r.stderr
    import re

    assert re.search(said, r.stderr), r.stderr
    with pytest.raises(ManifestError, match=said):
        surgery.load_adapted(bad)


@pytest.mark.parametrize("kwargs", [{"weights": "IMAGENET1K_V1"}, {"weights_backbone": "DEFAULT"},
                                    {"pretrained": True}])
def test_a_manifest_cannot_make_torchvision_download(cli, folder, image, tmp_path, monkeypatch, kwargs):
    import torch.hub

    fetched = []

    def no_network(url, *a, **k):
        fetched.append(url)
        raise OSError("the network was reached")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    bad = _edited(folder, tmp_path / "f", lambda m: m["arch"]["kwargs"].update(kwargs))
    (key,) = kwargs
    for trust in ((), ("--trust-code",)):
        r = cli("predict", bad, image, *trust)
        assert r.exit_code == 2, r.output
        assert f"arch.kwargs.{key} would make mobilenet_v3_small load weights or files" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1
    assert fetched == []
    with pytest.raises(ManifestError, match=rf"arch\.kwargs\.{key} "):
        surgery.load_adapted(bad, trust_code=True)
    with_null = _edited(folder, tmp_path / "n", lambda m: m["arch"]["kwargs"].update({key: None}))
    assert surgery.load_adapted(with_null) is not None  # null fetches nothing: accepted


@pytest.mark.parametrize("kwargs", [{"pretrained": True}, {"checkpoint_path": "/etc/hostname"},
                                    {"pretrained_cfg_overlay": {"file": "/etc/hostname"}}])
def test_a_manifest_cannot_make_timm_load_files(folder, tmp_path, kwargs):
    pytest.importorskip("timm")
    bad = _edited(folder, tmp_path / "f", lambda m: m["arch"].update(kind="timm", name="resnet18", kwargs=kwargs))
    with pytest.raises(ManifestError, match=rf"arch\.kwargs\.{next(iter(kwargs))} would make timm:resnet18 load"):
        surgery.load_adapted(bad, trust_code=True)


def test_files_name_only_the_folders_own_files(folder, tmp_path, monkeypatch):
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(folder / "model.safetensors", outside)
    hashed = []
    import surgery.adapter.folder as folder_mod

    monkeypatch.setattr(folder_mod, "sha256_file", lambda p: hashed.append(p) or "0" * 64)
    for i, name in enumerate([str(outside), "../outside.safetensors", "sub/../../outside.safetensors"]):
        bad = _edited(folder, tmp_path / f"a{i}", _set("files.weights", name))
        with pytest.raises(ManifestError, match=r"files\.weights must be a file name inside the folder"):
            surgery.load_adapted(bad)
    linked = _edited(folder, tmp_path / "l", lambda m: None)
    (linked / "model.safetensors").unlink()
    (linked / "model.safetensors").symlink_to(outside)
    with pytest.raises(ManifestError, match=r"model\.safetensors: files\.weights leads outside the folder"):
        surgery.load_adapted(linked)
    report = _edited(folder, tmp_path / "r", lambda m: None)
    (report / "load_report.json").unlink()
    (report / "load_report.json").symlink_to("/etc/hostname")
    with pytest.raises(ManifestError, match=r"files\.load_report leads outside the folder"):
        surgery.read_manifest(report)
    assert hashed == []  # nothing outside the folder was read or hashed
    inner = _edited(folder, tmp_path / "i", _set("files.weights", "w/model.safetensors"))
    (inner / "w").mkdir()
    (inner / "model.safetensors").rename(inner / "w" / "model.safetensors")
    monkeypatch.undo()
    assert surgery.load_adapted(inner) is not None  # a file in a subfolder is still the folder's own


def test_a_huge_or_foreign_manifest_is_refused_before_it_is_read(folder, tmp_path):
    big = _edited(folder, tmp_path / "big", lambda m: None)
    with open(big / "manifest.json", "r+b") as fh:
        fh.truncate(2**30)  # sparse: 1 GB that costs nothing on disk
    tracemalloc.start()
    try:
        with pytest.raises(ManifestError, match=r"manifest\.json: 1073741824 bytes, over the 64 MB cap for a manifest"):
            surgery.read_manifest(big)
        assert tracemalloc.get_traced_memory()[1] < 2**20
    finally:
        tracemalloc.stop()
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "manifest.json").symlink_to(folder / "manifest.json")
    with pytest.raises(ManifestError, match=r"the manifest leads outside the folder"):
        surgery.read_manifest(linked)


# ----------------------------------------------------------------------------- the Hub cache

COMMIT = "a" * 40


@pytest.fixture
def hub(tmp_path, monkeypatch, make) -> Path:
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    shutil.copyfile(make("plain_safetensors"), snap / "model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return repo


def test_a_linked_ref_is_refused_without_quoting_it(hub, tmp_path, cli):
    assert surgery.open("org/tiny").format == "safetensors"
    secret = tmp_path / "secret"
    secret.write_text("API_TOKEN=hunter2-do-not-print-me-anywhere-please")
    for target in [secret, Path("/proc/self/environ")]:
        if not target.exists():
            continue
        (hub / "refs" / "main").unlink()
        (hub / "refs" / "main").symlink_to(target)
        r = cli("inspect", "org/tiny")
        assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
        assert "is not a regular file inside" in r.stderr
        assert "hunter2" not in r.stderr and "API_TOKEN" not in r.stderr and "PATH=" not in r.stderr


def test_a_huge_ref_is_refused_without_reading_it(hub):
    ref = hub / "refs" / "main"
    with open(ref, "r+b") as fh:
        fh.truncate(64 * 2**20)
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=r"refs/main in the Hugging Face cache does not hold a commit hash"):
            surgery.open("org/tiny")
        assert tracemalloc.get_traced_memory()[1] < 2**20
    finally:
        tracemalloc.stop()
    ref.write_text("\x1b]0;pwned\x07 not a hash")
    with pytest.raises(InputError) as e:
        surgery.open("org/tiny")
    assert "pwned" not in str(e.value) and "\x1b" not in str(e.value)


# ----------------------------------------------------------------------------- resume

def _stop_after_first(event, info):
    if event == "epoch_end" and info["epoch"] == 1:
        raise KeyboardInterrupt


def test_resume_never_writes_through_a_linked_checkpoints_folder(tmp_path, cli):
    from surgery.errors import TrainInterrupted
    from fixtures.factory import SIZE as FSIZE, adapted_factory_folder

    data = adapted_factory_folder(tmp_path, 4)
    run = tmp_path / "run"
    with pytest.raises(TrainInterrupted):
        surgery.train(tmp_path / "ad", data, out=run, observer=_stop_after_first, trust_code=True, epochs=2,
                      lr=1e-2, batch_size=8, seed=1, image_size=FSIZE, flip=False)
    elsewhere = tmp_path / "elsewhere"
    (run / "checkpoints").rename(elsewhere)
    (run / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in elsewhere.iterdir()}
    with pytest.raises(ResumeError, match=r"checkpoints: is a link; a run writes its checkpoints only into a real "
                                          r"folder inside OUT"):
        surgery.train(tmp_path / "ad", data, out=run, resume=True, trust_code=True)
    r = cli("train", "--trust-code", tmp_path / "ad", "--data", data, "--out", run, "--resume")
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.output
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in elsewhere.iterdir()} == before
    assert os.path.islink(run / "checkpoints")
