"""surgery train --compare-scratch: both runs, the verdict, metrics.jsonl and the plot."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from surgery.trainer.compare import verdict
from fixtures.factory import adapted_factory_folder

warnings.filterwarnings("ignore", category=UserWarning)


def test_verdict_weighs_the_difference_against_the_noise():
    assert verdict(0.90, 0.60, 200).winner == "pretrained"
    v = verdict(0.60, 0.90, 200)
    assert v.winner == "scratch" and v.text.startswith("negative transfer")
    assert verdict(0.70, 0.65, 20).winner == "tie"
    assert verdict(0.70, 0.65, 20).noise == pytest.approx(2 * ((0.7 * 0.3 + 0.65 * 0.35) / 20) ** 0.5)


@pytest.mark.real_plots
def test_compare_scratch_writes_both_runs_and_the_verdict(cli, tmp_path):
    data = adapted_factory_folder(tmp_path, 12, freeze="head-only")
    out = tmp_path / "run"
    r = cli("train", "--trust-code", tmp_path / "ad", "--data", data, "--epochs", 2, "--lr", "1e-2", "--batch-size", 16,
            "--no-flip", "--out", out, "--compare-scratch", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["schema"] == "surgery.compare/1" and rep["verdict"]["winner"] in ("pretrained", "scratch", "tie")
    assert rep["scratch"]["out"] == str(out / "scratch") and rep["pretrained"]["out"] == str(out)
    assert json.loads((out / "compare.json").read_text()) == rep
    assert (out / "compare.png").stat().st_size > 1000
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(m["scratch_val_acc"] is not None for m in lines)
    assert max(m["scratch_val_acc"] for m in lines) == rep["scratch"]["best_val_acc"]
    scratch_manifest = json.loads((out / "scratch" / "manifest.json").read_text())
    assert all(g["trainable"] and g["lr_mult"] == 1.0 for g in scratch_manifest["groups"])
    assert scratch_manifest["bn"]["policy"] == "train"
    # from random weights: the backbone differs from the adapted one's
    a, s = load_file(str(tmp_path / "ad" / "model.safetensors")), load_file(str(out / "scratch" / "model.safetensors"))
    assert not torch.equal(a["features.0.weight"], s["features.0.weight"])
    assert not list(out.glob(".scratch-init-*"))  # the temporary init is gone

    r = cli("train", "--trust-code", tmp_path / "ad", "--data", data, "--epochs", 1, "--lr", "1e-2", "--batch-size", 16,
            "--no-flip", "--out", out, "--compare-scratch", "--force")
    assert r.exit_code == 0, r.output
    assert "verdict:" in r.stdout and "scratch" in r.stdout
