"""--lr auto and --find-lr: the range test, its rule, and its hook into a training run."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from surgery.adapter.core import adapt
from surgery.trainer.lr_find import BACKOFF, range_test, smooth, suggest
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
    assert found.suggestion == pytest.approx(max(min(found.min_lr / BACKOFF, found.half_lr), 1e-5))
    assert not found.head_only and found.lrs[0] <= found.half_lr <= found.min_lr
    assert min(found.smoothed) < found.smoothed[0]  # it learned during the sweep
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics, bit for bit
    assert torch.equal(torch.get_rng_state(), rng)


def test_range_test_stops_when_the_loss_diverges():
    x, _ = _blobs()
    y = x.sum(1, keepdim=True)
    model = nn.Linear(8, 1)  # least squares: SGD blows up once the lr passes 2 / the largest curvature
    found = range_test(model, lambda: [(x, y)], optimizer="sgd", steps=200, start=1e-4, end=1e4,
                       loss_fn=nn.functional.mse_loss)
    assert found.stopped == "diverged" and found.steps < 200
    assert found.suggestion < found.lrs[-1]


def test_the_rule_is_the_minimum_over_ten_for_a_head_and_half_way_down_for_a_network():
    # a network's curve: a plateau, a descent from 3 to 1 between 1e-4 and 1e-2, then a flat floor
    # whose lowest point (0.95 at 10^-0.5) is noise two decades past the descent
    lrs = [10.0 ** (k / 10 - 6) for k in range(61)]  # 1e-6 .. 1, ten points a decade
    curve = [min(3.0, max(1.0, 5.0 - k / 10)) for k in range(61)]
    curve[55] = 0.95
    suggestion, lr_min, half = suggest(lrs, curve)
    assert lr_min == pytest.approx(10 ** -0.5)
    assert half == pytest.approx(10 ** -2.9)  # the first point below (3 + 0.95) / 2 = 1.975
    assert suggestion == half
    head = suggest(lrs, curve, head_only=True)
    assert head[0] == pytest.approx(10 ** -0.5 / BACKOFF) and head[2] is None


def test_a_lucky_first_batch_is_not_the_half_way_point():
    # the first smoothed value is the first batch's loss: a low one dips below the half-way level
    # before anything trained; the descent's own crossing counts
    lrs = [10.0 ** (k / 10 - 6) for k in range(61)]
    curve = [min(3.0, max(1.0, 5.0 - k / 10)) for k in range(61)]
    curve[0], curve[55] = 1.5, 0.95
    assert suggest(lrs, curve)[2] == pytest.approx(10 ** -2.9)


def test_the_minimum_over_ten_caps_a_late_descent():
    lrs = [10.0 ** (k / 10 - 6) for k in range(61)]
    curve = [3.0] * 41 + [3.0 - 0.2 * k for k in range(1, 11)] + [1.0 + k for k in range(1, 11)]  # min 1.0 at 1e-1
    suggestion, lr_min, half = suggest(lrs, curve)
    assert lr_min == pytest.approx(1e-1) and half > lr_min / BACKOFF
    assert suggestion == pytest.approx(1e-2)


def test_the_rule_on_smoothed_losses_and_edge_cases():
    lrs = [10.0 ** (k / 4 - 6) for k in range(25)]  # 1e-6 .. 1
    losses = [3.0 - 0.1 * k for k in range(15)] + [1.6 + 0.5 * k for k in range(10)]
    sm = smooth(losses)
    i_min = sm.index(min(sm))
    assert suggest(lrs, sm, head_only=True)[:2] == (pytest.approx(lrs[i_min] / 10), lrs[i_min])
    assert suggest(lrs, [float("nan")] * 25)[0] == 1e-6  # nothing usable: the bottom of the sweep
    assert suggest(lrs, [2.0] * 25)[2] is None  # a loss that never fell has no half-way point


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
