"""The unfreeze and the guard: the unfrozen phase gets an lr chosen for it, the opened groups warm
up, a collapse after the unfreeze is undone, and phases are labelled by what trains."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from surgery import train
from surgery.errors import TrainInterrupted
from surgery.trainer import lr_unfreeze, phases
from surgery.trainer.optim import LrMultiplier
from fixtures.factory import SIZE, adapted_factory_folder, factory_and_digits, make_adapted

warnings.filterwarnings("ignore", category=UserWarning)
RUN = dict(trust_code=True, batch_size=8, seed=3, image_size=SIZE, flip=False, augment=False)


@pytest.fixture(scope="module")
def two_phase(tmp_path_factory):
    """The small CNN, head only for 2 epochs, then everything (backbone at 0.1x)."""
    root = tmp_path_factory.mktemp("phases")
    data = adapted_factory_folder(root, 8, freeze="head-only", unfreeze_at=2)
    return root, data


@pytest.fixture(scope="module")
def collapsing(tmp_path_factory):
    """The same, but the backbone at 100x the head's lr: the unfreeze wrecks it."""
    root = tmp_path_factory.mktemp("collapse")
    arch, data, weights = factory_and_digits(root, 8)
    make_adapted(weights, arch, root / "ad", freeze="head-only", unfreeze_at=2, backbone_lr_mult=300.0)
    return root, data


def _steps(events: list) -> list[dict]:
    return [info for event, info in events if event == "step"]


def test_the_unfrozen_phase_gets_an_lr_measured_for_it(two_phase, tmp_path):
    root, data = two_phase
    r = train(root / "ad", data, epochs=4, out=tmp_path / "run", **RUN)
    assert [m["phase"] for m in r.metrics] == ["head only", "head only", "all", "all"]
    (u,) = r.unfreeze
    assert u["epoch"] == 3 and u["found"]["rule"] == lr_unfreeze.RULE
    found = json.loads((tmp_path / "run" / "lr_find.json").read_text())
    first = found["phases"][0]["lr"]
    assert [p["epoch"] for p in found["phases"]] == [1, 3]
    assert 0 < u["lr"] <= first and found["phases"][1]["lr"] == u["lr"]
    assert found["unfreeze"]["ceiling_lr"] == pytest.approx(10 * found["unfreeze"]["suggestion"])
    assert (tmp_path / "run" / "lr_find_unfreeze.png").is_file()
    log = (tmp_path / "run" / "run.log").read_text()
    assert "unfreeze at epoch 3" in log and "range test of" in log
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["results"]["train_args"]["unfreezes"][0]["lr"] == u["lr"]
    assert manifest["results"]["train_args"]["guard"] is True  # the option, not the events
    # what trains after the unfreeze trains at the measured lr, not the first phase's
    assert r.metrics[3]["lr"]["head"] < first
    assert r.head_phase_best["epoch"] <= 2 and r.after_unfreeze_best["epoch"] >= 3


def test_opened_groups_warm_up_over_one_epoch(two_phase, tmp_path):
    root, data = two_phase
    events = []
    r = train(root / "ad", data, epochs=4, lr=1e-2, out=tmp_path / "run", schedule="constant", warmup_epochs=0,
              observer=lambda e, i: events.append((e, i)), **RUN)
    steps = _steps(events)
    per_epoch = len(steps) // 4
    after = [s for s in steps if s["epoch"] == 3]
    assert len(after) == per_epoch
    # groups: the head's (lr 1e-2, mult 1) and the backbone's (mult 0.1); its lr ramps up linearly
    ramp = [s["lrs"][-1] for s in after]
    backbone = [lr for lr in after[0]["lrs"] if lr < 1e-2 - 1e-12]
    assert backbone and backbone[0] == pytest.approx(1e-3 / (per_epoch + 1))
    assert all(a <= b for a, b in zip(ramp, ramp[1:]))
    assert all(lr == pytest.approx(1e-3) for lr in (s["lrs"][0] for s in steps if s["epoch"] == 4)
               if lr < 1e-2 - 1e-12)
    assert r.unfreeze[0]["groups"] and "lr" not in r.unfreeze[0]  # a given lr is not re-measured
    assert "lr 1.0e-2 (given)" in r.unfreeze[0]["message"]


def test_the_guard_restores_the_best_weights_and_cuts_the_lr(collapsing, tmp_path):
    root, data = collapsing
    r = train(root / "ad", data, epochs=4, lr=1e-2, out=tmp_path / "run", **RUN)
    assert r.guard, [m["val_loss"] for m in r.metrics]
    g = r.guard[0]
    assert g["epoch"] >= 3 and g["restored_epoch"] <= 2 and g["val_loss"] > g["limit"]
    log = (tmp_path / "run" / "run.log").read_text()
    assert f"guard: epoch {g['epoch']}'s val loss" in log and "--no-guard" in log
    assert r.metrics[g["epoch"] - 1]["guard"]["restored_epoch"] == g["restored_epoch"]
    # the run goes on from the restored weights at a tenth of the lr
    assert r.metrics[-1]["val_loss"] < r.metrics[g["epoch"] - 1]["val_loss"]
    assert r.best_epoch != g["epoch"]

    off = train(root / "ad", data, epochs=4, lr=1e-2, out=tmp_path / "off", guard=False, **RUN)
    assert not off.guard and "guard:" not in (tmp_path / "off" / "run.log").read_text()
    assert off.metrics[-1]["val_loss"] > r.metrics[-1]["val_loss"]


def test_resume_is_exact_across_a_guard_event(collapsing, tmp_path):
    root, data = collapsing
    full = train(root / "ad", data, epochs=5, lr=1e-2, out=tmp_path / "full", **RUN)
    at = full.guard[0]["epoch"]

    def stop(event, info):
        if event == "epoch_end" and info["epoch"] == at:
            raise KeyboardInterrupt

    with pytest.raises(TrainInterrupted):
        train(root / "ad", data, epochs=5, lr=1e-2, out=tmp_path / "part", observer=stop, **RUN)
    resumed = train(root / "ad", data, out=tmp_path / "part", resume=True, trust_code=True)
    assert [m["val_loss"] for m in resumed.metrics] == [m["val_loss"] for m in full.metrics]
    assert resumed.guard == full.guard
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "part" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_phase_labels_say_what_trains(tmp_path):
    root = tmp_path
    arch, data, weights = factory_and_digits(root, 6)
    make_adapted(weights, arch, root / "part", freeze_regex=r"^features\.0\.")
    r = train(root / "part", data, epochs=1, lr=1e-3, out=root / "run", **RUN)
    (label,) = [m["phase"] for m in r.metrics]
    assert label.startswith("partial: ") and label.endswith("% trains"), label
    assert 50 < int(label.split()[1].rstrip("%")) < 100
    assert "[frozen]" not in (root / "run" / "run.log").read_text()


def test_a_multiplier_saves_its_phase_state_as_plain_data():
    f = LrMultiplier("cosine", 100, 10)
    f.scale = 0.25
    f.open_at(40, 5)
    assert f(40) == pytest.approx(f.schedule(40) * 0.25 / 6)
    assert f(60) == pytest.approx(f.schedule(60) * 0.25)
    g = LrMultiplier("cosine", 100, 10)
    g.__dict__.update(vars(f))
    assert g(41) == f(41) and all(isinstance(v, (int, float, str, type(None))) for v in vars(f).values())


def test_the_unfreeze_rule_reads_where_the_probe_passes_its_start():
    lrs = [1e-6 * 10 ** (i / 10) for i in range(60)]
    # the probe falls a little (the head keeps learning), then rises once the lr hurts
    probe = [0.3 - 0.001 * i if i < 30 else 0.27 * 1.2 ** (i - 30) for i in range(60)]
    pick, lr_min, ceiling, rose = lr_unfreeze.suggest(lrs, probe, 0.3)
    assert ceiling == lrs[33] and pick == pytest.approx(ceiling / 10) and rose  # 0.27 x 1.2^3 > 1.5 x 0.3
    assert lr_min == lrs[30]
    # a probe that never rises: the end of the sweep is the ceiling, and the words say so
    assert lr_unfreeze.suggest(lrs, [0.3] * 60, 0.3)[2:] == (lrs[-1], False)
    assert lr_unfreeze.suggest(lrs, [0.3] * 10 + [float("nan")] * 50, 0.3)[2:] == (lrs[10], True)


def test_a_gradual_unfreeze_goes_back_and_measures_once(tmp_path):
    arch, data, weights = factory_and_digits(tmp_path, 6)
    make_adapted(weights, arch, tmp_path / "ad", freeze="head-only", gradual=True)
    r = train(tmp_path / "ad", data, epochs=4, out=tmp_path / "run", **RUN)
    assert len(r.unfreeze) >= 2
    first, later = r.unfreeze[0], r.unfreeze[1:]
    assert "found" in first and all("found" not in u and "from_epoch" not in u for u in later)
    assert all("kept from the unfreeze" in u["message"] for u in later)


def test_the_guard_fires_on_a_loss_that_is_not_a_number_and_only_so_often():
    class Opts:
        guard = True

    class Run:
        opts, resolved = Opts(), {}
        inputs = type("I", (), {"manifest": type("M", (), {"groups": [
            {"name": "head", "trainable": True}, {"name": "body", "trainable": False, "unfreeze_at": 1}]})()})()
        progress = type("P", (), {"history": [{"epoch": 1, "val_loss": 0.5}], "best_state": None})()

    # without best weights nothing can be restored: no event; the limit itself
    assert phases.guard(Run(), {"epoch": 2, "val_loss": float("nan")}) is None
    assert phases.guard_limit(0.5) == 1.0 and phases.guard_limit(0.01) == pytest.approx(0.06)
    run = Run()
    run.resolved = {phases.GUARD_EVENTS_KEY: [{}] * phases.GUARD_EVENTS}
    run.progress.best_state = {}
    assert phases.guard(run, {"epoch": 2, "val_loss": 9.0}) is None  # spent


def test_the_guard_option_survives_a_guard_event_and_resume(collapsing, tmp_path):
    root, data = collapsing

    def obs(event, info):
        if event == "epoch_end" and info.get("guard"):
            raise KeyboardInterrupt

    with pytest.raises(TrainInterrupted):
        train(root / "ad", data, epochs=5, lr=1e-2, out=tmp_path / "run", observer=obs, **RUN)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["args"]["guard"] is True and ckpt["args"]["guard_events"]
    r = train(root / "ad", data, out=tmp_path / "run", resume=True, trust_code=True)
    assert r.guard and all(isinstance(g, dict) for g in r.guard)


def test_a_zero_multiplier_does_not_break_the_unfreeze(tmp_path):
    arch, data, weights = factory_and_digits(tmp_path, 6)
    make_adapted(weights, arch, tmp_path / "ad", freeze_regex=r"^features\.0\.", unfreeze_at=1, backbone_lr_mult=0.0)
    r = train(tmp_path / "ad", data, epochs=2, out=tmp_path / "run", **RUN)
    assert r.unfreeze and r.unfreeze[0]["lr"] > 0


def test_a_resumed_run_keeps_the_averaged_best_weights_when_they_won():
    from surgery.trainer.prepare import best_weights

    raw, avg = torch.zeros(2), torch.ones(2)
    best = {"model": {"fc.weight": raw}, "ema": {"module.fc.weight": avg, "module.pool.x": avg, "n_averaged": 3}}
    assert best_weights(best, "ema", {"fc.weight"})["fc.weight"] is avg
    assert best_weights(best, "raw", {"fc.weight"})["fc.weight"] is raw


def test_evaluate_reads_a_malformed_results_section_as_no_defaults():
    from surgery.trainer.evaluate import train_args

    class M:
        def __init__(self, results):
            self.data = {"results": results}

    assert train_args(M("x")) == {} and train_args(M({"train_args": 5})) == {}
    assert train_args(M({"train_args": {"seed": 3}})) == {"seed": 3}
