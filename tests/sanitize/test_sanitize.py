"""surgery sanitize: checkpoints torch.load(weights_only=True) refuses, rewritten as ones it loads.

The files under data/ were written by numpy and omegaconf (make_data.py; data/README.md): the tests
need neither library. Each output is loaded by torch itself with weights_only=True."""

from __future__ import annotations

import argparse
import collections
import json
import os
import pickle
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from surgery.errors import FormatError, UnsafeCheckpointError
from surgery.sanitizing import NOTES_KEY, SCHEMA, sanitize

DATA = Path(__file__).parent / "data"


def _refused_by_torch(path: Path) -> bool:
    try:
        torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        return True
    return False


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("name", ["lightning_namespace.ckpt", "lightning_omegaconf.ckpt", "lightning_attributedict.ckpt", "fairseq.pt",
                                  "numpy_values.pt", "unknown_object.pt"])
def test_every_data_file_is_refused_by_torch_then_loads_after_sanitize(name, tmp_path):
    src = DATA / name
    before = src.read_bytes()
    assert _refused_by_torch(src)
    report = sanitize(src, tmp_path / name, verify=True)
    assert report.verified and (tmp_path / name).stat().st_size == report.bytes_written
    out = _load(tmp_path / name)
    assert out[NOTES_KEY] == {"schema": SCHEMA, "converted": report.converted, "dropped": report.dropped}
    assert src.read_bytes() == before  # SRC never modified
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temp file left


def test_lightning_checkpoint_keeps_its_tensors_byte_for_byte_and_its_hyperparameters(tmp_path):
    src = DATA / "lightning_namespace.ckpt"
    report = sanitize(src, tmp_path / "out.ckpt")
    out = _load(tmp_path / "out.ckpt")
    hp = out["hyper_parameters"]
    assert hp["lr"] == 0.01 and hp["layers"] == [4, 3, 2] and hp["data"] == "/data/train"
    assert hp["seed"] == 7 and type(hp["seed"]) is int
    assert _same(hp["mean"], torch.tensor([0.5, 0.25]))
    assert out["epoch"] == 3 and type(out["epoch"]) is int and out["global_step"] == 120
    assert isinstance(out["state_dict"], collections.OrderedDict)
    assert report.converted == {"epoch": "numpy.int64", "global_step": "numpy.int64",
                                "hyper_parameters.data": "pathlib.PosixPath", "hyper_parameters.seed": "numpy.int32",
                                "hyper_parameters.mean": "numpy.ndarray (float32, shape [2])",
                                "hyper_parameters": "argparse.Namespace"}
    assert report.dropped == {}
    opt = out["optimizer_states"][0]
    assert opt["param_groups"][0]["lr"] == 1e-3 and len(opt["state"]) == 8
    assert out["callbacks"]["ModelCheckpoint"]["best_model_score"].item() == 0.875


def test_lightning_attributedict_hyperparameters_become_dicts(tmp_path):
    # save_hyperparameters() stores an AttributeDict (a dict subclass): its items are the data
    report = sanitize(DATA / "lightning_attributedict.ckpt", tmp_path / "out.ckpt", verify=True)
    hp = _load(tmp_path / "out.ckpt")["hyper_parameters"]
    assert type(hp) is dict and hp == {"lr": 0.001, "layers": [4, 3, 2], "predictor": {"n_tasks": 1, "dropout": 0.0}}
    assert type(hp["lr"]) is float
    owner = "lightning.fabric.utilities.data.AttributeDict"
    assert report.converted == {"epoch": "numpy.int64", "global_step": "numpy.int64", "hyper_parameters.lr": "numpy.float64",
                                "hyper_parameters.predictor": owner, "hyper_parameters": owner}
    assert set(report.dropped) == {"hyper_parameters.activation", "hyper_parameters.cls",
                                   "hyper_parameters.predictor.output_transform"}
    assert "torch.nn.modules.activation.ReLU" in report.dropped["hyper_parameters.activation"]


def test_tensors_equal_what_the_reader_sees_and_shared_storages_stay_shared(tmp_path):
    import surgery

    base = torch.arange(12, dtype=torch.float32)
    ckpt = {"a": base[:6].view(2, 3), "b": base[6:], "t": base.view(3, 4).t(), "same": base,
            "half": torch.randn(3).half(), "bf": torch.randn(2).bfloat16(), "nan": torch.tensor([float("nan"), -0.0]),
            "args": argparse.Namespace(k=1), "device": torch.device("cuda", 1), "dtype": torch.bfloat16,
            "size": torch.Size([2, 3])}
    ckpt["alias"] = ckpt["same"]
    torch.save(ckpt, tmp_path / "in.pt")
    sanitize(tmp_path / "in.pt", tmp_path / "out.pt", verify=True)
    out = _load(tmp_path / "out.pt")
    for key in ("a", "b", "t", "same", "half", "bf", "nan"):
        assert _same(out[key], ckpt[key]), key
        assert out[key].stride() == ckpt[key].stride()
    assert out["a"].untyped_storage().data_ptr() == out["b"].untyped_storage().data_ptr() == \
        out["same"].untyped_storage().data_ptr()
    assert out["alias"] is out["same"]
    assert out["device"] == torch.device("cuda:1") and out["dtype"] is torch.bfloat16 and out["size"] == (2, 3)
    got = surgery.open(tmp_path / "out.pt", select="")
    assert got.read_bytes("half") == ckpt["half"].numpy().tobytes()


def test_fairseq_checkpoint_args_and_metrics_become_plain_values(tmp_path):
    report = sanitize(DATA / "fairseq.pt", tmp_path / "out.pt")
    out = _load(tmp_path / "out.pt")
    assert out["args"] == {"arch": "transformer_tiny", "lr": [0.0005], "max_tokens": 4096, "fp16": False,
                           "task": "translation", "save_dir": "checkpoints", "seed": 1}
    metrics = out["extra_state"]["metrics"]
    assert metrics == {"loss": 2.5, "ppl": 5.65, "wps": 1000.0, "ok": True}
    assert [type(v) for v in metrics.values()] == [float, float, float, bool]
    assert out["extra_state"]["train_iterator"] == {"epoch": 2, "iterations_in_epoch": 17, "shuffle": True}
    assert out["optimizer_history"][0]["num_updates"] == 500
    assert report.converted["extra_state.metrics.wps"] == "numpy.float16"
    assert report.converted["args"] == "argparse.Namespace"
    assert isinstance(out["model"], collections.OrderedDict)
    assert out["model"]._metadata[""] == {"version": 1}  # state_dict()'s version records survive


def test_omegaconf_config_becomes_the_dict_it_stores(tmp_path):
    report = sanitize(DATA / "lightning_omegaconf.ckpt", tmp_path / "out.ckpt")
    hp = _load(tmp_path / "out.ckpt")["hyper_parameters"]
    assert hp == {"model": {"name": "resnet18", "layers": [2, 2, 2, 2], "dropout": None},
                  "optim": {"lr": 0.1, "warmup_lr": "${optim.lr}", "nesterov": True},  # interpolations as stored
                  "data": {"root": "???", "sizes": [[32, 32], [64, 64]]}, "seed": 3}
    assert report.converted["hyper_parameters"] == "omegaconf.dictconfig.DictConfig"


def test_numpy_arrays_scalars_and_dtypes_of_every_kind(tmp_path):
    np = pytest.importorskip("numpy")
    report = sanitize(DATA / "numpy_values.pt", tmp_path / "out.pt", verify=True)
    out = _load(tmp_path / "out.pt")
    # the values numpy_values() in make_data.py pickled, made again with the same seed
    rng = np.random.default_rng(0)
    for kind, t in out["arrays"].items():
        want = (rng.standard_normal((2, 3)) * 10).astype(kind)
        assert t.dtype == getattr(torch, kind) and _same(t, torch.from_numpy(want)), kind
        assert out["scalars"][kind] == want.flat[1].item() and type(out["scalars"][kind]) is type(want.flat[1].item())
    assert out["dtypes"] == ["float32", "int64", "bool"]
    assert out["fortran"].tolist() == np.arange(12).reshape(3, 4).tolist() and out["fortran"].dtype == torch.int32
    assert out["big_endian"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0] and out["big_endian"].dtype == torch.float32
    assert out["zero_d"].shape == () and out["zero_d"].item() == 2.5 and out["zero_d"].dtype == torch.float64
    assert out["empty"].shape == (0, 3)
    assert out["text"] == "hello" and out["counts"] == {"a": 2, "b": 5}
    assert out["tags"] == {"x", "y"} and out["frozen"] == {1, 2}
    assert "object_array" not in out
    assert report.dropped == {"object_array": "numpy object array (its elements are Python objects)"}
    assert report.converted["counts"] == "collections.defaultdict" and report.converted["frozen"] == "frozenset"
    assert report.arrays == 18


def test_unknown_objects_are_dropped_and_listed_never_built(tmp_path):
    assert "made_up_module" not in sys.modules
    report = sanitize(DATA / "unknown_object.pt", tmp_path / "out.pt")
    out = _load(tmp_path / "out.pt")
    assert set(out) == {"state_dict", "kept", NOTES_KEY} and out["kept"] == [1, 2.0, "three"]
    assert set(report.dropped) == {"thing", "hook"}
    assert "made_up_module.Thing" in report.dropped["thing"] and "made_up_module.helper" in report.dropped["hook"]
    assert "made_up_module" not in sys.modules


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_runs_code_is_refused_and_nothing_runs_or_is_written(tmp_path, cli):
    marker = tmp_path / "PWNED"
    torch.save({"w": torch.ones(1), "payload": _Evil(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to sanitize: .*posix\.system.*Nothing was executed"):
        sanitize(tmp_path / "evil.pt", tmp_path / "out.pt")
    res = cli("sanitize", tmp_path / "evil.pt", tmp_path / "out.pt")
    assert res.exit_code == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "out.pt").exists()
    # even accepted (dropped as data), the payload is never called
    report = sanitize(tmp_path / "evil.pt", tmp_path / "out.pt", allow_globals=["posix.system"])
    assert "payload" in report.dropped and not marker.exists()
    assert set(_load(tmp_path / "out.pt")) == {"w", NOTES_KEY}


def test_an_os_system_payload_that_builds_a_tensor_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    torch.save([_Evil(marker)], tmp_path / "evil.pt")
    with zipfile.ZipFile(tmp_path / "evil.pt") as z:
        assert any(n.endswith("data.pkl") for n in z.namelist())
    with pytest.raises(UnsafeCheckpointError):
        sanitize(tmp_path / "evil.pt", tmp_path / "out.pt")
    assert not marker.exists()


@pytest.mark.parametrize("content, match", [
    (b"not a checkpoint at all", "unrecognised format"),
    (b"", "empty"),
    (b"\x80\x04K\x01.", "not one written by torch.save"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, cli, content, match):
    (tmp_path / "bad.pt").write_bytes(content)
    res = cli("sanitize", tmp_path / "bad.pt", tmp_path / "out.pt")
    assert res.exit_code == 2 and match in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "out.pt").exists()


def test_a_truncated_file_is_refused(tmp_path, cli):
    data = (DATA / "fairseq.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    res = cli("sanitize", tmp_path / "cut.pt", tmp_path / "out.pt")
    assert res.exit_code == 2 and "Traceback" not in res.stderr and not (tmp_path / "out.pt").exists()


def test_destination_rules(tmp_path, cli):
    src = DATA / "fairseq.pt"
    (tmp_path / "out.pt").write_bytes(b"keep me")
    with pytest.raises(Exception, match="already exists; pass --force"):
        sanitize(src, tmp_path / "out.pt")
    assert (tmp_path / "out.pt").read_bytes() == b"keep me"
    assert cli("sanitize", src, tmp_path / "out.pt", "--force").exit_code == 0
    assert _load(tmp_path / "out.pt")["args"]["seed"] == 1
    copy = tmp_path / "src.pt"
    copy.write_bytes(src.read_bytes())
    res = cli("sanitize", copy, copy, "--force")
    assert res.exit_code == 2 and "destination is the source" in res.stderr


def test_safetensors_and_folders_are_not_what_sanitize_reads(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    with pytest.raises(FormatError, match="not a torch.save file"):
        sanitize(tmp_path / "w.safetensors", tmp_path / "out.pt")


def test_a_whole_pickled_model_is_refused_not_written_as_none(tmp_path, cli):
    # torch.save(model) (BeatNet's model-1.pt, YOLO's .pt): every tensor lives inside the dropped module
    torch.save(torch.nn.Linear(2, 3), tmp_path / "model.pt")
    with pytest.raises(FormatError, match="whole object is an instance of torch.nn.modules.linear.Linear.*surgery remap"):
        sanitize(tmp_path / "model.pt", tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_a_legacy_format_file_is_read_too(tmp_path):
    ckpt = {"w": torch.arange(4.0), "args": argparse.Namespace(lr=0.5)}
    torch.save(ckpt, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    report = sanitize(tmp_path / "old.pt", tmp_path / "out.pt", verify=True)
    out = _load(tmp_path / "out.pt")
    assert report.format == "torch-legacy" and out["args"] == {"lr": 0.5} and _same(out["w"], ckpt["w"])


def test_a_non_dict_top_level_gets_no_notes_but_the_report_has_them(tmp_path):
    torch.save([argparse.Namespace(a=1), torch.ones(2)], tmp_path / "in.pt")
    report = sanitize(tmp_path / "in.pt", tmp_path / "out.pt")
    out = _load(tmp_path / "out.pt")
    assert out[0] == {"a": 1} and not report.notes_in_file and report.converted == {"[0]": "argparse.Namespace"}


def test_a_clean_file_is_written_as_it_is_without_notes(tmp_path):
    torch.save({"w": torch.ones(2), "epoch": 3}, tmp_path / "in.pt")
    report = sanitize(tmp_path / "in.pt", tmp_path / "out.pt", verify=True)
    assert set(_load(tmp_path / "out.pt")) == {"w", "epoch"} and not report.converted and not report.notes_in_file


def test_verify_failure_is_exit_2_and_leaves_no_destination(tmp_path, cli, monkeypatch):
    from surgery.sanitizing import output

    monkeypatch.setattr(output, "same_bits", lambda a, b: False)
    res = cli("sanitize", DATA / "fairseq.pt", tmp_path / "out.pt", "--verify")
    assert res.exit_code == 2 and "--verify" in res.stderr and "differ" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_summary_and_json(tmp_path, cli):
    res = cli("sanitize", DATA / "fairseq.pt", tmp_path / "a.pt", "--verify")
    assert res.exit_code == 0, res.stderr
    assert "converted args: argparse.Namespace" in res.stdout
    assert "10 values converted, 0 dropped; wrote 9 tensors" in res.stdout and "verified" in res.stdout
    res = cli("sanitize", DATA / "numpy_values.pt", tmp_path / "b.pt", "--json")
    doc = json.loads(res.stdout)
    assert doc["schema"] == SCHEMA and doc["dropped"] == {"object_array": "numpy object array (its elements are "
                                                                          "Python objects)"}
    assert len(doc["converted"]) == 38 and doc["tensors"] == 19 and doc["arrays"] == 18


def test_sanitize_is_on_the_lazy_api_and_its_cli_module_imports_no_torch():
    import subprocess

    code = ("import sys, surgery; from cli import sanitize_cmd; import surgery.sanitizing, surgery.sanitizing.convert, "
            "surgery.sanitizing.read; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert surgery.sanitize.__name__ == 'sanitize'")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]), *sys.path]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_a_list_that_holds_itself_and_deep_nesting(tmp_path):
    loop: list = [torch.ones(1)]
    loop.append(loop)
    torch.save({"loop": loop, "ns": argparse.Namespace(a=1)}, tmp_path / "in.pt")
    sanitize(tmp_path / "in.pt", tmp_path / "out.pt", verify=True)
    out = _load(tmp_path / "out.pt")
    assert out["loop"][1] is out["loop"] and out["ns"] == {"a": 1}
    shared = {"t": torch.zeros(2)}
    torch.save({"b": [shared], "a": shared, "ns": argparse.Namespace()}, tmp_path / "shared.pt")
    sanitize(tmp_path / "shared.pt", tmp_path / "shared_out.pt", verify=True)  # one container, two paths
    deep: list = []
    for _ in range(450):
        deep = [deep]
    (tmp_path / "deep.pt").unlink(missing_ok=True)
    try:
        torch.save({"deep": deep}, tmp_path / "deep.pt")
    except RecursionError:
        pytest.skip("torch.save cannot write such nesting here")
    with pytest.raises(FormatError, match="nested too deeply"):
        sanitize(tmp_path / "deep.pt", tmp_path / "out2.pt")
