"""A folder is data: a factory its manifest names is code and runs only with --trust-code / trust_code=True,
and a file factory only while its bytes have the sha256 adapt pinned."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from surgery.adapter.core import load_adapted
from surgery.errors import ManifestError, TrustError
from fixtures.factory import SIZE, adapted_factory_folder, load_factory, write_factory

warnings.filterwarnings("ignore", category=UserWarning)

EVIL = '''
import pathlib
pathlib.Path({marker!r}).write_text("ran")


def small_cnn(num_classes=5, width=16):
    raise SystemExit("never reached in these tests")
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    return root, adapted_factory_folder(root, 6, freeze="head-only")


def _hostile(adapted: Path, root: Path, name: str, arch: dict) -> Path:
    """A copy of the adapted folder whose manifest names ``arch``."""
    folder = root / name
    shutil.copytree(adapted, folder)
    m = json.loads((folder / "manifest.json").read_text())
    m["arch"] = arch
    (folder / "manifest.json").write_text(json.dumps(m))
    return folder


def _attacks(adapted: Path, root: Path, marker: Path) -> dict[str, Path]:
    evil = root / "evil.py"
    evil.write_text(EVIL.format(marker=str(marker)))
    sha = hashlib.sha256(evil.read_bytes()).hexdigest()
    shell = f"touch {marker}"
    return {
        "subprocess": _hostile(adapted, root, "h_sub", {"kind": "module", "name": "subprocess:run",
                                               "kwargs": {"args": shell, "shell": True}}),
        "os.system": _hostile(adapted, root, "h_os", {"kind": "module", "name": "os:system", "kwargs": {"command": shell}}),
        "file": _hostile(adapted, root, "h_file", {"kind": "file", "name": f"{evil}:small_cnn", "kwargs": {}, "sha256": sha}),
        "timm loader": _hostile(adapted, root, "h_timm", {"kind": "timm", "name": "resnet18",
                                                 "kwargs": {"checkpoint_path": str(evil)}}),
    }


@pytest.mark.parametrize("entry", ["train", "evaluate", "predict", "load_adapted"])
def test_hostile_manifest_runs_nothing(cli, setup, tmp_path, entry):
    root, data = setup
    marker = tmp_path / "MARKER"
    img = next((data / "val" / "5").glob("*.png"))
    for what, folder in _attacks(root / "ad", tmp_path, marker).items():
        if entry == "load_adapted":
            # timm's loader kwargs are refused whatever the trust (a folder reaches no file or network)
            with pytest.raises((TrustError, ManifestError), match=r"builds the model with code .*; surgery ran "
                               r"nothing\. .*--trust-code|would make timm:resnet18 load weights or files"):
                load_adapted(folder)
        else:
            args = {"train": ["train", folder, "--data", data, "--epochs", 1, "--out", tmp_path / "o"],
                    "evaluate": ["evaluate", folder, "--data", data],
                    "predict": ["predict", folder, img]}[entry]
            r = cli(*args)
            assert r.exit_code == 2, (what, r.output)
            assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
            assert "--trust-code" in r.stderr and ("factory" in r.stderr or "timm:" in r.stderr)
            assert not (tmp_path / "o").exists()
        assert not marker.exists(), f"{what} ran code through {entry}"


def test_unknown_kind_and_timm_names_are_refused(setup, tmp_path):
    root, _ = setup
    folder = _hostile(root / "ad", tmp_path, "k", {"kind": "eval", "name": "print", "kwargs": {}})
    with pytest.raises(Exception, match=r"arch.kind 'eval' is not one of torchvision, timm, file, module"):
        load_adapted(folder)
    pytest.importorskip("timm")
    folder = _hostile(root / "ad", tmp_path, "t", {"kind": "timm", "name": "hf-hub:someone/model", "kwargs": {}})
    with pytest.raises(Exception, match=r"timm does not list"):
        load_adapted(folder)


def test_trusted_factory_works_everywhere(cli, setup, tmp_path):
    root, data = setup
    assert load_adapted(root / "ad", trust_code=True)(torch.randn(1, 3, SIZE, SIZE)).shape == (1, 5)
    out = tmp_path / "run"
    r = cli("train", root / "ad", "--data", data, "--epochs", 1, "--out", out, "--batch-size", 16, "--no-flip",
            "--quiet", "--trust-code")
    assert r.exit_code == 0, r.output
    r = cli("evaluate", out, "--data", data, "--json", "--trust-code")
    assert r.exit_code == 0 and json.loads(r.stdout)["images"] > 0, r.output
    img = next((data / "val" / "5").glob("*.png"))
    r = cli("predict", out, img, "--json", "--trust-code")
    assert r.exit_code == 0 and json.loads(r.stdout)["predictions"][0]["top"][0]["class"] in "56789", r.output


def test_edited_factory_is_refused_even_when_trusted(setup, tmp_path):
    root, _ = setup
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copytree(root / "ad", moved / "ad")
    shutil.copy(root / "models.py", moved / "models.py")
    pinned = json.loads((root / "ad" / "manifest.json").read_text())["arch"]["sha256"]
    assert pinned == hashlib.sha256((root / "models.py").read_bytes()).hexdigest()
    # the folder and its factory moved together: found beside it, not at the old absolute path
    (root / "models.py").rename(root / "models.py.away")
    try:
        assert load_adapted(moved / "ad", trust_code=True) is not None
    finally:
        (root / "models.py.away").rename(root / "models.py")
    edited = (moved / "models.py").read_text() + "\nimport os  # changed after adapt\n"
    (moved / "models.py").write_text(edited)
    (root / "models.py").write_text(edited)
    try:
        with pytest.raises(TrustError, match=rf"factory file changed since adapt: the manifest pins sha256 {pinned}, "
                                             rf".*models.py has sha256 [0-9a-f]{{64}}"):
            load_adapted(moved / "ad", trust_code=True)
    finally:
        write_factory(root)


def test_adapt_runs_the_factory_the_user_names(cli, setup, tmp_path):
    root, _ = setup
    ckpt = tmp_path / "small.pt"
    torch.save(load_factory(str(root / "models.py") + ":small_cnn")(5).state_dict(), ckpt)
    r = cli("adapt", ckpt, "--arch", f"{root / 'models.py'}:small_cnn", "--num-classes", 3, "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    arch = json.loads((tmp_path / "a" / "manifest.json").read_text())["arch"]
    assert arch["kind"] == "file" and len(arch["sha256"]) == 64
    assert (tmp_path / "a" / arch["relative"]).resolve() == (root / "models.py").resolve()
