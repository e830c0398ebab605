"""The CLI as a pipeline sees it: JSON, exit codes, option order, no colour when piped."""

from __future__ import annotations

import json
import subprocess
import sys

import surgery
from tests import REPO



def test_version_and_help(cli):
    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"surgery {surgery.__version__}"
    r = cli("--help")
    assert r.exit_code == 0
    for command in ("inspect", "remap", "diff", "demo"):
        assert command in r.stdout


def test_help_and_metadata_paths_do_not_import_torch(make):
    path = make("dataparallel_pt")
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom cli.main import app\n"
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0\n"
            f"r = CliRunner().invoke(app, ['inspect', {str(path)!r}, '--json']); assert r.exit_code == 0, r.output\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_inspect_json_schema(make, cli):
    r = cli("inspect", make("compiled_dataparallel_pt"), "--json", "--keys")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["schema"] == "surgery.inspect/1"
    assert data["format"] == "torch-zip" and data["container"] == ""
    assert data["wrapper_prefixes"] == ["_orig_mod.", "module."]
    assert data["remap_command"].endswith("--auto")
    assert data["architecture"][0]["arch"] == "mobilenet_v3_small"
    assert data["architecture"][0]["num_classes"] == 10
    assert data["tensor_count"] == len(data["tensors"]) == 244
    assert sum(d["params"] for d in data["dtypes"].values()) == data["param_count"]
    tree = {row["path"]: row for row in data["tree"]}
    assert "_orig_mod" in tree


def test_inspect_reports_tied_and_devices(make, cli):
    data = json.loads(cli("inspect", make("tied_pt"), "--json").stdout)
    assert data["tied"] and all(len(g) == 2 for g in data["tied"])
    data = json.loads(cli("inspect", make("zip_cuda_pt"), "--json").stdout)
    assert data["devices"] == {"cuda:0": data["tensor_count"]}
    shared = json.loads(cli("inspect", make("tied_view_pt"), "--json").stdout)["shared_storage"]
    assert shared and any("decoder.weight" in g for g in shared)


def test_collapsed_tree(make, cli):
    data = json.loads(cli("inspect", make("resnet18_pt"), "--json", "--depth", "3").stdout)
    paths = [r["path"] for r in data["tree"]]
    assert "layer1.{0,1}" in paths and "layer2.0" in paths and "layer2.1" in paths


def test_remap_ops_follow_command_line_order(make, cli, tmp_path):
    src = make("dataparallel_pt")
    # strip first, then add: keys end up with 'net.'; the other order would give 'net.module.'
    r = cli("remap", src, tmp_path / "a.safetensors", "--strip-prefix", "module.", "--add-prefix", "net.", "--json")
    assert r.exit_code == 0, r.stderr
    first = json.loads(r.stdout)["tensors"][0]["new"]
    r = cli("remap", src, tmp_path / "b.safetensors", "--add-prefix=net.", "--strip-prefix=module.", "--json")
    second = json.loads(r.stdout)["tensors"][0]["new"]
    assert first.startswith("net.features") and second.startswith("net.module.features")
    # interleaved repeats of one option keep their places too
    r = cli("remap", src, tmp_path / "c.pt", "--rename", r"^module\.=>m.", "--drop", "^m\\.classifier",
            "--rename", r"^m\.=>", "--dry-run", "--json")
    data = json.loads(r.stdout)
    kept = [t["new"] for t in data["tensors"] if t["new"]]
    assert kept and all(k.startswith("features.") for k in kept)
    assert not (tmp_path / "c.pt").exists()


def test_remap_select_ema(make, cli, tmp_path):
    out = tmp_path / "ema.safetensors"
    r = cli("remap", make("timm_ema_pth"), out, "--select", "state_dict_ema", "--verify")
    assert r.exit_code == 0, r.stderr
    import torch

    ref = torch.load(make("timm_ema_pth"), weights_only=True)["state_dict_ema"]
    got = surgery.open(out).state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.items())


def test_diff_exit_codes(make, cli, tmp_path):
    a = make("plain_safetensors")
    assert cli("diff", a, a).exit_code == 0
    half = tmp_path / "half.safetensors"
    cli("remap", a, half, "--dtype", "fp16")
    r = cli("diff", a, half, "--json")
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert data["dtype_mismatch"] and max(data["max_abs_diff"].values()) > 0


def test_no_escape_codes_when_piped(make):
    out = subprocess.run([sys.executable, "-m", "cli.main", "inspect", str(make("plain_pt"))], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert "\x1b[" not in out and "mobilenet_v3_small" in out


def test_clean_command_strips_only_container_prefixes(cli, tmp_path):
    import torch
    import torchvision

    layers = tmp_path / "layers.pt"
    torch.save({f"module.layers.{i}.weight": torch.ones(2) for i in range(3)}, layers)
    data = json.loads(cli("inspect", layers, "--json").stdout)
    assert data["common_prefix"] is None and data["remap_command"].endswith("--auto")
    wrapped = tmp_path / "wrapped.pt"
    torch.save({f"wrapper.{k}": v for k, v in torchvision.models.resnet18().state_dict().items()}, wrapped)
    data = json.loads(cli("inspect", wrapped, "--json").stdout)
    assert data["common_prefix"] == "wrapper." and data["architecture"][0]["arch"] == "resnet18"
    assert data["remap_command"].endswith("--strip-prefix wrapper.")
