"""`surgery train`, `evaluate`, `predict` through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

from surgery.adapter.core import load_adapted
from fixtures.factory import SIZE, adapted_factory_folder

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return root, adapted_factory_folder(root, 12, freeze="head-only", unfreeze_at=1)


def test_train_evaluate_predict_round_trip(cli, setup, tmp_path):
    root, data = setup
    out = tmp_path / "run"
    r = cli("train", "--trust-code", root / "ad", "--data", data, "--epochs", 2, "--lr", "5e-3", "--out", out, "--batch-size", 16,
            "--no-flip", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["epochs_run"] == 2 and res["class_names"] == ["5", "6", "7", "8", "9"]
    assert [m["phase"] for m in res["metrics"]] == ["head only", "all"]
    model = load_adapted(out, trust_code=True)
    sd = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    assert not torch.equal(sd["fc.weight"], load_file(str(root / "ad" / "model.safetensors"))["fc.weight"])

    r = cli("evaluate", "--trust-code", out, "--data", data, "--json")
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    assert ev["schema"] == "surgery.evaluate/1"
    assert ev["split"] == "val" and ev["images"] == 10
    assert ev["accuracy"] == pytest.approx(res["best_val_acc"])
    assert sum(map(sum, ev["confusion"])) == 10 and set(ev["per_class"]) == {"5", "6", "7", "8", "9"}
    r = cli("evaluate", "--trust-code", out, "--data", data, "--split", "all")
    assert r.exit_code == 0 and "all: 60 images" in r.stdout and "confusion matrix" in r.stdout

    imgs = sorted((data / "val" / "7").glob("*.png"))[:2]
    r = cli("predict", "--trust-code", out, *imgs, "--top-k", 3, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["schema"] == "surgery.predict/1" and doc["model"] == str(out)
    preds = doc["predictions"]
    assert [p["path"] for p in preds] == [str(i) for i in imgs]
    assert all(len(p["top"]) == 3 and p["top"][0]["class"] in {"5", "6", "7", "8", "9"} for p in preds)
    assert all(p["top"][0]["prob"] >= p["top"][1]["prob"] for p in preds)
    r = cli("predict", "--trust-code", out, imgs[0])
    assert r.exit_code == 0 and str(imgs[0]) in r.stdout
    # a folder stands for its images; one unreadable image is reported, the others still classified
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    r = cli("predict", "--trust-code", out, data / "val" / "7", bad, "--json")
    assert r.exit_code == 0, r.output
    preds = json.loads(r.stdout)["predictions"]
    assert [p["path"] for p in preds] == [*map(str, sorted((data / "val" / "7").glob("*.png"))), str(bad)]
    assert preds[-1]["top"] == [] and "cannot identify image" in preds[-1]["error"]
    assert all(p["top"] for p in preds[:-1])
    r = cli("predict", "--trust-code", out, bad, imgs[0])
    assert r.exit_code == 0 and f"warning: skipped {bad}: " in r.stderr and str(imgs[0]) in r.stdout
    r = cli("predict", "--trust-code", out, tmp_path / "empty_dir_that_is_missing")
    assert r.exit_code == 2 and "no such file" in r.stderr

    # resume: the bare flag continues OUT's last.pt; more epochs extend the run
    r = cli("train", "--trust-code", root / "ad", "--data", data, "--epochs", 3, "--lr", "5e-3", "--out", out, "--batch-size", 16,
            "--no-flip", "--resume", "--quiet")
    assert r.exit_code == 0, r.output
    assert "best epoch" in r.stdout and "train loss" not in r.stdout  # --quiet: the summary only
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_cli_errors_are_one_line_exit_2(cli, setup, tmp_path):
    root, data = setup
    r = cli("train", "--trust-code", root / "ad", "--data", tmp_path / "missing", "--epochs", 1, "--out", tmp_path / "o")
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "no such folder" in r.stderr and not (tmp_path / "o").exists()
    r = cli("train", "--trust-code", root / "ad", "--data", data, "--epochs", 2, "--out", tmp_path / "o", "--cache-features", "on")
    assert r.exit_code == 2 and "--cache-features on" in r.stderr and not (tmp_path / "o").exists()
    r = cli("predict", "--trust-code", root / "ad", tmp_path / "nope.png")
    assert r.exit_code == 2 and "nope.png" in r.stderr
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    r = cli("predict", "--trust-code", root / "ad", bad, "--json")
    assert r.exit_code == 2 and "bad.png" in r.stderr and r.stdout == ""
    r = cli("evaluate", "--trust-code", root / "ad", "--data", data, "--split", "test")
    assert r.exit_code == 2 and "--split" in r.stderr


def test_nproc_argv_is_rewritten():
    from surgery.trainer.distributed import launch_command, strip_nproc

    argv = strip_nproc(["ad", "--data", "d", "--nproc", "2", "--out", "o", "--nproc=3"])
    assert argv == ["ad", "--data", "d", "--out", "o"]
    cmd = launch_command(2, argv, module="cli.train_cmd")
    assert cmd[1] == "-c" and cmd[4:7] == ["torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert cmd[-6:] == ["cli.train_cmd", *argv] and "-m" not in cmd  # no `python -m`: the cwd is not imported


def test_image_size_override_is_recorded_for_evaluate(cli, setup, tmp_path):
    root, data = setup
    out = tmp_path / "small"
    r = cli("train", "--trust-code", root / "ad", "--data", data, "--epochs", 1, "--lr", "5e-3", "--out", out, "--batch-size", 16,
            "--no-flip", "--image-size", SIZE + 8, "--json")
    assert r.exit_code == 0, r.output
    best = json.loads(r.stdout)["best_val_acc"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input"]["size"] == [SIZE + 8, SIZE + 8]
    ev = json.loads(cli("evaluate", "--trust-code", out, "--data", data, "--json").stdout)
    assert ev["accuracy"] == pytest.approx(best)


def test_commands_report_errors_without_importing_torch(cli, tmp_path):
    code = ("import sys, cli.train_cmd, cli.evaluate_cmd, cli.predict_cmd, surgery.errors\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    r = cli("train", tmp_path / "ad", "--data", tmp_path, "--out", tmp_path / "o", "--nproc", 0)
    assert r.exit_code == 2 and "--nproc must be at least 1, got 0" in r.stderr
    r = cli("evaluate", tmp_path / "ad")
    assert r.exit_code == 2 and "--data is required" in r.stderr
