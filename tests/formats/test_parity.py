"""Parity with torch.load(weights_only=True), driven by torch's own allowlist.

For every global the installed torch's weights-only unpickler accepts, some file below uses it
(written by torch.save, or crafted the way an older torch wrote it); each file must open in
`surgery.open` with no flag and give the tensors torch.load gives: names, dtypes, shapes, bytes,
and for sparse, quantized, nested and meta tensors what makes them those tensors. A global that
no file can use is listed in UNPRODUCIBLE with the reason; a torch upgrade that adds an entry
fails `test_every_allowlist_entry_is_covered` until a file uses it or it is listed.
"""

from __future__ import annotations

import _compat_pickle
import collections
import copyreg
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import pytest

torch = pytest.importorskip("torch")
from torch._weights_only_unpickler import _get_allowed_globals  # noqa: E402

import surgery  # noqa: E402
from fixtures.compare import Via, assert_same  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

UNPRODUCIBLE = {
    "torch._utils._rebuild_device_tensor_from_numpy":
        "its data is a numpy array, and numpy's globals are not on the allowlist: torch.load(weights_only=True) "
        "refuses every file that uses it",
    "torch._utils._rebuild_wrapper_subclass":
        "its first argument must be a tensor subclass defining __torch_dispatch__, and no such class is on the "
        "allowlist: torch.load(weights_only=True) refuses every file that uses it",
}


def _bytes_of(dtype: "torch.dtype", n: int, seed: int) -> "torch.Tensor":
    g = torch.Generator().manual_seed(seed)
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=g)
    return raw.view(dtype) if size > 1 or dtype != torch.uint8 else raw


def _saveable_dtypes() -> list:
    return [d for d in {*torch.storage._dtype_to_storage_type_map(), *torch.storage._new_dtypes()}
            if not d.is_complex or d in (torch.complex64, torch.complex128, torch.complex32, torch.bcomplex32)]


def _dense_all_dtypes():
    out = {}
    for i, dt in enumerate(sorted(_saveable_dtypes(), key=str)):
        if dt in (torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4):
            continue  # quantized: below, with their quantizers
        out[str(dt)] = _bytes_of(dt, 6, i).reshape(2, 3)
    out["strided_view"] = torch.arange(12.0).reshape(3, 4).t()[1:]
    return out


def _quantized():
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "qint8": torch.quantize_per_tensor(x, 0.05, 3, torch.qint8),
            "quint8": torch.quantize_per_tensor(x, 0.05, 128, torch.quint8),
            "qint32": torch.quantize_per_tensor(x, 0.05, 0, torch.qint32),
            "quint4x2": torch.quantize_per_tensor(x, 0.5, 8, torch.quint4x2),
            "quint2x4": torch.quantize_per_tensor(x, 0.5, 2, torch.quint2x4),
            "per_channel": torch.quantize_per_channel(x, torch.rand(4) + 0.01, torch.arange(4), 0, torch.quint8),
            "per_channel_axis1": torch.quantize_per_channel(x, torch.rand(6) + 0.01, torch.zeros(6, dtype=torch.long),
                                                            1, torch.qint8),
            "float_qparams": torch.quantize_per_channel(x, torch.rand(4) + 0.01, torch.rand(4), 0, torch.quint8),
        }


def _sparse():
    x = torch.tensor([[0.0, 1.5, 0.0, 2.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 4.0, 5.0], [0.0, 6.0, 0.0, 0.0]])
    uncoalesced = torch.sparse_coo_tensor(torch.tensor([[1, 0, 1], [2, 1, 2]]), torch.tensor([1.0, 2.0, 3.0]), (2, 4))
    return {"coo": x.to_sparse(), "coo_uncoalesced": uncoalesced, "csr": x.to_sparse_csr(), "csc": x.to_sparse_csc(),
            "bsr": x.to_sparse_bsr((2, 2)), "bsc": x.to_sparse_bsc((2, 2)), "dense": x}


def _nested():
    return {"nested": torch.nested.nested_tensor([torch.arange(3.0), torch.arange(5.0) * 2, torch.ones(0)]),
            "nested_2d": torch.nested.nested_tensor([torch.ones(2, 3), torch.zeros(4, 3)])}


def _parameters():
    p = torch.nn.Parameter(torch.arange(4.0))
    q = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    q.tag = 1  # state beside the data: _rebuild_parameter_with_state
    t = torch.arange(3.0)
    t.note = "x"  # a tensor with Python state: _rebuild_from_type_v2(..., torch.Tensor, ...)
    return {"p": p, "q": q, "t": t}


def _legacy_calls():
    s = torch.arange(5.0)
    i, v = torch.tensor([[0, 2], [1, 0]]), torch.tensor([1.0, 2.0])
    return {
        "pre04": Via(torch._utils._rebuild_tensor, (s.storage(), 1, (2, 2), (2, 1))),
        "from_storage": Via(torch.FloatTensor, (torch.arange(3.0).storage(),)),
        "long_from_storage": Via(torch.LongTensor, (torch.arange(3).storage(),)),
        "legacy_sparse": Via(torch.sparse.FloatTensor, (i, v, torch.Size([3, 2]))),
        "set_state": Via(copyreg.__newobj__, (torch.Tensor,), (torch.arange(4.0).storage(), 0, (2, 2), (2, 1))),
        "param_newobj": Via(copyreg.__newobj__, (torch.nn.Parameter, torch.arange(2.0), False)),
        "device_copy": Via(torch._utils._rebuild_device_tensor_from_cpu_tensor,
                           (torch.arange(3.0), torch.float32, "cpu", False)),
    }


def _values():
    """Allowlisted globals as plain values beside the weights (configs keep dtypes, qschemes ...)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classes = [c for c in torch._tensor_classes]
    return {
        "w": torch.ones(2),
        "dtypes": [d for d in vars(torch).values() if isinstance(d, torch.dtype)],
        "qschemes": [torch.per_tensor_affine, torch.per_tensor_symmetric, torch.per_channel_affine,
                     torch.per_channel_symmetric, torch.per_channel_affine_float_qparams],
        "layouts": [torch.strided, torch.sparse_coo, torch.sparse_csr],
        "tensor_classes": classes,
        "storage_classes": [torch.storage.TypedStorage, torch.storage.UntypedStorage],
        "device": torch.device("cpu", 0),
        "size": torch.Size([2, 3]),
        "bytes": b"\x00\xff\x10",
        "bytearray": bytearray(b"\x01\x02\xfe"),
        "set": {1, 2, 3},
        "complex": 1.5 - 2j,
        "counter": collections.Counter(a=2, b=1),
        "ordered": collections.OrderedDict(a=1),
    }


def _storages():
    return {"untyped": torch.arange(4.0).untyped_storage(), "typed": torch.arange(3, dtype=torch.int16).storage()}


# torch.save output; name -> object
SAVED: dict[str, Callable[[], Any]] = {
    "dense_all_dtypes": _dense_all_dtypes, "quantized": _quantized, "sparse": _sparse, "nested": _nested,
    "meta": lambda: {"meta": torch.empty(3, 4, device="meta"), "meta_t": torch.empty(4, 3, device="meta").t(),
                     "meta_i8": torch.empty(2, dtype=torch.int8, device="meta")},
    "parameters": _parameters, "legacy_calls": _legacy_calls, "values": _values, "storages": _storages,
    "bare_tensor": lambda: torch.arange(6.0).reshape(2, 3),
    "tensor_list": lambda: [torch.ones(2), torch.zeros(3, dtype=torch.int64)],
    "tensor_tuple": lambda: (torch.ones(2), torch.arange(3.0)),
}


def _patch_pickle(src: Path, dst: Path, fn: Callable[[bytes], bytes]) -> Path:
    """Copy a torch zip with its data.pkl rewritten by ``fn`` (every entry stored, as torch writes)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info.filename, fn(data) if info.filename.endswith("data.pkl") else data)
    return dst


def _cuda_storages(pkl: bytes) -> bytes:
    for name in ("Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool",
                 "ComplexFloat", "ComplexDouble"):
        pkl = pkl.replace(f"ctorch\n{name}Storage\n".encode(), f"ctorch.cuda\n{name}Storage\n".encode())
    return pkl


def _sub_byte(dtype: str) -> Callable[[bytes], bytes]:
    return lambda pkl: pkl.replace(b"ctorch\nuint16\n", f"ctorch\n{dtype}\n".encode())


# crafted from a saved file; name -> (base file, rewrite of its data.pkl)
CRAFTED: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    "cuda_storage_names": ("dense_all_dtypes", _cuda_storages),
    **{f"sub_byte_{p}{n}": ("uint16_base", _sub_byte(f"{p}{n}")) for p in ("uint", "int") for n in range(1, 8)},
}
SAVED["uint16_base"] = lambda: {"x": torch.arange(8, dtype=torch.int16).view(torch.uint16)}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parity")
    out = {}
    for name, make in SAVED.items():
        out[name] = root / f"{name}.pt"
        torch.save(make(), out[name])
    for name, (base, fn) in CRAFTED.items():
        out[name] = _patch_pickle(out[base], root / f"{name}.pt", fn)
    return out


def _globals_in(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    names = set()
    for op, arg, _ in pickletools.genops(pkl):
        if op.name == "GLOBAL":
            module, name = arg.split(" ", 1)
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            names.add(f"{module}.{name}")
    return names


def test_every_allowlist_entry_is_covered(files):
    allowed = set(_get_allowed_globals())
    used = set().union(*(_globals_in(p) for p in files.values()))
    assert used <= allowed, f"test files use globals torch refuses: {sorted(used - allowed)}"
    assert not set(UNPRODUCIBLE) & used, "listed as unproducible but a file uses it"
    missing = allowed - used - set(UNPRODUCIBLE)
    assert not missing, f"allowlist entries no parity file uses (add a file or list them with a reason): {sorted(missing)}"


def _as_tensor(v: Any) -> Any:
    if isinstance(v, torch.storage.TypedStorage):
        return torch.tensor([], dtype=v.dtype).set_(v)
    if isinstance(v, torch.UntypedStorage):
        return torch.tensor([], dtype=torch.uint8).set_(v)
    return v if isinstance(v, torch.Tensor) else None


def _expected(obj: Any) -> dict[str, Any]:
    """The tensors of torch.load's result, named as surgery names them."""
    if isinstance(obj, torch.Tensor):
        return {"tensor": obj}
    items = obj.items() if isinstance(obj, dict) else ((str(i), v) for i, v in enumerate(obj))
    return {k: t for k, v in items if (t := _as_tensor(v)) is not None}


def _load_torch(path: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, weights_only=True)


@pytest.mark.parametrize("name", [*SAVED, *CRAFTED])
def test_same_tensors_as_torch(files, name):
    path = files[name]
    want = _expected(_load_torch(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = surgery.open(path).state_dict()
    assert list(got) == list(want)
    for key in want:
        assert_same(key, got[key], want[key])


def test_non_tensor_values_are_summarised_without_internal_names(files):
    ckpt = surgery.open(files["values"])
    assert list(ckpt.tensors) == ["w"]
    text = " ".join(ckpt.extras.values())
    for internal in ("TensorRef", "StorageRef", "StorageType", "DType", "QScheme", "Layout", "LegacyTensorType"):
        assert internal not in text
    assert ckpt.extras["device"] == "'cpu:0'" and ckpt.extras["bytes"] == repr(b"\x00\xff\x10")


def test_every_allowlisted_dtype_has_a_name_and_torch_itemsize():
    from surgery.checkpoint import DTYPES, canonical_from_torch, itemsize, torch_dtype

    allowed = [v for v in _get_allowed_globals().values() if isinstance(v, torch.dtype)]
    for dt in allowed:
        name = canonical_from_torch(str(dt))
        assert name is not None, f"{dt} has no canonical name"
        assert torch_dtype(name) == dt and itemsize(name) == torch.empty(0, dtype=dt).element_size(), dt
    assert len({canonical_from_torch(str(d)) for d in allowed}) == len(allowed) == len(DTYPES)


def test_values_are_named_as_torch_names_them(tmp_path):
    torch.save({"w": torch.ones(1), "dtype": torch.float16, "layout": torch.sparse_coo, "qscheme": torch.per_tensor_affine,
                "type": torch.cuda.FloatTensor, "storage": torch.storage.TypedStorage}, tmp_path / "v.pt")
    assert surgery.open(tmp_path / "v.pt").extras == {
        "dtype": "dtype F16", "layout": "torch.sparse_coo", "qscheme": "torch.per_tensor_affine",
        "type": "torch.cuda.FloatTensor", "storage": "storage type U8"}
