"""`surgery export`: the written file, run by its own runtime, gives the adapted model's outputs."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

import surgery

CLASSES = ["cat", "dog", "owl"]


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    from fixtures.generate import tiny_model

    folder = tmp_path_factory.mktemp("export") / "adapted"
    surgery.adapt(tiny_model("squeezenet1_1").state_dict(), arch="squeezenet1_1", num_classes=3, input_size=48,
                  class_names=CLASSES, out=folder, seed=1)
    return folder


def _run(fmt: str, path, x: torch.Tensor) -> torch.Tensor:
    """The exported file through the runtime a deployment uses, not through surgery."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])
    if fmt == "torchscript":
        return torch.jit.load(str(path))(x)
    return torch.export.load(str(path)).module()(x)


def _embedded(fmt: str, path) -> dict:
    if fmt == "onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        return json.loads(props["surgery.preprocess"])
    if fmt == "torchscript":
        extra = {"preprocess.json": ""}
        torch.jit.load(str(path), _extra_files=extra)
        return json.loads(extra["preprocess.json"])
    extra = {"preprocess.json": ""}
    torch.export.load(str(path), extra_files=extra)
    return json.loads(extra["preprocess.json"])


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
@pytest.mark.parametrize("fmt,name", [("onnx", "model.onnx"), ("torchscript", "model.torchscript.pt"),
                                      ("exported", "model.pt2")])
def test_export_runs_like_load_adapted(adapted, cli, fmt, name):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    r = cli("export", adapted, "--format", fmt, "--json")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["schema"] == "surgery.export/1" and rep["out"] == str(adapted / name)
    assert rep["input_shape"] == [2, 3, 48, 48] and rep["output_shape"] == [3, 3] and rep["max_abs_diff"] < 1e-4
    x = torch.randn(5, 3, 48, 48, generator=torch.Generator().manual_seed(7))  # another batch size than traced
    with torch.no_grad():
        want = surgery.load_adapted(adapted).eval()(x)
    assert want.abs().sum() > 0
    torch.testing.assert_close(_run(fmt, adapted / name, x), want, rtol=1e-4, atol=1e-5)
    side = json.loads((adapted / f"{name}.preprocess.json").read_text())
    manifest = json.loads((adapted / "manifest.json").read_text())
    assert side["schema"] == "surgery.preprocess/1" and side["class_names"] == CLASSES
    assert side["crop"] == [48, 48] and side["mean"] == manifest["input"]["mean"] and side["std"] == manifest["input"]["std"]
    assert side["interpolation"] == manifest["input"]["interpolation"] and side["shape"] == ["batch", 3, 48, 48]
    assert _embedded(fmt, adapted / name) == side


def test_existing_output_needs_force_and_stays_whole(adapted, cli, tmp_path):
    out = tmp_path / "m.pt2"
    assert cli("export", adapted, "-f", "exported", "-o", out).exit_code == 0
    before = out.read_bytes()
    r = cli("export", adapted, "-f", "exported", "-o", out)
    assert r.exit_code == 2 and r.stderr == f"error: {out}: already exists; pass --force to replace it\n"
    assert out.read_bytes() == before
    r = cli("export", adapted, "-f", "exported", "-o", out, "--force", "--no-verify")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith(f"wrote {out} (exported, ") and "preprocess:" in r.stdout
    assert zipfile.is_zipfile(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2", "m.pt2.preprocess.json"]  # no temp files left


def test_bad_input_is_one_line(adapted, cli, tmp_path):
    r = cli("export", adapted, "--format", "tflite")
    assert r.exit_code == 2 and r.stderr == "error: --format 'tflite': choose one of onnx, torchscript, exported\n"
    r = cli("export", tmp_path, "--format", "torchscript")
    assert r.exit_code == 2 and "manifest" in r.stderr and len(r.stderr.splitlines()) == 1
    r = cli("export", adapted, "-f", "torchscript", "-o", adapted / "model.safetensors", "--force")
    assert r.exit_code == 2 and "destination is the source" in r.stderr


def test_missing_exporter_names_the_extra(adapted, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(surgery.SurgeryError, match=r"--format onnx needs onnxruntime, which is not installed: "
                                                   r"pip install 'surgery\[export\]'"):
        surgery.export(adapted, "onnx")


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_a_factory_folder_exports_only_with_consent_and_its_pinned_file(cli, tmp_path):
    from fixtures.factory import SIZE, load_factory, make_adapted, write_factory

    arch = write_factory(tmp_path)
    torch.manual_seed(0)
    folder = make_adapted(load_factory(arch)(5).state_dict(), arch, tmp_path / "ad")
    out = tmp_path / "m.torchscript.pt"
    r = cli("export", folder, "-f", "torchscript", "-o", out)
    assert r.exit_code == 2 and "surgery ran nothing" in r.stderr and "pass --trust-code" in r.stderr, r.output
    with pytest.raises(surgery.SurgeryError, match=r"builds the model with code .*trust_code=True"):
        surgery.export(folder, "torchscript", out)
    assert not out.exists()
    r = cli("export", folder, "-f", "torchscript", "-o", out, "--trust-code", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["output_shape"] == [3, 5]
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = surgery.load_adapted(folder, trust_code=True).eval()(x)
    torch.testing.assert_close(_run("torchscript", out, x), want, rtol=1e-4, atol=1e-5)
    rep = surgery.export(folder, "exported", tmp_path / "m.pt2", trust_code=True)
    assert rep.out == str(tmp_path / "m.pt2") and rep.max_abs_diff < 1e-4
    factory = Path(arch.rpartition(":")[0])
    factory.write_text(factory.read_text() + "# edited after adapt\n")
    r = cli("export", folder, "-f", "torchscript", "-o", tmp_path / "again.pt", "--trust-code")
    assert r.exit_code == 2 and f"surgery trust {folder} --repin" in r.stderr, r.output
    assert not (tmp_path / "again.pt").exists()
