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
from fixtures.factory import adapted_factory_folder

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
    """50 training images at batch 8: 7 batches, so 4 optimizer steps per epoch with
    --accumulate 2 (the last takes one batch); the schedule runs over those steps, and AdamW's
    step count says so."""
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


def test_ema_resume_is_exact(setup, tmp_path):
    """The average is part of the checkpoint: a run interrupted after epoch 1 and resumed ends
    with the same weights and the same average as one that was not."""
    from surgery import train
    from surgery.errors import TrainInterrupted

    root, data = setup
    run = dict(trust_code=True, epochs=2, lr=5e-3, batch_size=8, flip=False, cache_features="off", ema=0.5,
               accumulate=2, mixup=0.4)

    def stop_after_first(event, info):
        if event == "epoch_end" and info["epoch"] == 1:
            raise KeyboardInterrupt

    train(root / "ad", data, out=tmp_path / "whole", **run)
    with pytest.raises(TrainInterrupted):
        train(root / "ad", data, out=tmp_path / "cut", observer=stop_after_first, **run)
    train(root / "ad", data, out=tmp_path / "cut", resume=True, trust_code=True)
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert a["ema"].keys() == b["ema"].keys() and a["args"] == b["args"]
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_skewed_classes_get_weights_and_a_per_class_line(cli, setup, tmp_path):
    root, data = setup
    skewed = tmp_path / "skewed"
    shutil.copytree(data, skewed)
    for p in sorted((skewed / "train" / "5").glob("*.png"))[3:]:
        p.unlink()  # class 5 keeps 3 training images, the others 12
    out = tmp_path / "run"
    r = _train(cli, root, skewed, out, "--class-weights", "auto")
    assert r.exit_code == 0, r.output
    assert "skewed classes; val acc per class: 5 " in r.stdout
    log = (out / "run.log").read_text()
    n = [3, 10, 10, 10, 10]
    want = ", ".join(f"{c} {sum(n) / (5 * k):.2f}" for c, k in zip("56789", n))
    assert f"class weights {want}" in log and "classes are skewed (train images 3 to 10 per class)" in log
    r = cli("train", "--trust-code", root / "ad", "--data", data, "--epochs", 1, "--lr", "5e-3", "--out", tmp_path / "even",
            "--batch-size", 8, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["per_class_val_acc"] is None


def test_balanced_sampler_draws_classes_evenly(setup):
    from surgery.preprocess import InputPipeline, resize_for
    from surgery.trainer.data import make_loaders
    from surgery.trainer.samples import discover

    _, data = setup
    s = discover(data)
    s.train = [t for t in s.train if t[1] != 0 or t[0].endswith(("0.png", "1.png"))]  # class 0 rare
    pipe = InputPipeline((16, 16), resize_for(16), 3, (0.5,) * 3, (0.5,) * 3, "bilinear")
    dl, _ = make_loaders(s, pipe, batch_size=8, balanced=True, augment=False)
    labels = torch.cat([y for _, y in dl]).tolist()
    share = labels.count(0) / len(labels)
    assert len(labels) == len(s.train) and 0.05 < share < 0.5  # 1 in 5 expected; without it about 1 in 25


def test_tensorboard_holds_the_run_scalars(cli, setup, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, data = setup
    out = tmp_path / "tb"
    r = _train(cli, root, data, out, "--tensorboard", "--no-augment")
    assert r.exit_code == 0, r.output
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "epoch/val_acc", "epoch/train_loss"} <= tags and any(t.startswith("lr/") for t in tags)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in acc.Scalars("epoch/val_acc")] == pytest.approx([m["val_acc"] for m in rows])
    batches = math.ceil(sum(1 for _ in (data / "train").rglob("*.png")) / 8)
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 2 * batches + 1))
    r = _train(cli, root, data, out, "--force", "--no-augment")  # --force replaces what --tensorboard wrote
    assert r.exit_code == 0, r.output


def test_tta_in_evaluate_and_predict(cli, setup, tmp_path):
    root, data = setup
    out = tmp_path / "run"
    assert _train(cli, root, data, out, "--no-augment").exit_code == 0
    r = cli("evaluate", "--trust-code", out, "--data", data, "--tta", "--json")
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    t = ev["tta"]
    assert t["views"] == 5  # trained with --no-flip: no mirrored views
    assert 0 <= t["accuracy"] <= 1 and t["difference"] == pytest.approx(t["accuracy"] - ev["accuracy"])
    r = cli("evaluate", "--trust-code", out, "--data", data, "--tta")
    assert r.exit_code == 0 and "with TTA (5 views): accuracy" in r.stdout
    img = sorted((data / "val" / "7").glob("*.png"))[0]
    plain = json.loads(cli("predict", "--trust-code", out, img, "--top-k", 5, "--json").stdout)["predictions"][0]
    tta = json.loads(cli("predict", "--trust-code", out, img, "--top-k", 5, "--tta", "--json").stdout)["predictions"][0]
    assert sum(x["prob"] for x in tta["top"]) == pytest.approx(1.0, abs=1e-5)
    assert [x["prob"] for x in tta["top"]] != [x["prob"] for x in plain["top"]]


@pytest.mark.parametrize("extra, message", [
    (("--augment", "bogus"), "--augment must be one of none, light, randaugment, trivialaugment, got 'bogus'"),
    (("--augment", "randaugment", "--no-augment"), "--no-augment and --augment randaugment contradict each other"),
    (("--mixup", "-1"), "--mixup is the alpha of a Beta distribution"),
    (("--ema", "1.5"), "--ema is a decay between 0 and 1"),
    (("--accumulate", "0"), "--accumulate must be a positive integer"),
    (("--class-weights", "inverse"), "--class-weights 'inverse': choose one of none, auto"),
    (("--mixup", "0.2", "--cache-features", "on"), "--mixup/--cutmix mix whole images"),
])
def test_bad_options_are_one_line(cli, setup, tmp_path, extra, message):
    root, data = setup
    r = cli("train", "--trust-code", root / "ad", "--data", data, "--epochs", 1, "--out", tmp_path / "x", *extra)
    assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "x").exists()


def test_colour_policies_refuse_four_channels(cli, tmp_path):
    root = tmp_path
    data = adapted_factory_folder(root, 4, freeze="head-only", in_chans=4)
    r = cli("train", "--trust-code", root / "ad", "--data", data, "--epochs", 1, "--out", root / "x", "--augment",
            "randaugment")
    assert r.exit_code == 2 and "take 1- or 3-channel images; this model takes 4 channels" in r.stderr, r.output
