"""Installed, the project is one import package (surgery), and worker processes import nothing
from the working directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
import zipfile

import pytest
import torch

from fixtures.generate import digits_imagefolder
from surgery.adapter.core import adapt
from surgery.launch import module_command
from fixtures.factory import SIZE, load_factory, write_factory
from tests import REPO

warnings.filterwarnings("ignore", category=UserWarning)
ROOT = REPO


@pytest.mark.slow  # builds a wheel
def test_wheel_holds_only_the_surgery_package(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("surgery", "cli", "fixtures"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "whl"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "whl").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"surgery", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1]
                                                + ".dist-info"}
    assert "surgery/cli/main.py" in names and "surgery/cli/train_cmd.py" in names
    assert not any(n.startswith(("cli/", "fixtures/")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "surgery = surgery.cli.main:main" in zipfile.ZipFile(wheel).read(entry).decode()


PLANTED = "import pathlib, sys\npathlib.Path({marker!r}).write_text(__name__)\nsys.exit(0)\n"


def test_module_command_ignores_the_working_directory(tmp_path):
    hostile = tmp_path / "hostile"
    (hostile / "surgery").mkdir(parents=True)
    marker = tmp_path / "MARKER"
    (hostile / "surgery" / "__init__.py").write_text(PLANTED.format(marker=str(marker)))
    for mod in ("runpy", "json", "argparse"):  # what the bootstrap and the module import
        (hostile / f"{mod}.py").write_text(PLANTED.format(marker=str(marker)))
    cmd = module_command("surgery.inspection.arch_guess", ["--help"], root=str(ROOT))
    r = subprocess.run(cmd, cwd=hostile, capture_output=True, text=True, timeout=120)
    assert not marker.exists() and r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "surgery.inspection.arch_guess", "--help"], cwd=hostile, capture_output=True, timeout=120)
    assert marker.exists()  # what the bootstrap prevents: `python -m` imports the working directory first


@pytest.mark.slow  # torchrun with two workers
def test_nproc_workers_ignore_packages_planted_in_the_working_directory(tmp_path):
    """`surgery train --nproc 2` started as the console script would be, from a folder holding its
    own cli/, surgery/ and torch/ packages: none of them runs, and the run trains."""
    arch = write_factory(tmp_path)
    data = digits_imagefolder(tmp_path / "data", classes=range(5, 10), per_class=8, size=SIZE)
    torch.manual_seed(0)
    adapt(load_factory(arch)(5).state_dict(), arch=arch, num_classes=5, input_size=SIZE, out=tmp_path / "ad",
          freeze="head-only")
    hostile, marker = tmp_path / "hostile", tmp_path / "MARKER"
    for pkg in ("cli", "surgery", "torch"):
        (hostile / pkg).mkdir(parents=True)
        for mod in ("__init__", "main", "train_cmd"):
            (hostile / pkg / f"{mod}.py").write_text(PLANTED.format(marker=str(marker)))
    script = tmp_path / "bin" / "surgery"  # a console script: sys.path[0] is its folder, not the cwd
    script.parent.mkdir()
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom cli.main import main\nmain()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(script), "train", str(tmp_path / "ad"), "--data", str(data), "--epochs", "1",
                        "--out", str(out), "--batch-size", "8", "--device", "cpu", "--nproc", "2", "--json",
                        "--trust-code"], cwd=hostile, env=env, capture_output=True, text=True, timeout=300)
    assert not marker.exists(), f"planted {marker.read_text()} ran"
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout[r.stdout.index("{"):])["world_size"] == 2
    assert (out / "model.safetensors").is_file()
