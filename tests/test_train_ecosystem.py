"""What users of timm, fastai and Lightning expect of a training run: augmentation policies,
mixup/cutmix, EMA, gradient accumulation, class balance, TensorBoard, and TTA in evaluate/predict."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import pytest
import torch

from surgery.trainer.state import load_checkpoint
from tests.test_train_runner import adapted_factory_folder

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eco")
    return root, adapted_factory_folder(root, 12, freeze="head-only", unfreeze_at=1)


def _train(cli, root, data, out, *extra):
    return cli("train", "--trust-code", root / "ad", "--data", data, "--epochs", 2, "--lr", "5e-3", "--out", out,
               "--batch-size", 8, "--no-flip", "--cache-features", "off", *extra)


def test_every_option_together_runs_and_is_recorded(cli, setup, tmp_path):
    root, data = setup
    out = tmp_path / "run"
    r = _train(cli, root, data, out, "--augment", "trivialaugment", "--mixup", "0.2", "--cutmix", "1.0",
               "--ema", "0.9", "--accumulate", "2", "--class-weights", "auto", "--balanced-sampler", "--tensorboard",
               "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 <= m["ema_val_acc"] <= 1 and m["ema_val_loss"] > 0 for m in rows)
    manifest = json.loads((out / "manifest.json").read_text())
    results = manifest["results"]
    assert results["weights"] == res["best_weights"] and res["best_weights"] in ("raw", "ema")
    args = results["train_args"]
    assert (args["augment"], args["mixup"], args["cutmix"], args["ema"], args["accumulate"], args["class_weights"],
            args["balanced_sampler"]) == ("trivialaugment", 0.2, 1.0, 0.9, 2, "auto", True)
    log = (out / "run.log").read_text()
    assert "augment trivialaugment; mixup 0.2; cutmix 1; accumulate 2 batches per step (effective batch 16)" in log
    assert "ema decay 0.9; class weights 5 1.00, 6 1.00" in log and "balanced sampler" in log
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_accumulate_counts_optimizer_steps(cli, setup, tmp_path):
    """60 training images at batch 8: 8 batches, so 4 optimizer steps per epoch with
    --accumulate 2; the schedule runs over those steps, and AdamW's step count says so."""
    root, data = setup
    r = _train(cli, root, data, tmp_path / "acc", "--accumulate", "2", "--no-augment")
    assert r.exit_code == 0, r.output
    n_train = sum(1 for _ in (data / "train").rglob("*.png"))
    batches = math.ceil(n_train / 8)
    steps = math.ceil(batches / 2)
    assert f"schedule cosine over {2 * steps} steps" in (tmp_path / "acc" / "run.log").read_text()
    opt = load_checkpoint(tmp_path / "acc" / "checkpoints" / "last.pt")["optimizer"]
    counts = {float(s["step"]) for s in opt["state"].values()}
    assert counts == {2.0 * steps, 1.0 * steps}  # the head trains both epochs, the backbone (unfrozen at 1) one
