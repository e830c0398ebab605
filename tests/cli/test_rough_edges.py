"""What a user meets in the first hour: adapt's messages and options, prefixes, rules files."""

from __future__ import annotations

import json

import pytest
import torch

from fixtures.generate import tiny_model
from surgery.adapter.core import adapt
from surgery.errors import AdaptError, RuleError
from surgery.remapping import Rules, plan_names
from tests import REPO


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    p = tmp_path_factory.mktemp("ck") / "resnet18.pth"
    torch.save(tiny_model("resnet18", 10).state_dict(), p)
    return p


def test_adapt_counts_unfreeze_epochs_from_one_as_train_does(cli, resnet, tmp_path):
    r = cli("adapt", resnet, "--arch", "resnet18", "--num-classes", 3, "--freeze", "head-only", "--unfreeze-at", 3,
            "--input-size", 32, "--out", tmp_path / "ad")
    assert r.exit_code == 0, r.output
    # --unfreeze-at 3: three head-only epochs, the backbone trains from train's epoch 4
    assert "epoch 4" in r.stdout and "epoch 3" not in r.stdout
    assert json.loads((tmp_path / "ad" / "manifest.json").read_text())["groups"][0]["unfreeze_at"] == 3


def test_adapt_quiet_prints_only_the_folder(cli, resnet, tmp_path):
    r = cli("adapt", resnet, "--arch", "resnet18", "--num-classes", 3, "--input-size", 32, "--out", tmp_path / "ad",
            "-q")
    assert r.exit_code == 0, r.output
    assert r.stdout == f"wrote {tmp_path / 'ad'}\n"


def test_adapt_json_carries_its_schema(cli, resnet, tmp_path):
    r = cli("adapt", resnet, "--arch", "resnet18", "--num-classes", 3, "--input-size", 32, "--out", tmp_path / "ad",
            "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["schema"] == "surgery.adapt/1"


def test_a_missing_num_classes_says_it_is_required(cli, resnet, tmp_path):
    r = cli("adapt", resnet, "--arch", "resnet18", "--out", tmp_path / "ad")
    assert r.exit_code == 2 and "--num-classes is required" in r.stderr and "got 0" not in r.stderr


def test_freeze_first_counts_only_children_with_parameters(resnet):
    # resnet18's children: conv1 bn1 relu maxpool layer1 ... ; relu and maxpool hold nothing
    _, rep = adapt(str(resnet), arch="resnet18", num_classes=3, input_size=32, freeze_first=3)
    frozen = {g["name"] for g in rep.groups if not g["trainable"]}
    assert frozen == {"conv1", "bn1", "layer1"}
    with pytest.raises(AdaptError, match=r"only 7 top-level children with parameters \(conv1, bn1, layer1, layer2, "
                                         r"layer3, layer4, fc\)"):
        adapt(str(resnet), arch="resnet18", num_classes=3, input_size=32, freeze_first=8)
    with pytest.raises(AdaptError, match=r"--freeze-until 'relu' names no module with parameters; valid: conv1, bn1, "
                                         r"layer1") as e:
        adapt(str(resnet), arch="resnet18", num_classes=3, input_size=32, freeze_until="relu")
    assert "maxpool" not in str(e.value)


def test_a_preset_with_freeze_first_says_one_thing(resnet):
    with pytest.raises(AdaptError) as e:
        adapt(str(resnet), arch="resnet18", num_classes=3, input_size=32, preset="small-similar", freeze_first=2)
    assert str(e.value) == ("--preset small-similar decides what is frozen; drop --freeze-first or drop the preset")


def test_a_wrapper_prefix_on_all_but_the_wrappers_own_entries(cli, tmp_path):
    """torch's AveragedModel (SWA/EMA) saves module.* and its own n_averaged."""
    model = tiny_model("resnet18", 10)
    sd = torch.optim.swa_utils.AveragedModel(model).state_dict()
    assert [k for k in sd if not k.startswith("module.")] == ["n_averaged"]
    torch.save(sd, tmp_path / "swa.pth")
    r = cli("inspect", tmp_path / "swa.pth", "--depth", 0)
    assert r.exit_code == 0, r.output
    assert "module. (DataParallel/DDP) on 122 of 123 keys; not on n_averaged" in r.stdout
    assert "keys are clean" not in r.stdout and "architecture  resnet18" in r.stdout
    r = cli("remap", tmp_path / "swa.pth", tmp_path / "clean.safetensors", "--auto", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["schema"] == "surgery.remap/1" and doc["ops"] == [{"op": "--auto", "matched": 122}]
    names = {t["new"] for t in doc["tensors"]}
    assert "fc.weight" in names and "n_averaged" in names


def test_a_prefix_on_a_dotted_minority_is_not_a_wrapper():
    from surgery.keys import detect_wrapper_prefixes

    keys = [f"module.l{i}.weight" for i in range(20)] + ["head.weight"]
    assert detect_wrapper_prefixes(keys) == []  # a real submodule named 'head', not a wrapper's entry
    assert detect_wrapper_prefixes(["module.a.w", "module.b.w", "n", "m"]) == []  # more than one in ten


def test_repeated_keep_is_a_union():
    plan = plan_names(["a.w", "b.w", "c.w"], Rules.from_json({"ops": [{"keep": "^a"}, {"keep": "^b"}]}).ops)
    assert plan.kept == {"a.w": "a.w", "b.w": "b.w"}
    assert [n for _, n in plan.op_counts] == [1, 1]
    # a keep after another op starts a new selection
    plan = plan_names(["a.w", "b.w"], Rules.from_json({"ops": [{"keep": "^a"}, {"drop": "x"}, {"keep": "^b"}]}).ops)
    assert plan.kept == {}


def test_a_toml_rules_file_is_named_as_such(tmp_path):
    p = tmp_path / "rules.toml"
    p.write_text('[[ops]]\nauto = true\n')
    with pytest.raises(RuleError, match=r"rules.toml: rules files are JSON or YAML \(.yml/.yaml\); TOML is not read"):
        Rules.from_file(p)


def test_torchvisions_init_notice_does_not_leak(tmp_path):
    import subprocess
    import sys

    import torchvision

    torch.save(torchvision.models.googlenet(init_weights=False, aux_logits=True, num_classes=10).state_dict(),
               tmp_path / "g.pth")
    r = subprocess.run([sys.executable, "-m", "cli.main", "adapt", str(tmp_path / "g.pth"), "--arch", "googlenet",
                        "--num-classes", "3", "--input-size", "64", "--out", str(tmp_path / "ad"), "-q"],
                       capture_output=True, text=True, cwd=REPO,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and r.stdout == f"wrote {tmp_path / 'ad'}\n"


@pytest.mark.real_plots
def test_curves_show_learning_rates_and_mark_the_best_epoch_and_early_stop(tmp_path, monkeypatch):
    from surgery.trainer import plots

    drawn: list[tuple[int, str]] = []
    real = plots._mark
    monkeypatch.setattr(plots, "_mark", lambda ax, e, label, style: (drawn.append((e, label)), real(ax, e, label, style)))
    metrics = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "train_acc": 0.2 * e, "val_acc": 0.18 * e,
                "lr": {"head": 1e-3 / e, "layer4": 0.0 if e < 3 else 1e-4 / e}} for e in range(1, 5)]
    path = plots.plot_curves(metrics, tmp_path / "curves.png", unfreeze_epochs=[3], best_epoch=2, stopped_at=4)
    assert path.read_bytes().startswith(b"\x89PNG")
    # every panel (loss, accuracy, learning rate) carries the three marks
    assert sorted(set(drawn)) == [(2, "best"), (3, "unfreeze"), (4, "early stop")] and len(drawn) == 9
    plots.plot_confusion([[2, 0], [1, 1]], ["a", "b"], tmp_path / "cm.png", title="Confusion matrix (validation, best epoch 2)")
