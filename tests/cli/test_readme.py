"""The README's examples run as shown, against fixtures copied under the README's file names."""

from __future__ import annotations

import os
import re
import shlex
import shutil
from pathlib import Path

from typer.testing import CliRunner

from cli.main import app
from tests import REPO

README = REPO / "README.md"
FILES = {"dp.pth": "dataparallel_pt", "lightning.ckpt": "lightning_ckpt", "resnet18.pth": "resnet18_pt",
         "timm_args.pth": "timm_args_pth"}


def _examples() -> list[tuple[str, list[str]]]:
    """(command line, the output lines shown under it) for every `$ surgery` line in console blocks."""
    out = []
    for block in re.findall(r"```console\n(.*?)```", README.read_text(), re.S):
        current = None
        for line in block.splitlines():
            if line.startswith("$ surgery "):
                current = (line[2:], [])
                out.append(current)
            elif current is not None and line.strip():
                current[1].append(line.rstrip())
    return out


def _setup(make, folder: Path) -> None:
    from fixtures.generate import digits_imagefolder

    for name, fixture in FILES.items():
        shutil.copy(make(fixture), folder / name)
    digits_imagefolder(folder / "digits", classes=range(4), per_class=20, size=32)


def test_readme_examples_run_as_shown(make, tmp_path, monkeypatch):
    _setup(make, tmp_path)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner(env={"NO_COLOR": "1", "COLUMNS": "100"})
    examples = _examples()
    assert len(examples) >= 8
    for command, shown in examples:
        args = shlex.split(command)[1:]
        result = runner.invoke(app, args)
        expect_error = bool(shown) and shown[0].startswith("error:")
        assert result.exit_code == (2 if expect_error else 0), (command, result.stdout, result.stderr)
        actual = [line.rstrip() for line in (result.stdout + result.stderr).splitlines()]
        for line in shown:
            if line.strip() == "..." or "━" in line or "┃" in line:
                continue
            assert line in actual, f"README shows {line!r} under `{command}`, the command printed:\n" + "\n".join(actual)


def test_quick_start_has_two_commands_and_ci_runs_the_test_one():
    text = README.read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[1] in ci
    assert os.access(README.parent / ".ci" / "run", os.X_OK)


def test_readme_python_examples_run(make, tmp_path, monkeypatch):
    _setup(make, tmp_path)
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
