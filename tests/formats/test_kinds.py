"""Tensors safetensors cannot hold (sparse, quantized, nested, meta), files that are not a state
dict, and refusals that say what would work."""

from __future__ import annotations

import argparse
import copyreg
import json
import warnings
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import surgery  # noqa: E402
from surgery.errors import FormatError, RuleError, SelectError, UnsafeCheckpointError  # noqa: E402
from surgery.remapping import Rules, apply_rules, densify, dequantize  # noqa: E402
from fixtures.compare import Via, assert_same  # noqa: E402
from tests import REPO

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

X = torch.tensor([[0.0, 1.5, 0.0], [3.0, 0.0, -2.0]])


def _kinds() -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"w": torch.ones(2, 3), "sp": X.to_sparse(), "csr": X.to_sparse_csr(),
                "q": torch.quantize_per_tensor(X, 0.1, 2, torch.qint8),
                "qc": torch.quantize_per_channel(X, torch.tensor([0.1, 0.2]), torch.tensor([0, 1]), 0, torch.quint8),
                "nest": torch.nested.nested_tensor([torch.ones(2), torch.arange(3.0)]),
                "m": torch.empty(2, 3, device="meta")}


@pytest.fixture
def kinds_file(tmp_path) -> Path:
    torch.save(_kinds(), tmp_path / "kinds.pt")
    return tmp_path / "kinds.pt"


def test_inspect_lists_each_kind_in_text_and_json(cli, kinds_file):
    r = cli("inspect", kinds_file, "--keys", "--depth", "0")
    assert r.exit_code == 0, r.output
    assert "F32 (sparse coo)" in r.stdout and "QI8 (quantized)" in r.stdout and "F32 (meta)" in r.stdout
    assert "1 sparse coo, 1 sparse csr, 2 quantized, 1 nested, 1 meta" in r.stdout
    data = json.loads(cli("inspect", kinds_file, "--keys", "--json").stdout)
    assert data["kinds"] == {"sparse_coo": 1, "sparse_csr": 1, "quantized": 2, "nested": 1, "meta": 1}
    assert {t["name"]: t["kind"] for t in data["tensors"]} == {
        "w": "dense", "sp": "sparse_coo", "csr": "sparse_csr", "q": "quantized", "qc": "quantized",
        "nest": "nested", "m": "meta"}
    assert data["shared_storage"] == []


def test_inspect_does_not_import_torch(tmp_path, kinds_file):
    import subprocess
    import sys

    code = ("import sys, surgery; surgery.inspect(sys.argv[1]); "
            "assert 'torch' not in sys.modules, 'inspect imported torch'")
    subprocess.run([sys.executable, "-c", code, str(kinds_file)], check=True, cwd=REPO)


def test_remap_to_safetensors_refuses_naming_each_key_and_its_options(cli, kinds_file, tmp_path):
    dst = tmp_path / "out.safetensors"
    r = cli("remap", kinds_file, dst)
    assert r.exit_code == 2
    err = " ".join(r.stderr.split())
    for key, fix in (("sp", "--densify"), ("csr", "--densify"), ("q", "--dequantize"), ("qc", "--dequantize")):
        assert f"'{key}' " in err and f"{fix} or --drop '^{key}$'" in err
    assert "'nest' (nested tensor): --drop '^nest$'" in err
    assert "'m' (meta tensor, which has no data): --drop '^m$'" in err
    assert "Nothing was written" in err and not dst.exists() and list(tmp_path.iterdir()) == [kinds_file]


def test_densify_and_dequantize_convert_for_safetensors(cli, kinds_file, tmp_path):
    dst = tmp_path / "out.safetensors"
    r = cli("remap", kinds_file, dst, "--densify", "--dequantize", "--drop", "^(nest|m)$", "--verify", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    rows = {t["old"]: t for t in report["tensors"]}
    assert rows["sp"]["from_kind"] == "sparse_coo" and rows["sp"]["kind"] == "dense"
    assert rows["q"]["from_dtype"] == "QI8" and rows["q"]["dtype"] == "F32"
    assert {o["op"]: o["matched"] for o in report["ops"]}["--densify"] == 2
    src, out = _kinds(), surgery.open(dst).state_dict()
    assert torch.equal(out["sp"], X) and torch.equal(out["csr"], X)
    assert torch.equal(out["q"], src["q"].dequantize()) and torch.equal(out["qc"], src["qc"].dequantize())


def test_remap_to_torch_keeps_every_kind(cli, kinds_file, tmp_path):
    dst = tmp_path / "out.pt"
    r = cli("remap", kinds_file, dst, "--add-prefix", "model.", "--verify")
    assert r.exit_code == 0, r.output
    want = torch.load(kinds_file, weights_only=True)
    got = torch.load(dst, weights_only=True)
    assert list(got) == [f"model.{k}" for k in want]
    for k, t in want.items():
        assert_same(k, got[f"model.{k}"], t)


def test_rules_file_form_and_dict_transforms(kinds_file, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("ops:\n  - densify: true\n  - dequantize: true\n  - drop: '^(nest|m)$'\n")
    assert Rules.from_file(rules).to_json()["ops"][:2] == [{"densify": True}, {"dequantize": True}]
    surgery.remap(kinds_file, tmp_path / "out.safetensors", rules, verify=True)
    sd = _kinds()
    out = apply_rules(sd, Rules.from_file(rules).ops)
    assert set(out) == {"w", "sp", "csr", "q", "qc"} and all(t.layout == torch.strided and not t.is_quantized
                                                               for t in out.values())
    assert torch.equal(densify({"a": sd["sp"]})["a"], X)
    assert dequantize({"a": sd["q"], "b": sd["w"]})["b"] is sd["w"]


@pytest.mark.parametrize("make, kind, description, names", [
    (lambda: torch.arange(4.0), "tensor", "a single tensor (read as 'tensor')", ["tensor"]),
    (lambda: [torch.ones(1), torch.ones(2), torch.ones(3)], "tensor_list", "list of 3 tensors", ["0", "1", "2"]),
    (lambda: (torch.ones(1), torch.ones(2)), "tensor_list", "tuple of 2 tensors", ["0", "1"]),
    (lambda: [{"a.w": torch.ones(1)}, {"a.w": torch.ones(2)}], "state_dict_list", "list of 2 state dicts", ["a.w"]),
])
def test_files_that_are_not_a_state_dict(tmp_path, cli, make, kind, description, names):
    torch.save(make(), tmp_path / "f.pt")
    ckpt = surgery.open(tmp_path / "f.pt")
    assert (ckpt.file_kind, ckpt.description, list(ckpt.tensors)) == (kind, description, names)
    r = cli("inspect", tmp_path / "f.pt")
    assert r.exit_code == 0 and description in r.stdout and "TensorRef" not in r.output


def test_optimizer_only_file_asks_for_select(tmp_path, cli):
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    assert "optimizer state (param_groups + state for 4 params)" in cli("inspect", tmp_path / "opt.pt").stdout
    with pytest.raises(SelectError, match=r"optimizer state .* not a model's weights.*--select \(one of: state\.0, "):
        surgery.remap(tmp_path / "opt.pt", tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()
    surgery.remap(tmp_path / "opt.pt", tmp_path / "o.safetensors", {"select": "state.2", "ops": []})
    assert set(surgery.open(tmp_path / "o.safetensors").tensors) == {"step", "exp_avg", "exp_avg_sq"}


def test_a_digit_like_key_and_a_list_of_parameters_do_not_traceback(tmp_path):
    torch.save({"²": {"x": 1}, "0": 5, "model": {"a": torch.ones(1)}}, tmp_path / "a.pt")
    assert surgery.open(tmp_path / "a.pt").extras == {"²": "dict (1 entries)", "0": "5"}
    module = Via(copyreg.__newobj__, (argparse.Namespace,),
                 {"_parameters": [torch.ones(1)], "_buffers": None, "_modules": {}})
    torch.save({"net": module, "sd": {"w": torch.ones(2)}}, tmp_path / "b.pt")
    assert list(surgery.open(tmp_path / "b.pt", allow_globals=["argparse.Namespace"]).tensors) == ["w"]


# ---------------------------------------------------------------- refusals that say what works

def rebuild_from_code(t):  # a global surgery does not know that builds a tensor from tensor data
    return t


def test_a_record_beside_the_weights_suggests_allow_global(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "a.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"argparse\.Namespace.*--allow-global argparse\.Namespace"):
        surgery.open(tmp_path / "a.pt")
    assert list(surgery.open(tmp_path / "a.pt", allow_globals=["argparse.Namespace"]).tensors) == ["w"]


def test_code_that_builds_a_tensor_is_not_offered_to_allow(tmp_path):
    torch.save({"w": Via(rebuild_from_code, (torch.ones(2),)), "b": torch.ones(1)}, tmp_path / "a.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"tensors are built by code: tests\.formats\.test_kinds\.rebuild_from_code"
                                                    r".*accepting these names as data would lose those tensors") as e:
        surgery.open(tmp_path / "a.pt")
    assert "--allow-global" not in str(e.value)


def test_a_tensor_subclass_it_cannot_rebuild_is_named(tmp_path):
    src = tmp_path / "a.pt"  # a wrapper-subclass rebuild naming a class off the allowlist
    torch.save({"w": Via(torch._utils._rebuild_wrapper_subclass,
                         (argparse.Namespace, torch.float32, (2,), (1,), 0, torch.strided, torch.device("cpu"), False))},
               src)
    with pytest.raises(UnsafeCheckpointError, match=r"built by code: argparse\.Namespace") as e:
        surgery.open(src)
    assert "--allow-global" not in str(e.value)
    with pytest.raises(FormatError, match=r"tensor subclass argparse\.Namespace keeps its data in its own code"):
        surgery.open(src, allow_globals=["argparse.Namespace"])


def test_python2_names_are_named_as_python3_has_them(tmp_path):
    torch.save({"w": torch.ones(1), "n": Via(argparse.Namespace, ())}, tmp_path / "a.pt")
    with zipfile.ZipFile(tmp_path / "a.pt") as zin, zipfile.ZipFile(tmp_path / "b.pt", "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"cargparse\nNamespace\n", b"c__builtin__\nlong\n")
            zout.writestr(info.filename, data)
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.int") as e:
        surgery.open(tmp_path / "b.pt")
    assert "long" not in str(e.value) and "__builtin__" not in str(e.value)


def test_a_refusal_that_leaves_no_tensor_says_so(tmp_path):
    torch.save({"n": argparse.Namespace(x=1)}, tmp_path / "a.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"leave no tensor surgery can read") as e:
        surgery.open(tmp_path / "a.pt")
    assert "--allow-global" not in str(e.value)


def test_corrupt_sparse_indices_are_refused_when_materialised(tmp_path):
    bad = torch.sparse_coo_tensor(torch.tensor([[0, 5]]), torch.tensor([1.0, 2.0]), (2,), check_invariants=False)
    torch.save({"sp": bad}, tmp_path / "a.pt")
    with pytest.raises(FormatError, match=r"sparse tensor 'sp' is inconsistent"):
        surgery.open(tmp_path / "a.pt").state_dict()


def test_unknown_dtype_in_safetensors_output_is_refused(tmp_path):
    torch.save({"c": torch.ones(2, dtype=torch.complex128), "w": torch.ones(1)}, tmp_path / "a.pt")
    with pytest.raises(RuleError, match=r"'c' \(dtype C128\): --drop '\^c\$'"):
        surgery.remap(tmp_path / "a.pt", tmp_path / "o.safetensors")
    surgery.remap(tmp_path / "a.pt", tmp_path / "o.pt", verify=True)


def test_diff_compares_the_values_of_every_kind(kinds_file, tmp_path):
    surgery.remap(kinds_file, tmp_path / "out.pt", {"ops": []})
    result = surgery.diff(kinds_file, tmp_path / "out.pt")
    assert result.report.to_json()["max_abs_diff"] == {k: 0.0 for k in ("w", "sp", "csr", "q", "qc", "nest")}


def _qstorage(n: int):
    q = torch.quantize_per_tensor(torch.zeros(n), 0.1, 0, torch.qint8)
    return torch.storage.TypedStorage(wrap_storage=q.untyped_storage(), dtype=torch.qint8, _internal=True)


@pytest.mark.parametrize("record, at_open, message", [
    (Via(torch._utils._rebuild_nested_tensor, (torch.arange(4.0), torch.tensor([[3], [2]]), torch.tensor([[1], [1]]),
                                               torch.tensor([0, 3]))), False, r"nested tensor 'x' has components outside"),
    (Via(torch._utils._rebuild_qtensor, (_qstorage(4), 0, (4,), (1,),
                                         (torch.per_channel_affine, [0.1, 0.2], [0, 0], 0), False, {})),
     True, r"2 scales for 4 channels"),
    (Via(torch._utils._rebuild_qtensor, (_qstorage(4), 0, (100,), (1,), (torch.per_tensor_affine, 0.1, 0), False, {})),
     True, r"reaches past the end of its storage"),
    (Via(torch._utils._rebuild_qtensor, (_qstorage(4), 0, (4,), (1,), (torch.per_tensor_symmetric, 0.1, 0), False, {})),
     True, r"qscheme torch\.per_tensor_symmetric cannot be rebuilt"),
    (Via(torch._utils._rebuild_meta_tensor_no_storage, (torch.float32, (1 << 62, 1 << 62), (1, 1), False)),
     False, r"meta tensor 'x' is inconsistent"),
    (Via(torch._utils._rebuild_sparse_tensor, (torch.strided, (torch.ones(1), torch.ones(1), (1,)))),
     True, r"sparse tensor has layout torch\.strided"),
])
def test_inconsistent_records_are_refused_not_crashed_on(tmp_path, record, at_open, message):
    torch.save({"x": record, "w": torch.ones(1)}, tmp_path / "a.pt")
    with pytest.raises(FormatError, match=message):
        surgery.open(tmp_path / "a.pt").state_dict()
    if not at_open:
        assert set(surgery.open(tmp_path / "a.pt").tensors) == {"x", "w"}


def test_every_kind_reads_from_the_legacy_format_too(tmp_path):
    sd = _kinds()
    del sd["nest"]  # torch.load cannot rebuild a nested tensor from a legacy file (its buffer comes later)
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    want = torch.load(tmp_path / "legacy.pt", weights_only=True)
    got = surgery.open(tmp_path / "legacy.pt").state_dict()
    assert list(got) == list(want)
    for k in want:
        assert_same(k, got[k], want[k])


@pytest.mark.parametrize("value, shown", [(torch.float32, "only the value dtype F32"), (5, "only the value 5"),
                                          ([1, 2], "a list of 2 items, none of them tensors"),
                                          (torch.sparse_coo, "only the value torch.sparse_coo")])
def test_a_file_without_tensors_says_what_it_holds(tmp_path, value, shown):
    torch.save(value, tmp_path / "a.pt")
    with pytest.raises(SelectError, match=rf"holds no tensors \(entries: {shown}\)$"):
        surgery.open(tmp_path / "a.pt")
