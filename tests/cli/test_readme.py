"""The README's examples run as shown, against fixtures copied under the README's file names: text
exact, figures from training within the noise the run reports (tests/cli/readme_claims.py)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests import REPO
from tests.cli.readme_claims import line_holds, validation_images

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


@pytest.mark.slow
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
        printed = result.stdout + result.stderr
        actual = [line.rstrip() for line in printed.splitlines()]
        n = validation_images(printed)
        for line in shown:
            if line.strip() == "..." or "━" in line or "┃" in line:
                continue
            why = line_holds(line, actual, n)
            assert why is None, f"README shows {line!r} under `{command}`: {why}; the command printed:\n" + "\n".join(actual)


def test_quick_start_has_two_commands_and_ci_runs_the_test_one():
    text = README.read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[1] in ci
    assert os.access(README.parent / ".ci" / "run", os.X_OK)


@pytest.mark.slow
def test_readme_python_examples_run(make, tmp_path, monkeypatch):
    _setup(make, tmp_path)
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})


def test_a_readme_figure_holds_within_the_noise_the_run_reports_and_text_stays_exact():
    shown = "pretrained best epoch 3 of 3: val acc 0.8900, val loss 0.4100  (out)"
    # 200 images: 4 standard errors of the difference of 0.89 and 0.81 is 0.139
    assert line_holds(shown, ["pretrained best epoch 17 of 3: val acc 0.8100, val loss 0.9000  (out)"], 200) is None
    assert "acc 0.8900 vs 0.6000" in line_holds(shown, ["pretrained best epoch 3 of 3: val acc 0.6000, val loss "
                                                         "0.4100  (out)"], 200)
    assert "loss 0.4100 vs 9.0000" in line_holds(shown, ["pretrained best epoch 3 of 3: val acc 0.8900, val loss "
                                                          "9.0000  (out)"], 200)
    # the count of epochs, a name, the words: exact
    for other in ("pretrained best epoch 3 of 4: val acc 0.8900, val loss 0.4100  (out)",
                  "scratch best epoch 3 of 3: val acc 0.8900, val loss 0.4100  (out)"):
        assert line_holds(shown, [other], 200) == "no printed line has the same text"
    # a range test's row: the lr of the sweep exact, the loss within a decade (or near zero), any bar
    sweep = "  lr 1.00e+00  loss   0.0142  #"
    assert line_holds(sweep, ["  lr 1.00e+00  loss   0.0021  ###"], 16) is None
    assert line_holds(sweep, ["  lr 1.00e+00  loss   1.3000  ###"], 16).startswith("figures beyond")
    assert line_holds(sweep, ["  lr 9.00e-01  loss   0.0142  #"], 16) == "no printed line has the same text"
    assert line_holds("tensors        122 (11.19M parameters, 44.8 MB)", ["tensors        122 (11.19M parameters, 44.9 MB)"],
                      None) == "not printed"


def test_a_verdict_keeps_its_words_and_its_size_stays_within_the_noise():
    shown = "verdict: pretrained wins by 8.0 points (noise +-5.0)"
    assert line_holds(shown, ["verdict: pretrained wins by 14.5 points (noise +-6.2)"], 200) is None
    assert line_holds(shown, ["verdict: pretrained wins by 30.0 points (noise +-6.2)"], 200).startswith("figures beyond")
    assert line_holds(shown, ["verdict: negative transfer: scratch wins by 8.0 points (noise +-5.0); the pretrained "
                              "features do not help this task"], 200) == "no printed line has the same text"
    tie = "verdict: no measurable transfer: +18.8 points is within the noise (+-34.7 on 16 validation images)"
    assert line_holds(tie, ["verdict: no measurable transfer: -6.3 points is within the noise (+-33.0 on 16 "
                            "validation images)"], 16) is None


def test_who_wins_stays_who_wins():
    from tests.cli.readme_claims import same_winner

    assert same_winner((0.97, 0.89), (0.955, 0.81), 200)  # the pretrained run wins beyond the noise on both
    assert not same_winner((0.97, 0.89), (0.90, 0.89), 200)  # a README win the run does not show
    assert not same_winner((0.97, 0.89), (0.80, 0.89), 200)
    assert same_winner((0.97, 0.975), (0.99, 0.95), 200)  # a tie claims only that b does not win
    assert not same_winner((0.97, 0.975), (0.395, 0.955), 200)  # a collapse behind a tied README
    assert same_winner((0.5, 0.9), (0.4, 0.95), 200) and not same_winner((0.5, 0.9), (0.88, 0.9), 200)
