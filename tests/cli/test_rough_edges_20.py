"""Rough edges of the CLI and the Python API: pipes, --force beside exports, help texts and
warnings, the interrupt and skipped-image messages, evaluate's hint, keyword names in Python
errors, remap's tuple ops, adapt's assumed input and --mean/--std, timm's img_size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from fixtures.factory import SIZE, adapted_factory_folder
from tests import REPO

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("edges")
    return root, adapted_factory_folder(root, 8, freeze="head-only", unfreeze_at=1)


def _train(cli, root: Path, data: Path, out: Path, *extra):
    return cli("train", "--trust-code", root / "ad", "--data", data, "--epochs", 1, "--lr", "5e-3", "--out", out,
               "--batch-size", 16, "--no-flip", *extra)


# ----------------------------------------------------------------------------- train: pipes and OUT

@pytest.mark.slow
def test_a_closed_stdout_pipe_does_not_kill_the_run(setup, tmp_path):
    """`surgery train ... | head -2`: the reader goes away after two lines; the run still ends
    with every file written, and exits 0."""
    root, data = setup
    out = tmp_path / "run"
    args = [sys.executable, "-m", "cli.main", "train", "--trust-code", str(root / "ad"), "--data", str(data),
            "--epochs", "3", "--lr", "5e-3", "--out", str(out), "--batch-size", "16", "--no-flip"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, NO_COLOR="1"))
    first = [proc.stdout.readline() for _ in range(2)]
    proc.stdout.close()  # what `head -2` does once it has its lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert first[0].startswith(b"surgery train: ") and err == ""
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert {"model.safetensors", "manifest.json", "run.log", "curves.png"} <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize("exported", ["model.onnx", "model.torchscript.pt", "model.pt2"])
def test_force_replaces_a_run_that_surgery_export_wrote_into(cli, setup, tmp_path, exported):
    root, data = setup
    out = tmp_path / "run"
    assert _train(cli, root, data, out, "--quiet").exit_code == 0
    for name in (exported, exported + ".preprocess.json"):  # what `surgery export run/` leaves there
        (out / name).write_bytes(b"exported")
    r = _train(cli, root, data, out, "--quiet", "--force")
    assert r.exit_code == 0, r.output
    assert not (out / exported).exists() and (out / "model.safetensors").is_file()
    (out / "notes.txt").write_text("mine")  # a file surgery did not write is still refused
    r = _train(cli, root, data, out, "--quiet", "--force")
    assert r.exit_code == 2 and "notes.txt" in r.stderr


# ----------------------------------------------------------------------------- train: help, warnings, messages

def _helps(command: str) -> dict[str, str]:
    import typer.main

    from cli.main import app

    group = typer.main.get_command(app)
    return {p.opts[0]: p.help for p in group.commands[command].params if p.opts[0].startswith("--")}


def test_train_help_says_what_zero_means():
    helps = _helps("train")
    assert "0 for one epoch" not in helps["--warmup-epochs"] and "0: no warmup" in helps["--warmup-epochs"]
    assert "0 (the default): one plain view, so the cached head trains without augmentation" in helps["--cache-views"]


def test_class_weights_with_the_balanced_sampler_warn(cli, setup, tmp_path):
    root, data = setup
    r = _train(cli, root, data, tmp_path / "run", "--class-weights", "auto", "--balanced-sampler")
    assert r.exit_code == 0, r.output
    said = "warning: --class-weights auto and --balanced-sampler each correct skewed classes; together they correct twice"
    assert said in r.stdout and said in (tmp_path / "run" / "run.log").read_text()
    r = _train(cli, root, data, tmp_path / "one", "--balanced-sampler")
    assert r.exit_code == 0 and "warning" not in r.stdout


def test_the_interrupt_message_is_printed_once(cli, setup, tmp_path, monkeypatch):
    from cli.train_cmd import Renderer

    shown = Renderer.__call__

    def interrupt(self, event, info):  # Ctrl-C as the first epoch ends
        shown(self, event, info)
        if event == "epoch_end":
            raise KeyboardInterrupt

    monkeypatch.setattr(Renderer, "__call__", interrupt)
    root, data = setup
    r = _train(cli, root, data, tmp_path / "run")
    assert r.exit_code == 130
    assert (r.stdout + r.stderr).count("continue with: surgery train") == 1
    assert r.stderr.startswith("error: interrupted; 1 of 1 epochs")


def test_skipped_images_are_listed_first_few_then_how_many_more(cli, setup, tmp_path):
    import shutil

    root, data = setup
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    bad = [copy / "train" / "5" / f"broken{i}.png" for i in range(7)]
    for p in bad:
        p.write_bytes(b"not an image")
    r = _train(cli, root, copy, tmp_path / "run")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    at = lines.index("skipped 7 unreadable images:")
    assert all(lines[at + 1 + i].startswith(f"  skipped {bad[i]}: ") for i in range(5))
    assert lines[at + 6] == "  ... 2 more (run.log lists every one)"
    assert all(str(p) in (tmp_path / "run" / "run.log").read_text() for p in bad)

    r = cli("evaluate", "--trust-code", tmp_path / "run", "--data", copy, "--split", "train")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    at = lines.index("skipped 7 unreadable images:")
    assert all(lines[at + 1 + i].startswith(f"  {bad[i]}: ") for i in range(5)) and lines[at + 6] == "  ... 2 more"


def test_evaluate_on_one_folder_of_class_folders_hints_split_all(cli, setup, tmp_path):
    root, data = setup
    flat = tmp_path / "flat"
    for d in (data / "val").iterdir():
        (flat / d.name).mkdir(parents=True)
        for p in d.iterdir():
            (flat / d.name / p.name).write_bytes(p.read_bytes())
    r = cli("evaluate", "--trust-code", root / "ad", "--data", flat)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert "pass --split all to score every image" in r.stderr
    r = cli("evaluate", "--trust-code", root / "ad", "--data", flat, "--split", "all")
    assert r.exit_code == 0 and r.stdout.startswith("all: ")
    r = cli("evaluate", "--trust-code", root / "ad", "--data", tmp_path / "missing")
    assert r.exit_code == 2 and "no such folder" in r.stderr


# ----------------------------------------------------------------------------- Python names keywords, the shell flags

@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    import torch

    from fixtures.generate import tiny_model

    p = tmp_path_factory.mktemp("ck") / "resnet18.pth"
    torch.save(tiny_model("resnet18", 10).state_dict(), p)
    return p


def test_python_errors_name_keywords_and_the_cli_flags(cli, setup, resnet, tmp_path):
    import surgery

    with pytest.raises(surgery.SurgeryError) as e:
        surgery.adapt(str(resnet), arch="resnet18", num_classes=0, head="wide")
    assert str(e.value) == ("num_classes must be a positive integer, got 0; head='wide': choose one of linear, mlp")
    r = cli("adapt", resnet, "--arch", "resnet18", "--num-classes", 0, "--head", "wide", "--out", tmp_path / "ad")
    assert r.exit_code == 2 and "--num-classes must be a positive integer, got 0; --head 'wide'" in r.stderr

    root, data = setup
    with pytest.raises(surgery.SurgeryError, match=r"^epochs must be a positive integer, got 0; .*batch_size must be"):
        surgery.train(root / "ad", data, epochs=0, batch_size=0, out=tmp_path / "run", trust_code=True)
    (tmp_path / "exists").mkdir()
    with pytest.raises(surgery.SurgeryError, match=r"already exists; pass force=True to replace it, or resume=True"):
        surgery.train(root / "ad", data, epochs=1, out=tmp_path / "exists", trust_code=True)
    with pytest.raises(surgery.SurgeryError, match=r"^top_k must be at least 1, got 0$"):
        surgery.predict(root / "ad", [data], top_k=0)
    with pytest.raises(surgery.SurgeryError, match=r"split='test': choose one of") as e:
        surgery.evaluate(root / "ad", data, split="test")
    assert "--" not in str(e.value)
    r = cli("evaluate", "--trust-code", root / "ad", "--data", data, "--split", "test")
    assert r.exit_code == 2 and "--split 'test': choose one of" in r.stderr


def test_python_errors_keep_the_command_lines_they_quote(setup, tmp_path):
    import surgery
    from surgery.errors import TrainInterrupted

    def interrupt(event, info):
        if event == "epoch_end":
            raise KeyboardInterrupt

    root, data = setup
    with pytest.raises(TrainInterrupted) as e:
        surgery.train(root / "ad", data, epochs=2, lr=5e-3, out=tmp_path / "run", trust_code=True, observer=interrupt)
    assert f"continue with: surgery train {root / 'ad'} --data {data} --out {tmp_path / 'run'} --resume" in str(e.value)


def test_remap_takes_tuples_as_ops(tmp_path):
    import torch

    import surgery
    from surgery.errors import RuleError

    torch.save({"module.fc.weight": torch.zeros(2, 2), "module.fc.bias": torch.zeros(2)}, tmp_path / "dp.pt")
    rep = surgery.remap(tmp_path / "dp.pt", tmp_path / "clean.safetensors", [("auto",), ("drop", r"bias$")])
    assert [r.new for r in rep.rows] == ["fc.weight", None]
    for bad in (["auto"], [("strip_prefix", 3)], [None]):
        with pytest.raises(RuleError, match=r"rules\[0\] is .*: pass Op\(kind, arg\) or a tuple \(kind, \*args\)"):
            surgery.remap(tmp_path / "dp.pt", tmp_path / "bad.safetensors", bad)
    assert not (tmp_path / "bad.safetensors").exists()


# ----------------------------------------------------------------------------- adapt: the input it assumed, --mean/--std

@pytest.fixture(scope="module")
def factory_ckpt(tmp_path_factory):
    import torch

    from fixtures.factory import load_factory, write_factory

    root = tmp_path_factory.mktemp("factory")
    arch = write_factory(root)
    torch.save(load_factory(arch)(5).state_dict(), root / "cnn.pth")
    return arch, root / "cnn.pth"


def test_adapt_says_what_input_it_assumed(cli, factory_ckpt, tmp_path):
    arch, ck = factory_ckpt
    r = cli("adapt", ck, "--arch", arch, "--num-classes", 3, "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    assert ("input: 224x224 px (resize 256, bilinear), 3 channels, mean [0.485, 0.456, 0.406], std [0.229, 0.224, "
            "0.225] (from imagenet-default)") in r.stdout
    said = f"{arch} carries no input metadata: assumed 224x224 px and ImageNet mean/std; if it was trained otherwise"
    assert f"warning: {said}" in r.stdout
    r = cli("adapt", ck, "--arch", arch, "--num-classes", 3, "--input-size", SIZE, "--out", tmp_path / "b", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["warnings"] == [f"{arch} carries no input metadata: assumed ImageNet mean/std; if it "
                                                f"was trained otherwise, pass --input-size and --mean/--std"]


def test_adapt_records_the_mean_and_std_it_is_given(cli, factory_ckpt, tmp_path):
    import surgery

    arch, ck = factory_ckpt
    r = cli("adapt", ck, "--arch", arch, "--num-classes", 3, "--input-size", SIZE, "--mean", "0.5,0.5,0.5", "--std",
            "0.25 0.25 0.25", "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    assert "warning" not in r.stdout and "mean [0.5, 0.5, 0.5], std [0.25, 0.25, 0.25]" in r.stdout
    inp = json.loads((tmp_path / "a" / "manifest.json").read_text())["input"]
    assert (inp["mean"], inp["std"], inp["size"]) == ([0.5] * 3, [0.25] * 3, [SIZE, SIZE])
    from surgery.preprocess import input_pipeline

    pipe = input_pipeline(surgery.read_manifest(tmp_path / "a"))
    assert (tuple(pipe.mean), tuple(pipe.std)) == ((0.5,) * 3, (0.25,) * 3)  # what train, evaluate, predict use

    _, rep = surgery.adapt(str(ck), arch=arch, num_classes=3, in_chans=1, input_size=SIZE, mean=0.5, std=[0.25])
    assert (rep.manifest["input"]["mean"], rep.manifest["input"]["std"], rep.warnings) == ([0.5], [0.25], [])
    with pytest.raises(surgery.SurgeryError, match=r"^mean takes one value per input channel \(3 for in_chans=3\), "
                                                   r"got 2; std values must be positive, got 0, 1, 1$"):
        surgery.adapt(str(ck), arch=arch, num_classes=3, mean=(0.5, 0.5), std="0,1,1")
    r = cli("adapt", ck, "--arch", arch, "--num-classes", 3, "--mean", "0.5,x", "--out", tmp_path / "c")
    assert r.exit_code == 2 and "--mean '0.5,x': give one number per input channel" in r.stderr
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- adapt: --input-size for a timm ViT

def test_input_size_rebuilds_a_timm_vit_for_it(cli, tmp_path):
    timm = pytest.importorskip("timm")
    import torch

    import surgery

    ck = tmp_path / "vit.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=10).state_dict(), ck)
    r = cli("adapt", ck, "--arch", "timm:vit_tiny_patch16_224", "--num-classes", 3, "--input-size", 32,
            "--out", tmp_path / "ad")
    assert r.exit_code == 0, r.output
    assert "interpolated pos_embed: [1, 197, 192] -> [1, 5, 192]" in r.stdout
    m = json.loads((tmp_path / "ad" / "manifest.json").read_text())
    assert m["arch"]["kwargs"] == {"img_size": 32} and m["input"]["size"] == [32, 32]
    with torch.no_grad():
        assert surgery.load_adapted(tmp_path / "ad").eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    r = cli("adapt", ck, "--arch", "timm:vit_tiny_patch16_224", "--num-classes", 3, "--input-size", 40,
            "--out", tmp_path / "odd")
    assert r.exit_code == 2 and "--input-size 40: timm:vit_tiny_patch16_224 cuts images into 16x16 patches" in r.stderr


FIXED = '''
import torch
from torch import nn


def fixed(num_classes=5, img_size=16):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * img_size * img_size, num_classes))
'''


def test_input_size_a_model_cannot_take_hints_what_sizes_it(cli, tmp_path):
    (tmp_path / "fixed.py").write_text(FIXED)
    arch = f"{tmp_path / 'fixed.py'}:fixed"
    import torch

    from fixtures.factory import load_factory

    torch.save(load_factory(arch)(5).state_dict(), tmp_path / "fixed.pth")
    r = cli("adapt", tmp_path / "fixed.pth", "--arch", arch, "--num-classes", 3, "--input-size", 32, "--out", tmp_path / "a")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert "--input-size 32: a forward pass of the model on a 3x32x32 input failed" in r.stderr
    assert """give it this one with --arch-kwargs (e.g. '{"img_size": 32}')""" in r.stderr
    assert "pass --input-size with" not in r.stderr
    r = cli("adapt", tmp_path / "fixed.pth", "--arch", arch, "--num-classes", 3, "--input-size", 32, "--arch-kwargs",
            '{"img_size": 32}', "--min-coverage", 0, "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output


def test_keyword_text_reads_no_flags_and_leaves_paths_alone():
    import inspect

    from surgery.flag_names import keyword_text

    params = inspect.signature(lambda balanced_sampler=False, force=False: 0).parameters
    assert keyword_text("started with no --balanced-sampler", params) == "started with balanced_sampler=False"
    assert keyword_text("/tmp/--force/run exists; pass --force", params) == "/tmp/--force/run exists; pass force=True"
    assert keyword_text("no --other here", params) == "no --other here"
