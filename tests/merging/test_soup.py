"""`surgery soup`: the greedy rule keeps a run that helps and refuses one that harms, the uniform soup is
the float64 mean, the interpolation warns about runs in different basins, OUT is a run that
`surgery evaluate` takes, and mismatched runs are refused before anything is written.

The ingredients are one small CNN trained briefly on 100 digits, and copies of its folder whose weights
were changed on purpose: ``W + D`` and ``W - D`` (each damaged, their mean is ``W`` again), ``W`` with
noise far larger than its weights (harmful in any soup), and ``W`` with its hidden channels permuted
(the same function, in another basin)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import surgery
from fixtures.factory import SIZE, adapted_factory_folder
from surgery.io import sha256_file

warnings.filterwarnings("ignore", category=UserWarning)
RUN = dict(trust_code=True, batch_size=8, seed=0, image_size=SIZE, flip=False, augment=False)
PERMUTED = (("features.0", "features.1", None), ("features.4", "features.5", None), ("features.8", "features.9", "fc"))


def variant(run: Path, dst: Path, change) -> Path:
    """A copy of ``run`` whose weights are ``change(weights)``, pinned in its manifest as a run's are."""
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("checkpoints", "*.png"))
    w = change({k: v.clone() for k, v in load_file(str(run / "model.safetensors")).items()})
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["files"]["weights_sha256"] = sha256_file(dst / "model.safetensors")
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _shifted(sign: float, scale: float = 8.0):
    """The head moved by ``sign * D``: D fixed, a few times the head's own size."""
    def change(w):
        g = torch.Generator().manual_seed(7)
        for k in ("fc.weight", "fc.bias"):
            w[k] += sign * scale * w[k].abs().mean() * torch.randn(w[k].shape, generator=g)
        return w
    return change


def _wrecked(w):
    g = torch.Generator().manual_seed(11)
    return {k: v + 50 * v.abs().mean() * torch.randn(v.shape, generator=g) if v.is_floating_point() and "running" not in k
            else v for k, v in w.items()}


def _permuted(w):
    """Every hidden channel relabelled: conv out-channels, their BatchNorm, the next layer's in-channels."""
    g = torch.Generator().manual_seed(3)
    for conv, bn, nxt in PERMUTED:
        n = w[f"{conv}.weight"].shape[0]
        p = torch.randperm(n, generator=g)
        w[f"{conv}.weight"] = w[f"{conv}.weight"][p]
        for k in ("weight", "bias", "running_mean", "running_var"):
            w[f"{bn}.{k}"] = w[f"{bn}.{k}"][p]
        following = nxt or PERMUTED[PERMUTED.index((conv, bn, nxt)) + 1][0]
        w[f"{following}.weight"] = w[f"{following}.weight"][:, p]
    return w


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("soup")
    data = adapted_factory_folder(root, 20, freeze="none")
    surgery.train(root / "ad", data, epochs=4, lr=1e-2, out=root / "run", **RUN)
    good = root / "run"
    return {"data": data, "good": good, "root": root,
            "plus": variant(good, root / "plus", _shifted(+1)), "minus": variant(good, root / "minus", _shifted(-1)),
            "wrecked": variant(good, root / "wrecked", _wrecked), "permuted": variant(good, root / "permuted", _permuted)}


def test_the_greedy_rule_keeps_a_run_that_helps_and_refuses_one_that_harms(runs, tmp_path):
    rep = surgery.soup([runs["wrecked"], runs["plus"], runs["minus"]], runs["data"], tmp_path / "soup",
                       trust_code=True)
    by_path = {i["path"]: i["val_acc"] for i in rep.ingredients}
    good = surgery.evaluate(runs["good"], runs["data"], trust_code=True).accuracy
    assert max(by_path[str(runs["plus"])], by_path[str(runs["minus"])]) < good  # each damaged alone
    assert sorted(rep.kept) == sorted([str(runs["plus"]), str(runs["minus"])])  # together: W again
    (refused,) = [s for s in rep.steps if not s["kept"]]
    assert refused["path"] == str(runs["wrecked"]) and refused["gain"] <= refused["noise"]
    (kept,) = [s for s in rep.steps if s["kept"]]
    assert kept["gain"] > kept["noise"] > 0
    assert rep.val_acc["greedy"] > rep.val_acc["best_run"] and rep.val_acc["greedy"] > rep.val_acc["uniform"]
    assert rep.verdict == "soup"


def test_the_uniform_soup_is_the_float64_mean_and_evaluates_as_a_run(runs, tmp_path, cli):
    ins = [runs["plus"], runs["minus"], runs["good"]]
    rep = surgery.soup(ins, runs["data"], tmp_path / "soup", method="uniform", trust_code=True)
    sds = [load_file(str(p / "model.safetensors")) for p in ins]
    got = load_file(str(tmp_path / "soup" / "model.safetensors"))
    assert got.keys() == sds[0].keys()
    recomputed = rep.bn["kept"] == "recomputed"
    for k, v in sds[0].items():
        if not v.is_floating_point():
            want = v
        else:
            want = (sum(sd[k].to(torch.float64) for sd in sds) / len(sds)).to(v.dtype)
        if recomputed and ("running" in k or "num_batches" in k):
            continue  # recomputed on the training images, not averaged
        assert torch.equal(got[k], want), k
    r = cli("evaluate", tmp_path / "soup", "--data", runs["data"], "--trust-code", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["accuracy"] == pytest.approx(rep.val_acc["out"])
    assert rep.val_acc["uniform"] == pytest.approx(rep.bn["averaged"])


def test_runs_in_different_basins_are_warned_about_before_mixing(runs, tmp_path, cli):
    r = cli("soup", runs["good"], runs["permuted"], "--data", runs["data"], "--out", tmp_path / "soup", "--trust-code")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("loss from "))
    assert lines[at + 1].startswith("warning: the loss halfway between") and "do not share a basin" in lines[at + 1]
    assert any(line.startswith("  refused ") for line in lines[at + 2:])  # the greedy steps come after
    assert "no run improved the best one beyond the noise" in r.stdout


def test_json_follows_its_schema(runs, tmp_path, cli):
    r = cli("soup", runs["good"], runs["plus"], "--data", runs["data"], "--out", tmp_path / "soup", "--trust-code",
            "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["schema"] == "surgery.soup/1"
    assert {"ingredients", "kept", "val_acc", "noise", "bn", "verdict", "interpolation"} <= set(d)
    assert [set(i) >= {"path", "val_acc"} for i in d["ingredients"]] == [True, True]
    assert d["ingredients"][0]["path"] == str(runs["good"]) and d["kept"][0] == str(runs["good"])
    assert set(d["val_acc"]) == {"best_run", "uniform", "greedy", "out"}
    (step,) = d["noise"]
    assert set(step) == {"path", "val_acc", "soup_val_acc", "gain", "noise", "kept"}
    assert d["interpolation"]["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0] and len(d["interpolation"]["losses"]) == 5
    assert d["interpolation"]["losses"][0] == pytest.approx(d["interpolation"]["losses"][0])
    assert d["bn"]["kept"] in ("averaged", "recomputed") and d["bn"]["modules"] == 3
    assert d["verdict"] in ("soup", "best-run", "no-gain")


def test_force_replaces_a_soup(runs, tmp_path, cli):
    (tmp_path / "soup").mkdir()
    (tmp_path / "soup" / "manifest.json").write_text("{}")
    r = cli("soup", runs["good"], runs["plus"], "--data", runs["data"], "--out", tmp_path / "soup", "--trust-code")
    assert r.exit_code == 2 and "already exists; pass --force" in r.stderr
    r = cli("soup", runs["good"], runs["plus"], "--data", runs["data"], "--out", tmp_path / "soup", "--trust-code",
            "--force", "--method", "uniform", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "soup" / "manifest.json").read_text())["results"]["soup"]["method"] == "uniform"


def _manifest_edit(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "*.png"))
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def _shape_changed(w):
    w["fc.weight"] = torch.zeros(5, 32)
    return w


@pytest.mark.parametrize("what, make, message", [
    ("classes", lambda r, d: _manifest_edit(r, d, lambda m: m.update(class_names=list("abcde"))),
     "the runs are not one model: .* has class names"),
    ("architecture", lambda r, d: _manifest_edit(r, d, lambda m: m["arch"].update(kwargs={"width": 8})),
     "the runs are not one model: .* has architecture"),
    ("shapes", lambda r, d: variant(r, d, _shape_changed), r"'fc.weight' is F32 \[5, 64\] in .* but F32 \[5, 32\]"),
])
def test_mismatched_runs_are_one_line_errors_and_nothing_is_written(runs, tmp_path, cli, what, make, message):
    other = make(runs["good"], tmp_path / what)
    r = cli("soup", runs["good"], other, "--data", runs["data"], "--out", tmp_path / "soup", "--trust-code")
    assert r.exit_code == 2, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    import re
    assert re.search(message, r.stderr), r.stderr
    assert not (tmp_path / "soup").exists()


def test_runs_that_split_the_data_differently_are_refused(runs, tmp_path, cli):
    def split(seed):
        return lambda m: m["results"]["train_args"].update(val_split=0.25, seed=seed)

    a = _manifest_edit(runs["good"], tmp_path / "a", split(0))
    b = _manifest_edit(runs["good"], tmp_path / "b", split(1))
    flat = runs["data"] / "train"  # class folders, no split: each run's --seed splits it
    r = cli("soup", a, b, "--data", flat, "--out", tmp_path / "soup", "--trust-code")
    assert r.exit_code == 2 and "split it differently" in r.stderr, r.output
    assert not (tmp_path / "soup").exists()


def test_a_factory_needs_trust_and_bad_arguments_are_refused(runs, tmp_path, cli):
    args = [runs["good"], runs["plus"], "--data", runs["data"], "--out", tmp_path / "soup"]
    r = cli("soup", *args)
    assert r.exit_code == 2 and "pass --trust-code" in r.stderr, r.output
    r = cli("soup", runs["good"], "--data", runs["data"], "--out", tmp_path / "soup", "--trust-code")
    assert r.exit_code == 2 and "needs two trained runs or more" in r.stderr
    r = cli("soup", runs["good"], runs["good"], "--data", runs["data"], "--out", tmp_path / "soup", "--trust-code")
    assert r.exit_code == 2 and "given twice" in r.stderr
    r = cli("soup", *args, "--trust-code", "--method", "best")
    assert r.exit_code == 2 and "--method 'best': choose one of greedy, uniform" in r.stderr
    r = cli("soup", runs["good"], runs["plus"], "--data", runs["data"], "--out", runs["good"] / "inner", "--trust-code")
    assert r.exit_code == 2 and "lies inside the source" in r.stderr
    assert not (tmp_path / "soup").exists() and not (runs["good"] / "inner").exists()


def test_a_split_given_on_the_command_line_does_not_hide_runs_that_split_differently(runs, tmp_path, cli):
    """--seed scores every run on one split, but each run trained on its own: one's validation
    images would still be another's training images."""
    def split(seed):
        return lambda m: m["results"]["train_args"].update(val_split=0.25, seed=seed)

    a = _manifest_edit(runs["good"], tmp_path / "a", split(0))
    b = _manifest_edit(runs["good"], tmp_path / "b", split(1))
    r = cli("soup", a, b, "--data", runs["data"] / "train", "--seed", "0", "--out", tmp_path / "soup", "--trust-code")
    assert r.exit_code == 2 and "split it differently" in r.stderr, r.output
    assert not (tmp_path / "soup").exists()


def test_a_diverged_run_leaves_the_json_strict(runs, tmp_path, cli):
    """A run whose weights went NaN has a NaN loss: --json writes null there, not the bare NaN no
    strict JSON reader accepts."""
    def nan(w):
        return {k: torch.full_like(v, float("nan")) if k == "fc.bias" else v for k, v in w.items()}

    bad = variant(runs["good"], tmp_path / "nan", nan)
    r = cli("soup", runs["good"], bad, "--data", runs["data"], "--out", tmp_path / "soup", "--trust-code", "--json")
    assert r.exit_code == 0, r.output

    def refuse(constant):
        raise ValueError(f"{constant} in --json output")

    data = json.loads(r.stdout, parse_constant=refuse)
    assert data["ingredients"][1]["val_loss"] is None
