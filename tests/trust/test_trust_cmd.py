"""`surgery trust DIR`: review a folder's factory pin (both hashes shown) and re-pin it only with --repin;
nothing runs the factory, and every refusal of a changed factory names the command."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import surgery
from surgery.errors import TrustError
from fixtures.factory import adapted_factory_folder
from tests import REPO

warnings.filterwarnings("ignore", category=UserWarning)

# imported, this file leaves a marker: the proof that surgery trust never runs a factory
MARKED = '''
import pathlib
pathlib.Path(__file__).with_name("RAN").write_text("ran")
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust_cmd")
    return root, adapted_factory_folder(root, 2, freeze="head-only")


@pytest.fixture
def edited(setup, tmp_path):
    """The adapted folder as adapt writes it in ``tmp_path``, its factory file then edited."""
    root, data = setup
    shutil.copytree(root / "ad", tmp_path / "ad")
    factory = tmp_path / "models.py"
    m = json.loads((tmp_path / "ad" / "manifest.json").read_text())
    m["arch"]["name"] = f"{factory}:small_cnn"  # adapt stores the absolute path (and ../models.py)
    (tmp_path / "ad" / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    factory.write_text((root / "models.py").read_text() + MARKED)
    return tmp_path / "ad", factory, data


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_matching_file_is_reported_with_its_hash(setup, cli):
    root, _ = setup
    r = cli("trust", root / "ad", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["schema"] == "surgery.trust/1" and rep["kind"] == "file" and rep["is_code"]
    assert rep["status"] == "matches" and rep["pinned_sha256"] == rep["current_sha256"] == _sha(root / "models.py")
    assert rep["factory"] == str((root / "models.py").resolve()) and rep["repinned"] is False


def test_an_edited_factory_is_shown_then_repinned_only_when_asked(edited, cli):
    folder, factory, data = edited
    pinned, now = json.loads((folder / "manifest.json").read_text())["arch"]["sha256"], _sha(factory)
    with pytest.raises(TrustError, match=rf"changed since adapt.*re-pin with `surgery trust {re.escape(str(folder))} --repin`"):
        surgery.load_adapted(folder, trust_code=True)
    before = (folder / "manifest.json").read_bytes()
    r = cli("trust", folder)
    assert r.exit_code == 0, r.output
    assert f"pinned     sha256 {pinned}" in r.stdout and f"current    sha256 {now}" in r.stdout
    assert f"file       {factory.resolve()} (" in r.stdout and f"{factory.stat().st_size} bytes" in r.stdout
    assert (folder / "manifest.json").read_bytes() == before  # review alone changes nothing
    command = re.search(r"run: (surgery trust .* --repin)$", r.stdout.strip()).group(1)
    r = cli(*shlex.split(command)[1:])  # the printed command, as printed
    assert r.exit_code == 0, r.output
    assert pinned in r.stdout and f"now pins sha256 {now}" in r.stdout
    after = json.loads((folder / "manifest.json").read_text())
    old = json.loads(before)
    assert after["arch"]["sha256"] == now and {**after, "arch": old["arch"]} == old  # only the pin moved
    assert not (factory.parent / "RAN").exists()  # reviewing and re-pinning imported nothing
    assert surgery.load_adapted(folder, trust_code=True) is not None
    assert (factory.parent / "RAN").exists()  # with consent, the re-pinned file runs
    again = surgery.repin_factory(folder)
    assert again.status == "matches" and again.repinned is False


def test_every_refusal_of_a_changed_factory_names_the_command(edited, cli, tmp_path):
    folder, _, data = edited
    img = next((data / "val" / "5").glob("*.png"))
    for args in (["train", folder, "--data", data, "--epochs", 1, "--out", tmp_path / "o"],
                 ["evaluate", folder, "--data", data], ["predict", folder, img],
                 ["export", folder, "--format", "torchscript", "--out", tmp_path / "m.pt"]):
        r = cli(*args, "--trust-code")
        assert r.exit_code == 2, (args[0], r.output)
        assert f"surgery trust {folder} --repin" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.pt").exists()
    assert surgery.review_factory(folder).status == "changed"  # nothing re-pinned on the way


def test_what_cannot_be_pinned_is_refused_and_left_alone(setup, cli, tmp_path):
    root, _ = setup
    cases = {"torchvision": ({"kind": "torchvision", "name": "resnet18", "kwargs": {}}, "no-code", "runs no code"),
             "module": ({"kind": "module", "name": "os:system", "kwargs": {}}, "not-a-file", "not a file"),
             "missing": ({"kind": "file", "name": f"{tmp_path / 'gone.py'}:small_cnn", "kwargs": {}, "sha256": "0" * 64},
                         "missing", "is not there")}
    for name, (arch, status, said) in cases.items():
        folder = tmp_path / name
        shutil.copytree(root / "ad", folder)
        m = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps(dict(m, arch=arch)))
        before = (folder / "manifest.json").read_bytes()
        assert surgery.review_factory(folder).status == status
        r = cli("trust", folder, "--repin")
        assert r.exit_code == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.output
        assert ("nothing to re-pin" if name != "missing" else said) in r.stderr
        assert (folder / "manifest.json").read_bytes() == before
        assert said in cli("trust", folder).stdout or name == "missing"


def test_trust_does_not_import_torch(edited):
    folder, _, _ = edited
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom cli.main import app\n"
            f"r = CliRunner().invoke(app, ['trust', {str(folder)!r}, '--json']); assert r.exit_code == 0, r.output\n"
            f"r = CliRunner().invoke(app, ['trust', {str(folder)!r}, '--repin']); assert r.exit_code == 0, r.output\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    assert surgery.review_factory(folder).status == "matches"


def test_a_trained_run_is_reviewed_and_repinned_like_an_adapted_folder(setup, edited, cli, tmp_path):
    root, _ = setup
    folder, factory, data = edited
    edit = factory.read_text()
    factory.write_text((root / "models.py").read_text())  # as it was at adapt: the run trains
    run = tmp_path / "run"
    r = cli("train", folder, "--data", data, "--epochs", 1, "--lr", 0.01, "--out", run, "--quiet", "--trust-code")
    assert r.exit_code == 0, r.output
    factory.write_text(edit)
    r = cli("evaluate", run, "--data", data, "--trust-code")
    assert r.exit_code == 2 and f"surgery trust {run} --repin" in r.stderr, r.output
    rep = json.loads(cli("trust", run, "--repin", "--json").stdout)
    assert rep["status"] == "changed" and rep["repinned"] and rep["current_sha256"] == _sha(factory)
    r = cli("evaluate", run, "--data", data, "--trust-code", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["images"] > 0, r.output
    assert surgery.review_factory(folder).status == "changed"  # the adapted folder keeps its own pin
