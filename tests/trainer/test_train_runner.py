"""surgery.trainer.runner: fine-tuning end to end on real digits, phases, schedule, resume, cache, errors."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fixtures.factory import SIZE, factory_and_digits, load_factory, make_adapted
from fixtures.generate import digits_imagefolder
from surgery.adapter.core import load_adapted
from surgery import evaluate as _evaluate
from surgery import train as _train
from surgery.errors import ResumeError, SurgeryError, TrainInterrupted
from surgery.trainer.optim import LrMultiplier, optimizer_groups
from surgery.trainer.state import LAST, load_checkpoint

warnings.filterwarnings("ignore", category=UserWarning)

def train(*args, **kw):
    """These tests build their model from a file factory they wrote: they trust it."""
    return _train(*args, trust_code=True, **kw)

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Digits 5-9 (20 per class: 16 train + 4 val), a factory file and a random-init checkpoint."""
    root = tmp_path_factory.mktemp("train")
    arch, data, random_sd = factory_and_digits(root, 20, "digits59")
    return {"root": root, "arch": arch, "data": data, "random_sd": random_sd}


def _pretrain(arch: str, root: Path, per_class: int = 120, epochs: int = 12) -> Path:
    """SmallCNN trained on digits 0-4 for a few epochs, saved through nn.DataParallel in the
    legacy (pre-1.6, non-zip) format."""
    from surgery.trainer.data import build_transforms
    from surgery.trainer.samples import discover
    from PIL import Image

    data = digits_imagefolder(root / "digits04", classes=range(5), per_class=per_class, size=SIZE)
    tf = build_transforms(SIZE, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 3, train=False)
    s = discover(data)
    xs, ys = [], []
    for p, y in s.train + s.val:
        with Image.open(p) as im:
            xs.append(tf(im))
        ys.append(y)
    x, y = torch.stack(xs), torch.tensor(ys)
    torch.manual_seed(0)
    model = load_factory(arch)(5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 32):
            idx = perm[i:i + 32]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    path = root / f"pretrained_dp_legacy_{per_class}x{epochs}.pth"
    torch.save(nn.DataParallel(model).state_dict(), path, _use_new_zipfile_serialization=False)
    return path


@pytest.fixture(scope="module")
def pretrained(env):
    """A briefly pretrained backbone: what the schedule, resume and cache mechanics need."""
    return _pretrain(env["arch"], env["root"], per_class=24, epochs=2)


@pytest.fixture(scope="module")
def pretrained_well(env):
    """A backbone pretrained long enough that transfer measurably beats scratch."""
    return _pretrain(env["arch"], env["root"])


def _weights(out: Path) -> dict:
    return load_file(str(out / "model.safetensors"))


# ----------------------------------------------------------------------------- transfer beats scratch

@pytest.mark.slow  # a pretraining on 600 digits and two real fine-tunes, like the demo's table
@pytest.mark.real_plots  # the end-to-end run: every output as users get it
def test_finetune_beats_scratch(env, pretrained_well, tmp_path):
    def evaluate(*args, **kw):
        return _evaluate(*args, trust_code=True, **kw)

    # 10 images per class (8 train, 2 val); the held-out set is every other digit 5-9
    few = digits_imagefolder(tmp_path / "few59", classes=range(5, 10), per_class=10, size=SIZE)
    held_out = digits_imagefolder(tmp_path / "all59", classes=range(5, 10), size=SIZE) / "train"  # disjoint
    ft = make_adapted(pretrained_well, env["arch"], tmp_path / "ft", freeze="head-only", unfreeze_at=1)
    sc = make_adapted(env["random_sd"], env["arch"], tmp_path / "sc", freeze="none", backbone_lr_mult=1.0)
    kw = dict(epochs=4, lr=1e-2, seed=0, batch_size=16, augment=False)
    r_ft = train(ft, few, out=tmp_path / "run_ft", **kw)
    train(sc, few, out=tmp_path / "run_sc", **kw)
    assert [m["phase"] for m in r_ft.metrics] == ["head only"] + ["all"] * 3
    acc_ft = evaluate(tmp_path / "run_ft", held_out, split="all").accuracy
    acc_sc = evaluate(tmp_path / "run_sc", held_out, split="all").accuracy
    print(f"held-out accuracy: fine-tuned {acc_ft:.3f}, scratch {acc_sc:.3f}")
    # measured on CPU (torch 2.14): fine-tuned 0.480, scratch 0.285; the margin is kept below that
    assert acc_ft > acc_sc + 0.1, (acc_ft, acc_sc)
    # the pretrained weights came through DataParallel's 'module.' prefix and the legacy format
    assert json.loads((tmp_path / "ft" / "load_report.json").read_text())["backbone_coverage"] == 1.0
    # the outputs
    out = tmp_path / "run_ft"
    for name in ("metrics.jsonl", "curves.png", "confusion.png", "model.safetensors", "manifest.json",
                 "load_report.json", "run.log", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (out / name).is_file(), name
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3, 4]
    assert {"epoch", "phase", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s", "seconds",
            "trainable_params"} <= set(lines[0])
    assert lines[0]["trainable_params"] < lines[-1]["trainable_params"]
    man = json.loads((out / "manifest.json").read_text())
    assert man["class_names"] == ["5", "6", "7", "8", "9"] == man["head"]["class_names"]
    assert man["results"]["best_epoch"] == r_ft.best_epoch and man["schedule"]["unfreeze_at"] == 1
    model = load_adapted(out, trust_code=True)
    sd = _weights(out)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    assert not any(k.startswith("module.") for k in sd)


# ----------------------------------------------------------------------------- phases, schedule, resume

def test_frozen_phase_schedule_and_exact_resume(env, pretrained, tmp_path):
    ad = make_adapted(pretrained, env["arch"], tmp_path / "ad", freeze="head-only", unfreeze_at=2)
    start = load_file(str(ad / "model.safetensors"))
    kw = dict(epochs=4, lr=2e-3, seed=3, batch_size=16, flip=True, warmup_epochs=1, clip_grad=5.0)

    lrs_a: list[list[float]] = []
    ngroups = set()

    def rec(lrs):
        def obs(event, info):
            if event == "step":
                lrs.append(info["lrs"])
        return obs

    ra = train(ad, env["data"], out=tmp_path / "a", observer=rec(lrs_a), **kw)
    ngroups = {len(x) for x in lrs_a}
    assert len(ngroups) == 1  # no group added when the backbone unfroze

    # the lr of every group at every step is base lr x lr_mult x the schedule's multiplier, and the
    # backbone, opened at epoch 3, warms up over that epoch (a given lr is not re-measured)
    ck = load_checkpoint(tmp_path / "a" / "checkpoints" / LAST)
    groups = ck["optimizer"]["param_groups"]
    steps = len(lrs_a)
    per_epoch = steps // 4
    mult = LrMultiplier("cosine", steps, per_epoch)

    def expected(s: int, g: dict) -> float:
        ramp = min(1.0, (s - 2 * per_epoch + 1) / (per_epoch + 1)) if g["lr_mult"] != 1.0 and s >= 2 * per_epoch else 1.0
        return 2e-3 * g["lr_mult"] * mult(s) * ramp

    for s, lrs in enumerate(lrs_a):
        for g, lr in zip(groups, lrs):
            assert math.isclose(lr, expected(s, g), rel_tol=1e-9), (s, g["name"])
    assert {g["lr_mult"] for g in groups} == {1.0, 0.1}
    assert any(g["weight_decay"] == 0 for g in groups) and any(g["weight_decay"] > 0 for g in groups)
    assert all(g["name"].endswith("/no_decay") == (g["weight_decay"] == 0) for g in groups)

    # run b: interrupted (as by Ctrl-C) at the end of epoch 2, the last frozen epoch
    lrs_b: list[list[float]] = []

    def stop_after_2(event, info):
        if event == "step":
            lrs_b.append(info["lrs"])
        if event == "epoch_end" and info["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(TrainInterrupted, match=r"--resume") as ei:
        train(ad, env["data"], out=tmp_path / "b", observer=stop_after_2, **kw)
    assert ei.value.exit_code == 130
    mid = load_checkpoint(tmp_path / "b" / "checkpoints" / LAST)
    assert mid["epoch"] == 2
    # phase 1 left every frozen tensor bit-identical, BatchNorm running statistics included
    backbone = [k for k in start if not k.startswith("fc.")]
    assert backbone and all(torch.equal(mid["model"][k], start[k]) for k in backbone)
    assert not torch.equal(mid["model"]["fc.weight"], start["fc.weight"])
    assert "resume" in (tmp_path / "b" / "run.log").read_text()

    rb = train(ad, env["data"], out=tmp_path / "b", resume=True, observer=rec(lrs_b), **kw)
    assert lrs_b == lrs_a  # the resumed run continues the same curve
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
    la = load_checkpoint(tmp_path / "a" / "checkpoints" / LAST)["model"]
    lb = load_checkpoint(tmp_path / "b" / "checkpoints" / LAST)["model"]
    for k in la:
        torch.testing.assert_close(lb[k], la[k], rtol=1e-5, atol=1e-6)
    keys = ("epoch", "phase", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "trainable_params")
    assert [{k: m[k] for k in keys} for m in rb.metrics] == [{k: m[k] for k in keys} for m in ra.metrics]
    assert ra.metrics[1]["phase"] == "head only" and ra.metrics[2]["phase"] == "all"
    assert not any(backbone_k not in la for backbone_k in backbone)
    assert not all(torch.equal(la[k], start[k]) for k in backbone)  # the backbone trained after unfreezing


def test_lr_multiplier_shapes():
    cos = LrMultiplier("cosine", 100, 10)
    assert cos(0) == pytest.approx(1 / 11) and cos(10) == 1.0 and cos(99) < 0.01
    assert all(cos(s) >= cos(s + 1) for s in range(10, 99))
    const = LrMultiplier("constant", 50, 5)
    assert const(4) < 1 and const(5) == const(49) == 1.0
    one = LrMultiplier("onecycle", 100, 0)
    peak = max(range(100), key=one)
    assert one(0) == pytest.approx(1 / 25) and one(peak) == pytest.approx(1.0) and one(99) < 0.01


# ----------------------------------------------------------------------------- feature cache

def test_feature_cache_matches_uncached(env, pretrained, tmp_path):
    ad = make_adapted(pretrained, env["arch"], tmp_path / "ad", freeze="head-only", head="mlp", hidden=32)
    kw = dict(epochs=2, lr=3e-3, seed=1, batch_size=16, augment=False)
    r_on = train(ad, env["data"], out=tmp_path / "on", cache_features="on", **kw)
    r_off = train(ad, env["data"], out=tmp_path / "off", cache_features="off", **kw)
    assert r_on.cache_used and not r_off.cache_used
    a = load_checkpoint(tmp_path / "on" / "checkpoints" / LAST)["model"]
    b = load_checkpoint(tmp_path / "off" / "checkpoints" / LAST)["model"]
    head = [k for k in a if k.startswith("fc.")]
    assert head
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    for m_on, m_off in zip(r_on.metrics, r_off.metrics):
        assert m_on["val_acc"] == m_off["val_acc"]
        assert m_on["train_loss"] == pytest.approx(m_off["train_loss"], rel=1e-4)
    assert "feature cache on" in (tmp_path / "on" / "run.log").read_text()
    assert load_adapted(tmp_path / "on", trust_code=True)(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 5)
    # a head-only run checkpoints only what can change: the head, not the frozen backbone
    manifest = load_adapted(ad, trust_code=True).state_dict()
    head_keys = {k for k in manifest if k.startswith("fc.")}
    assert set(a) == head_keys
    final = load_adapted(tmp_path / "on", trust_code=True).state_dict()
    start = load_adapted(ad, trust_code=True).state_dict()
    assert all(torch.equal(final[k], start[k]) for k in start if k not in head_keys)


# ----------------------------------------------------------------------------- data problems

def test_corrupt_image_is_skipped_and_listed(env, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(env["data"], data)
    bad = sorted((data / "train" / "7").glob("*.png"))[0]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    ad = make_adapted(env["random_sd"], env["arch"], tmp_path / "ad", freeze="head-only")
    r = train(ad, data, epochs=1, lr=1e-3, out=tmp_path / "out", batch_size=32)
    assert [p for p, _ in r.skipped] == [str(bad)]
    log = (tmp_path / "out" / "run.log").read_text()
    assert str(bad) in log and "skipped 1 unreadable" in log
    assert r.cache_used  # head-only, nothing unfreezes: auto turns the cache on


@pytest.fixture(scope="module")
def adapted_random(env, tmp_path_factory):
    return make_adapted(env["random_sd"], env["arch"], tmp_path_factory.mktemp("ad") / "ad",
                        freeze="head-only", unfreeze_at=1)


def _refused(tmp_path, out, match, **kw):
    with pytest.raises(SurgeryError, match=match):
        train(kw.pop("adapted"), kw.pop("data"), epochs=kw.pop("epochs", 1), lr=1e-3, out=out, **kw)


def test_bad_inputs_are_refused_before_anything_is_written(env, adapted_random, tmp_path):
    out = tmp_path / "out"
    _refused(tmp_path, out, r"no such folder", adapted=adapted_random, data=tmp_path / "nope")
    assert not out.exists()
    three = tmp_path / "three"
    for split in ("train", "val"):
        for c in ("5", "6", "7"):
            shutil.copytree(env["data"] / split / c, three / split / c)
    _refused(tmp_path, out, r"found 3 classes .* 5 outputs", adapted=adapted_random, data=three)
    assert not out.exists()
    empty = tmp_path / "empty"
    shutil.copytree(env["data"], empty)
    for f in (empty / "train" / "6").iterdir():
        f.unlink()
    _refused(tmp_path, out, r"with no images: train/6", adapted=adapted_random, data=empty)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _refused(tmp_path, blocker / "out", r"is not a folder", adapted=adapted_random, data=env["data"])
    _refused(tmp_path, out, r"cache_features on: not possible.*from epoch 2",
             adapted=adapted_random, data=env["data"], cache_features="on", epochs=2)
    _refused(tmp_path, out, r"epochs must be a positive", adapted=adapted_random, data=env["data"], epochs=0)
    _refused(tmp_path, out, r"no checkpoint to resume", adapted=adapted_random, data=env["data"], resume=True)
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    _refused(tmp_path, existing, r"already exists; pass force=True", adapted=adapted_random, data=env["data"])
    assert list(existing.iterdir()) == []


def test_every_bad_option_is_named_in_one_error(tmp_path):
    with pytest.raises(SurgeryError, match=r"epochs must be a positive integer, got 0; .*batch_size must be a "
                                           r"positive integer, got 0"):
        train(tmp_path / "ad", tmp_path / "data", epochs=0, batch_size=0, out=tmp_path / "out")
    with pytest.raises(SurgeryError, match=r"^epochs is required"):
        train(tmp_path / "ad", tmp_path / "data", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_resume_from_incompatible_checkpoint(env, adapted_random, tmp_path):
    train(adapted_random, env["data"], epochs=1, lr=1e-3, out=tmp_path / "run", batch_size=32)
    other_arch = make_adapted({k: v for k, v in load_factory(env["arch"])(5, 8).state_dict().items()},
                              env["arch"] + "", tmp_path / "other", freeze="head-only", arch_kwargs={"width": 8})
    with pytest.raises(ResumeError, match=r"cannot resume .* parameters differ"):
        train(other_arch, env["data"], epochs=2, lr=1e-3, out=tmp_path / "run2",
              resume=tmp_path / "run" / "checkpoints" / LAST)
    assert not (tmp_path / "run2").exists()
    # the same model on data with other classes
    other = tmp_path / "otherdata"
    shutil.copytree(env["data"], other)
    for split in ("train", "val"):
        (other / split / "9").rename(other / split / "nine")
    with pytest.raises(ResumeError, match=r"classes differ"):
        train(adapted_random, other, epochs=2, lr=1e-3, out=tmp_path / "run", resume=True)
    with pytest.raises(ResumeError, match=r"not a readable training checkpoint|not a surgery training"):
        (tmp_path / "junk.pt").write_bytes(b"nope")
        train(adapted_random, env["data"], epochs=2, lr=1e-3, out=tmp_path / "run3", resume=tmp_path / "junk.pt")


def test_optimizer_groups_split_decay(env, adapted_random):
    model = load_adapted(adapted_random, trust_code=True)
    from surgery.adapter.manifest import read_manifest

    groups = optimizer_groups(model, read_manifest(adapted_random), 1e-3, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            assert (g["weight_decay"] == 0) == (p.ndim <= 1), names[id(p)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_a_trained_folder_finds_its_factory_after_the_project_moves(tmp_path):
    """The run's manifest stores the factory relative to the run folder (not to the adapted
    folder it copied the manifest from), so a project moved whole still loads its runs."""
    import surgery
    from fixtures.factory import adapted_factory_folder

    proj = tmp_path / "proj"
    proj.mkdir()
    data = adapted_factory_folder(proj, 6, freeze="head-only")
    run = proj / "runs" / "deep" / "r1"
    train(proj / "ad", data, epochs=1, lr=1e-3, batch_size=8, out=run)
    arch = json.loads((run / "manifest.json").read_text())["arch"]
    assert arch["relative"] == "../../../models.py" and arch["num_classes_kwarg"] is not None
    moved = tmp_path / "elsewhere"
    shutil.move(str(proj), str(moved))
    model = surgery.load_adapted(moved / "runs" / "deep" / "r1", trust_code=True)
    assert type(model).__name__ == "SmallCNN"
