"""--lr auto and --find-lr: the range test, its rule, and its hook into a training run."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from surgery.adapter.core import adapt
from surgery.trainer.lr_find import AHEAD, BACKOFF, SweepOptim, range_test, smooth, suggest
from surgery.trainer.runner import train
from fixtures.factory import SIZE, factory_and_digits

warnings.filterwarnings("ignore", category=UserWarning)


def _blobs(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 8, generator=g) + 2.0 * nn.functional.one_hot(y, 8).float()
    return x, y


def test_range_test_suggests_inside_the_sweep_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _blobs()
    rng = torch.get_rng_state()
    found = range_test(model, lambda: [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)], steps=80,
                       start=1e-5, end=10.0)
    assert 1e-5 <= found.suggestion <= 10.0
    assert found.lrs[0] == pytest.approx(1e-5) and found.lrs == sorted(found.lrs)
    assert found.suggestion == pytest.approx(max(min(found.descent_lr * AHEAD, found.min_lr), 1e-5))
    assert not found.head_only and found.lrs[0] <= found.descent_lr <= found.min_lr
    assert min(found.smoothed) < found.smoothed[0]  # it learned during the sweep
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics, bit for bit
    assert torch.equal(torch.get_rng_state(), rng)


def test_range_test_stops_when_the_loss_diverges():
    x, _ = _blobs()
    y = x.sum(1, keepdim=True)
    model = nn.Linear(8, 1)  # least squares: SGD blows up once the lr passes 2 / the largest curvature
    found = range_test(model, lambda: [(x, y)], optim=SweepOptim("sgd", loss_fn=nn.functional.mse_loss), steps=200,
                       start=1e-4, end=1e4)
    assert found.stopped == "diverged" and found.steps < 200
    assert found.suggestion < found.lrs[-1]


def _ramp(noise_at=55):
    """A network's curve, ten points a decade from 1e-6 to 1: a plateau at 3, a descent to 1
    between 1e-4 and 1e-2 (its middle at 1e-3), then a flat floor whose lowest point (0.95 at
    ``10 ** (noise_at / 10 - 6)``) is noise two decades past the descent."""
    lrs = [10.0 ** (k / 10 - 6) for k in range(61)]
    curve = [min(3.0, max(1.0, 5.0 - k / 10)) for k in range(61)]
    curve[noise_at] = 0.95
    return lrs, curve


def test_the_rule_is_the_minimum_over_ten_for_a_head_and_ahead_of_the_descent_for_a_network():
    lrs, curve = _ramp()
    suggestion, lr_min, mid = suggest(lrs, curve)
    assert lr_min == pytest.approx(10 ** -0.5)
    assert mid == pytest.approx(1e-3, rel=0.13)  # the middle of the descent, not of the floor
    assert suggestion == pytest.approx(AHEAD * mid)
    head = suggest(lrs, curve, head_only=True)
    assert head[0] == pytest.approx(10 ** -0.5 / BACKOFF) and head[2] is None


def test_noise_moves_the_middle_of_the_descent_little():
    # a lucky first batch, and batch-to-batch noise of +-0.4 on every step: the fit uses every point
    lrs, curve = _ramp()
    clean = suggest(lrs, curve)[2]
    noisy = [v + (0.4 if k % 2 else -0.4) * (k % 3 != 0) for k, v in enumerate(curve)]
    noisy[0] = 1.5
    assert suggest(lrs, curve, losses=noisy)[2] == pytest.approx(clean, rel=0.26)


def test_the_lowest_point_caps_a_late_descent():
    lrs = [10.0 ** (k / 10 - 6) for k in range(61)]
    curve = [3.0] * 41 + [3.0 - 0.2 * k for k in range(1, 11)] + [1.0 + k for k in range(1, 11)]  # min 1.0 at 1e-1
    suggestion, lr_min, mid = suggest(lrs, curve)
    assert lr_min == pytest.approx(1e-1) and mid * AHEAD > lr_min
    assert suggestion == pytest.approx(1e-1)


def test_the_rule_on_smoothed_losses_and_edge_cases():
    lrs = [10.0 ** (k / 4 - 6) for k in range(25)]  # 1e-6 .. 1
    losses = [3.0 - 0.1 * k for k in range(15)] + [1.6 + 0.5 * k for k in range(10)]
    sm = smooth(losses)
    i_min = sm.index(min(sm))
    assert suggest(lrs, sm, head_only=True)[:2] == (pytest.approx(lrs[i_min] / 10), lrs[i_min])
    assert suggest(lrs, [float("nan")] * 25)[0] == 1e-6  # nothing usable: the bottom of the sweep
    assert suggest(lrs, [2.0] * 25)[2] is None  # a loss that never fell has no descent
    rose = suggest(lrs, [2.0 + 0.1 * k for k in range(25)])  # it only rose: the bottom of the sweep
    assert rose[0] == 1e-6 and rose[2] is None


def test_a_lucky_first_batch_is_not_the_minimum():
    # the bias-corrected EMA's first value is the first batch's loss alone: a low one must not make
    # the bottom of the sweep the lowest point (it once made --lr auto train at 1e-6)
    lrs, curve = _ramp()
    curve[0] = 0.5
    suggestion, lr_min, mid = suggest(lrs, curve)
    assert lr_min == pytest.approx(10 ** -0.5) and suggestion == pytest.approx(AHEAD * mid)
    assert suggest(lrs, curve, head_only=True)[0] == pytest.approx(10 ** -0.5 / BACKOFF)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lrfind")
    arch, data, sd = factory_and_digits(root, 12)
    adapt(sd, arch=arch, num_classes=5, input_size=SIZE, out=root / "head", freeze="head-only")
    adapt(sd, arch=arch, num_classes=5, input_size=SIZE, out=root / "all", freeze="none")
    return root, data


@pytest.mark.parametrize("folder,cached", [("head", True), ("all", False)])
def test_lr_auto_trains_exactly_as_the_lr_it_found(setup, tmp_path, folder, cached):
    root, data = setup
    seen = {}
    r = train(root / folder, data, epochs=1, out=tmp_path / "auto", trust_code=True, batch_size=16, flip=False,
              observer=lambda e, i: seen.update(i) if e == "lr_find" else None)
    assert seen["cached"] is cached and seen["lrs"][0] <= seen["lr"] <= seen["lrs"][-1]
    assert seen["head_only"] is cached  # "head": only the head trains; "all": everything does
    assert (tmp_path / "auto" / "lr_find.png").stat().st_size > 1000
    assert json.loads((tmp_path / "auto" / "lr_find.json").read_text())["suggestion"] == seen["suggestion"]
    recorded = json.loads((tmp_path / "auto" / "manifest.json").read_text())["results"]["train_args"]
    assert recorded["lr"] == "auto" and recorded["lr_find"]["lr"] == seen["lr"]
    assert "(found)" in (tmp_path / "auto" / "run.log").read_text()
    fixed = train(root / folder, data, epochs=1, lr=seen["lr"], out=tmp_path / "fixed", trust_code=True, batch_size=16, flip=False)
    assert [m["val_loss"] for m in r.metrics] == pytest.approx([m["val_loss"] for m in fixed.metrics], rel=1e-5)
    assert not (tmp_path / "fixed" / "lr_find.png").exists()  # a given --lr is used as is


def test_cli_find_lr_prints_the_curve_and_writes_nothing_without_out(cli, setup, tmp_path):
    root, data = setup
    r = cli("train", "--trust-code", root / "head", "--data", data, "--find-lr", "--batch-size", 16, "--no-flip")
    assert r.exit_code == 0, r.output
    assert "on cached features" in r.stdout and "suggested lr" in r.stdout and "loss" in r.stdout
    r = cli("train", "--trust-code", root / "head", "--data", data, "--find-lr", "--json", "--out", tmp_path / "f")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["schema"] == "surgery.lr_find/1"
    assert (tmp_path / "f" / "lr_find.png").is_file()
    r = cli("train", "--trust-code", root / "head", "--data", data, "--lr", "fast", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "--lr 'fast': give a number" in r.stderr
    r = cli("train", "--trust-code", root / "head", "--data", data, "--epochs", 1, "--out", tmp_path / "run", "--no-flip")
    assert r.exit_code == 0 and "(found)" in r.stdout


def test_find_lr_sweeps_as_many_steps_as_the_run_of_epochs_would_have(setup):
    # a whole-model sweep is as long as the run (40 to 100 steps): --find-lr reads the run's length
    # from --epochs, so it shows the very curve that `--lr auto` would read
    from surgery.trainer.lr_find import END, START, find_lr

    root, data = setup
    per_step = {}
    for epochs in (1, 20):
        found = find_lr(root / "all", data, batch_size=16, flip=False, epochs=epochs, trust_code=True)
        per_step[epochs] = found.lrs[1] / found.lrs[0]
    steps_per_epoch = 4  # 60 training images at batch 16
    assert per_step[1] == pytest.approx((END / START) ** (1 / 39))  # 4 steps: the floor of 40
    assert per_step[20] == pytest.approx((END / START) ** (1 / (20 * steps_per_epoch - 1)))
