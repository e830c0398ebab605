"""`surgery adapt` through the CLI (a local app: the lead wires it into cli/main.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import typer
from typer.testing import CliRunner

from cli import adapt_cmd
from fixtures.generate import tiny_model


@pytest.fixture
def run():
    app = typer.Typer(pretty_exceptions_enable=False)
    adapt_cmd.register(app)

    @app.callback()
    def _root() -> None:
        """test app"""

    runner = CliRunner(env={"NO_COLOR": "1", "COLUMNS": "200"})
    return lambda *args: runner.invoke(app, ["adapt", *map(str, args)])


@pytest.fixture(scope="module")
def ddp_resnet(tmp_path_factory):
    p = tmp_path_factory.mktemp("ck") / "ddp_resnet18.pth"
    torch.save({"module." + k: v for k, v in tiny_model("resnet18", 1000).state_dict().items()}, p)
    return p


def test_adapt_writes_folder_and_prints_groups(run, ddp_resnet, tmp_path):
    out = tmp_path / "out"
    r = run(ddp_resnet, "--arch", "resnet18", "--num-classes", 4, "--out", out, "--freeze-until", "layer3",
            "--unfreeze-at", 2)
    assert r.exit_code == 0, r.stderr
    assert "stripped module." in r.stdout and "coverage 100.0%" in r.stdout
    # --unfreeze-at 2: epochs 1 and 2 train the head only, the rest trains from epoch 3 (train's count)
    assert "layer2" in r.stdout and "epoch 3" in r.stdout and "trainable now" in r.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schedule"] == {"kind": "unfreeze_at", "unfreeze_at": 2, "order": []}
    report = json.loads((out / "load_report.json").read_text())
    assert report["head_new"]["grouped"] == ["fc.{weight,bias}"]


@pytest.mark.parametrize("args, says", [
    (["--freeze", "none"], "BatchNorm: all 20 layers update their statistics while training (nothing is frozen)"),
    (["--freeze", "none", "--bn", "train"], "BatchNorm: all 20 layers update their statistics while training (--bn train)"),
    (["--freeze-until", "layer3"], "BatchNorm: 10 of 20 layers keep their pretrained statistics for the whole run (eval mode, also after an unfreeze); the other 10 update theirs"),
])
def test_the_batchnorm_line_says_what_is_true(run, ddp_resnet, tmp_path, args, says):
    r = run(ddp_resnet, "--arch", "resnet18", "--num-classes", 4, "--out", tmp_path / "out", *args)
    assert r.exit_code == 0, r.stderr
    assert says in r.stdout, r.stdout


def test_adapt_rules_and_json(run, ddp_resnet, tmp_path):
    r = run(ddp_resnet, "--arch", "resnet18", "--num-classes", 4, "--out", tmp_path / "o", "--drop", r"layer4\.1\.",
            "--head", "mlp", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert any(k.startswith("layer4.1.") for k in data["load_report"]["missing"]["keys"])
    assert data["head"]["kind"] == "mlp" and data["head"]["classifier"] == "fc.7"


@pytest.mark.parametrize("args,match", [
    (["--arch", "resnt18", "--num-classes", "4"], "did you mean resnet18"),
    (["--arch", "resnet18", "--num-classes", "0"], "--num-classes must be a positive integer"),
    (["--arch", "resnet18", "--num-classes", "4", "--freeze-until", "nope"], "valid: conv1, bn1"),
    (["--arch", "resnet18", "--num-classes", "4", "--preset", "small-similar", "--freeze-first", "2"], "--preset small-similar decides"),
    (["--arch", "mobilenet_v3_small", "--num-classes", "4"], "matches almost nothing of mobilenet_v3_small.*resnet18"),
])
def test_adapt_errors_exit_2_one_line(run, ddp_resnet, tmp_path, args, match):
    import re

    out = tmp_path / "out"
    r = run(ddp_resnet, *args, "--out", out)
    assert r.exit_code == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and re.search(match, r.stderr)
    assert "Traceback" not in r.stderr and not out.exists()


def test_module_imports_no_torch():
    code = "import sys, cli.adapt_cmd, surgery.adapter; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
