"""surgery advise: the regime from the data size and the probes, the rule, the CLI and its JSON."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from surgery.advice import LARGE_PER_CLASS, decide
from fixtures.factory import SIZE, factory_and_digits

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.mark.parametrize("per_class,pre,rnd,scr,preset,features", [
    (6, 0.90, 0.40, 0.45, "small-similar", "better"),           # pretrained features far ahead of both
    (LARGE_PER_CLASS, 0.95, 0.50, 0.70, "large-similar", "better"),
    (6, 0.70, 0.40, 0.85, "small-different", "better"),         # ahead of random, a short scratch run ahead of them
    (200, 0.70, 0.40, 0.85, "large-different", "better"),
    (6, 0.60, 0.58, 0.40, "small-different", "tied"),           # no better than random, scratch worse: early half
    (6, 0.60, 0.58, 0.62, "large-different", "tied"),           # ... and a scratch run as good: one lr
    (200, 0.60, 0.58, 0.40, "large-different", "tied"),
    (6, 0.40, 0.60, 0.30, "large-different", "worse"),          # worse than random: only an initialisation
    (200, 0.50, 0.65, 0.90, "large-different", "worse"),
])
def test_the_preset_follows_the_measured_numbers(per_class, pre, rnd, scr, preset, features):
    d = decide(per_class, pre, rnd, scr, n_val=200)
    assert (d["preset"], d["features"]) == (preset, features)
    assert d["negative_transfer"] is (features == "worse")
    assert d["domain"] == {"better": "similar" if preset.endswith("similar") else "different", "tied": "unclear",
                           "worse": "different"}[features]


def test_a_gap_within_the_noise_is_not_transfer():
    assert decide(6, 0.70, 0.60, 0.30, n_val=20)["features"] == "tied"  # 10 points on 20 images: noise
    assert decide(6, 0.70, 0.60, 0.30, n_val=5000)["preset"] == "small-similar"
    assert decide(6, 0.60, 0.70, 0.30, n_val=20)["features"] == "tied"
    assert decide(6, 0.60, 0.70, 0.30, n_val=5000)["features"] == "worse"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("advise")
    arch, data, weights = factory_and_digits(root, 12)
    ckpt = root / "random.pth"
    torch.save(weights, ckpt)
    return root, arch, data, ckpt


def test_cli_json_has_the_documented_fields_and_a_consistent_choice(cli, setup):
    root, arch, data, ckpt = setup
    r = cli("advise", ckpt, "--arch", arch, "--data", data, "--input-size", SIZE, "--no-flip", "--json")
    assert r.exit_code == 0, r.output
    a = json.loads(r.stdout)
    assert a["schema"] == "surgery.advice/1"
    assert {"preset", "size", "domain", "per_class", "classes", "probes", "noise", "noise_scratch", "features",
            "negative_transfer", "reasons", "commands", "seconds", "warnings"} <= set(a)
    assert [p["name"] for p in a["probes"]] == ["pretrained", "random", "scratch"]
    assert all(0 <= p["val_acc"] <= 1 and p["seconds"] >= 0 for p in a["probes"])
    acc = {p["name"]: p["val_acc"] for p in a["probes"]}
    n_val = 5 * 2  # 12 per class: 10 train, 2 val
    assert a["preset"] == decide(a["per_class"], acc["pretrained"], acc["random"], acc["scratch"], n_val)["preset"]
    assert a["per_class"] == 10 and a["size"] == "small"
    assert a["commands"][0].startswith(f"surgery adapt {ckpt} --arch") and f"--preset {a['preset']}" in a["commands"][0]
    assert a["commands"][1].startswith("surgery train adapted/ --data")
    d = decide(a["per_class"], acc["pretrained"], acc["random"], acc["scratch"], n_val)
    assert (a["features"], a["domain"], a["noise"], a["noise_scratch"]) == (d["features"], d["domain"], d["noise"],
                                                                            d["noise_scratch"])
    assert bool(a["warnings"]) is (a["features"] != "better")
    assert ("--compare-scratch" in a["commands"][1]) is (a["features"] != "better")


def test_cli_text_and_errors(cli, setup, tmp_path):
    root, arch, data, ckpt = setup
    r = cli("advise", ckpt, "--arch", arch, "--data", data, "--input-size", SIZE, "--no-flip")
    assert r.exit_code == 0, r.output
    assert "regime: small data (10 per class)" in r.stdout and "probe pretrained" in r.stdout
    assert "surgery adapt" in r.stdout and "surgery train" in r.stdout
    r = cli("advise", ckpt, "--arch", arch, "--data", tmp_path / "nope")
    assert r.exit_code == 2 and r.stderr.startswith("error:")
