"""Files two readers could read differently: each is refused with one line, or read exactly as
torch's own reader reads it (torch.load(weights_only=True), torch.jit.load(...).state_dict(),
tarfile for torch's tar-first order, transformers' shard-by-shard loading). Every file is built
by hand (bench/reliability.py's builders, which the reliability run also uses) and the test shows
what the real loader makes of it."""

from __future__ import annotations

import io
import json
import tarfile
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import surgery
from bench.reliability import (JIT_EDITS, bin_shards_state, evil_pickle, hf_shards_state, legacy_tar_polyglot,
                               patch_central, torch_state, zip_entries, zip_raw)
from surgery.errors import FormatError

CLEAN = {"module.a": torch.arange(4.0), "module.b": torch.full((2, 3), 7.0)}


def _saved(**kw) -> bytes:
    buf = io.BytesIO()
    torch.save(CLEAN, buf, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def parts() -> tuple[list[tuple[bytes, bytes, int]], str, bytes]:
    """A real torch zip's entries (raw name, bytes, flags), its folder and its data.pkl."""
    entries = zip_entries(_saved())
    prefix = entries[0][0].split("/")[0]
    pkl = next(d for n, d in entries if n.endswith("/data.pkl"))
    return [(n.encode(), d, 0) for n, d in entries], prefix, pkl


def _write(tmp_path: Path, data: bytes, name: str = "f.pt") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _same_as_torch(path: Path, kind: str = "load") -> None:
    ours, theirs = surgery.open(path).state_dict(), torch_state(path, kind)
    assert list(ours) == list(theirs)
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k


def _refused(path: Path, match: str) -> None:
    with pytest.raises(FormatError, match=match) as e:
        surgery.open(path)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------ which data.pkl

def test_a_decoy_data_pkl_listed_first_is_not_what_surgery_reads(tmp_path, parts):
    raw, prefix, pkl = parts
    path = _write(tmp_path, zip_raw([(f"{prefix}/xdata.pkl".encode(), evil_pickle(pkl), 0)] + raw))
    assert list(torch_state(path)) == ["module.a", "module.b"]  # torch reads ARCHIVE/data.pkl
    _same_as_torch(path)


def test_a_lone_data_pkl_in_other_case_is_read_as_torch_finds_it(tmp_path, parts):
    raw, _, _ = parts
    path = _write(tmp_path, zip_raw([(n.replace(b"data.pkl", b"DATA.PKL"), d, f) for n, d, f in raw]))
    _same_as_torch(path)


def _case_twin_first(raw, prefix, pkl):
    return [(f"{prefix}/DATA.PKL".encode(), evil_pickle(pkl), 0)] + raw


def _case_twin_last(raw, prefix, pkl):
    return raw + [(f"{prefix}/Data.Pkl".encode(), evil_pickle(pkl), 0)]


def _utf8_flag_twin(raw, prefix, pkl):
    """A non-ASCII folder; data.pkl twice with the same bytes, the second copy flagged UTF-8."""
    out = [("\u00e9".encode() + n[len(prefix):], d, 0) for n, d, _ in raw]
    at = next(i for i, (n, _, _) in enumerate(out) if n.endswith(b"/data.pkl"))
    return out[:at + 1] + [(out[at][0], evil_pickle(out[at][1]), 0x800)] + out[at + 1:]


def _storage_case_twin(raw, prefix, pkl):
    name, data, _ = next(e for e in raw if b"/data/" in e[0])
    return raw + [(name.replace(b"/data/", b"/DATA/"), bytes(len(data)), 0)]


TWINS = {"case twin first": _case_twin_first, "case twin last": _case_twin_last, "utf8 flag twin": _utf8_flag_twin,
         "storage case twin": _storage_case_twin}


@pytest.mark.parametrize("how", TWINS)
def test_names_equal_ignoring_case_or_encoding_are_refused(tmp_path, parts, how):
    path = _write(tmp_path, zip_raw(TWINS[how](*parts)))
    torch_state(path)  # torch reads one of the copies without a word
    _refused(path, "holds 1 entry twice")


@pytest.mark.parametrize("names, match", [
    ([b"other/data.pkl"], "outside its top folder 'archive/'"),
    ([b"x"], "outside its top folder"),
])
def test_entries_outside_the_record_folder_are_refused(tmp_path, parts, names, match):
    raw, _, pkl = parts
    _refused(_write(tmp_path, zip_raw(raw + [(n, evil_pickle(pkl), 0) for n in names])), match)


def test_an_archive_without_a_top_folder_is_refused_as_torch_does(tmp_path, parts):
    raw, prefix, _ = parts
    path = _write(tmp_path, zip_raw([(n[len(prefix) + 1:], d, f) for n, d, f in raw]))
    with pytest.raises(RuntimeError, match="not in a subdirectory"):
        torch_state(path)
    _refused(path, "first entry 'data.pkl' is not in a folder")


# ------------------------------------------------------------------------ which central directory

@pytest.mark.parametrize("evil_first", [False, True])
def test_two_central_directories_are_refused(tmp_path, parts, evil_first):
    """The end record gives one directory's offset and the other's size: zipfile reads the one
    before the end record, torch the one at the offset."""
    raw, _, _ = parts
    evil = [(n, evil_pickle(d) if n.endswith(b"/data.pkl") else d, f) for n, d, f in raw]
    first, second = (evil, raw) if evil_first else (raw, evil)
    path = _write(tmp_path, zip_raw(first, second=second))
    with zipfile.ZipFile(path) as z:
        zipfile_keys = z.read("archive/data.pkl")
    assert (b"EVILXX" in zipfile_keys) != evil_first  # zipfile reads the second directory
    assert any(k.startswith("EVILXX") for k in torch_state(path)) == evil_first  # torch the first
    _refused(path, "does not end where its end record begins")


@pytest.mark.parametrize("delta", [-1, 1])
def test_an_end_record_counting_other_than_its_records_is_refused(tmp_path, parts, delta):
    raw, _, _ = parts
    _refused(_write(tmp_path, zip_raw(raw, count=len(raw) + delta)), f"counts {len(raw) + delta} entries")


def test_an_end_record_whose_comment_does_not_reach_the_end_is_refused(tmp_path, parts):
    """A second end record in the first one's comment, declaring a comment longer than what
    follows: zipfile and torch take the last record, readers that check the comment the first."""
    raw, _, _ = parts
    fake = zip_raw([(n, evil_pickle(d) if n.endswith(b"/data.pkl") else d, f) for n, d, f in raw])
    path = _write(tmp_path, zip_raw(raw, comment=fake[-22:-2] + b"\x09\x00"))
    _refused(path, "comment length does not reach the end")


def test_a_zip64_locator_pointing_elsewhere_is_refused(tmp_path):
    raw = bytearray(_saved())  # torch writes zip64 end records
    loc = raw.rfind(b"PK\x06\x07")
    raw[loc + 8:loc + 16] = (int.from_bytes(raw[loc + 8:loc + 16], "little") - 1).to_bytes(8, "little")
    _refused(_write(tmp_path, bytes(raw)), "zip64 end record is not where its locator points")


# ----------------------------------------------------------------------------- legacy/tar polyglot

def test_a_legacy_file_that_is_also_a_tar_is_refused(tmp_path):
    path = _write(tmp_path, legacy_tar_polyglot(_saved(_use_new_zipfile_serialization=False)))
    tarfile.open(path, "r:").close()  # torch.load's first try for a non-zip file takes it
    with pytest.raises(RuntimeError, match="legacy .tar format"):
        torch_state(path)
    _refused(path, "also a valid tar header")


def test_a_legacy_file_with_a_near_tar_header_reads_like_torch(tmp_path):
    path = _write(tmp_path, legacy_tar_polyglot(_saved(_use_new_zipfile_serialization=False), valid=False))
    _same_as_torch(path)


# ----------------------------------------------------------------------------------------- shards

def _shards(folder: Path, later_copy: bool) -> Path:
    folder.mkdir()
    save_file({"a": torch.ones(2)}, str(folder / "model-00001-of-00002.safetensors"))
    second = {"b": torch.zeros(3)} | ({"a": torch.full((2,), 9.0)} if later_copy else {})
    save_file(second, str(folder / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_a_tensor_stored_in_two_shards_is_refused(tmp_path):
    folder = _shards(tmp_path / "m", later_copy=True)
    assert torch.equal(hf_shards_state(folder)["a"], torch.full((2,), 9.0))  # the later shard's copy loads
    with pytest.raises(FormatError, match=r"stored in two shards: a \(in model-00001-of-00002.safetensors and "
                                          r"model-00002-of-00002.safetensors\)"):
        surgery.open(folder)


def test_shards_storing_each_tensor_once_read_like_transformers(tmp_path):
    folder = _shards(tmp_path / "m", later_copy=False)
    ours, theirs = surgery.open(folder).state_dict(), hf_shards_state(folder)
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)


# ------------------------------------------------------------------------------------ TorchScript

@pytest.fixture(scope="module")
def script(tmp_path_factory) -> list[tuple[str, bytes]]:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("jit") / "s.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))), str(path))
    return zip_entries(path.read_bytes())


def _edited(entries, old: bytes, new: bytes) -> bytes:
    hits = [i for i, (n, d) in enumerate(entries) if n.endswith(".py") and old in d]
    assert hits
    out = list(entries)
    out[hits[0]] = (out[hits[0]][0], out[hits[0]][1].replace(old, new, 1))
    return zip_raw([(n.encode(), d, 0) for n, d in out])


@pytest.mark.parametrize("edit, match", [
    (JIT_EDITS[0], "class Linear assigns __parameters__ twice"),
    (JIT_EDITS[1], "class Linear assigns __parameters__ twice"),
    (JIT_EDITS[2], "class BatchNorm1d assigns __buffers__ twice"),
    (JIT_EDITS[4], "assigns __parameters__ in a form"),
    ((b"class Linear(Module):\n", b"class Linear(Module):\n  pass\nclass Linear(Module):\n"), "Linear is defined twice"),
])
def test_torchscript_declarations_given_twice_are_refused(tmp_path, script, edit, match):
    path = _write(tmp_path, _edited(script, *edit))
    if edit in JIT_EDITS[:3]:  # torch adds the lists up: every parameter and buffer is still there
        assert sorted(torch_state(path, "jit")) == ["0.bias", "0.weight", "1.bias", "1.num_batches_tracked",
                                                    "1.running_mean", "1.running_var", "1.weight"]
    _refused(path, match)


def test_a_rezipped_torchscript_archive_reads_like_torch_jit(tmp_path, script):
    _same_as_torch(_write(tmp_path, _edited(script, *JIT_EDITS[-1])), "jit")


# ------------------------------------------------------------------------------------ inflation

def test_a_memoize_bomb_padded_past_the_declared_ratio_is_refused_at_once(tmp_path, parts):
    """2 MB of MEMOIZE deflate to about 2 KB; 1 MB of junk after the stream makes the declared
    compressed size pass a 64x ratio (and the archive large enough to hold the pickle). The real
    stream is counted: refused before the pickle is read."""
    raw, prefix, _ = parts
    bomb = b"\x80\x04K\x01" + b"\x94" * (2 << 20) + b"0}."
    name = f"{prefix}/data.pkl".encode()
    path = _write(tmp_path, zip_raw(raw, deflate={name: (bomb, 1 << 20)}))
    assert path.stat().st_size < 1100 << 10
    t0 = time.process_time()
    _refused(path, "inflates .* of its deflate stream to more than .*refusing a zip bomb")
    assert time.process_time() - t0 < 2


@pytest.mark.parametrize("junk", [0, 4096])
def test_a_deflated_data_pkl_reads_like_torch(tmp_path, parts, junk):
    raw, prefix, pkl = parts
    _same_as_torch(_write(tmp_path, zip_raw(raw, deflate={f"{prefix}/data.pkl".encode(): (pkl, junk)})))


# --------------------------------------------------------------------------- diff and --verify

def _hostile(tmp_path: Path, parts, script) -> dict[str, Path]:
    raw, prefix, pkl = parts
    evil = [(n, evil_pickle(d) if n.endswith(b"/data.pkl") else d, f) for n, d, f in raw]
    return {
        "case twin": _write(tmp_path, zip_raw(_case_twin_last(raw, prefix, pkl)), "twin.pt"),
        "two directories": _write(tmp_path, zip_raw(raw, second=evil), "two.pt"),
        "tar polyglot": _write(tmp_path, legacy_tar_polyglot(_saved(_use_new_zipfile_serialization=False)), "poly.pt"),
        "stored twice": _shards(tmp_path / "shards", later_copy=True),
        "declared twice": _write(tmp_path, _edited(script, *JIT_EDITS[0]), "jit.pt"),
    }


def test_diff_and_remap_verify_never_call_a_hostile_file_identical(tmp_path, parts, script, cli):
    clean = _write(tmp_path, _saved(), "clean.pt")
    for what, path in _hostile(tmp_path, parts, script).items():
        r = cli("diff", clean, path)
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, (what, r.stdout, r.stderr)
        out = tmp_path / f"out-{path.stem}.safetensors"
        r = cli("remap", path, out, "--verify")
        assert r.exit_code == 2 and not out.exists(), (what, r.stdout, r.stderr)


class _Scripted(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.ones(2))
        self.register_buffer("b", torch.zeros(3))

    def forward(self, x):
        return x * self.a.sum() + self.b.sum()


def _rescripted(tmp_path: Path, edit) -> Path:
    """A torch.jit.save archive whose model code is edited by ``edit(bytes) -> bytes``."""
    src = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(_Scripted()), str(src))
    out = tmp_path / "edited.pt"
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zo:
        for i in z.infolist():
            d = z.read(i.filename)
            code = "/code/__torch__" in i.filename and i.filename.endswith(".py")
            zo.writestr(i.filename, edit(d) if code else d)
    return out


@pytest.mark.parametrize("unparsable", [b"\t\t\t\t", b"    # \x00\n    "])
def test_code_pythons_parser_does_not_read_is_refused(tmp_path, unparsable):
    # a tab or a NUL torch's lexer takes: a second list, or a class header spaced otherwise,
    # would hide parameters torch.jit.load still finds from any reader but a full parser
    def edit(d: bytes) -> bytes:
        d = d.replace(b"  __buffers__ = [", b'  __parameters__ =["b"]\n  __buffers__ = [', 1)
        return d.replace(b"\n    a = self.a", b"\n" + unparsable + b"a = self.a", 1)

    path = _rescripted(tmp_path, edit)
    _refused(path, r"is not code surgery can parse")


class _Child(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.lin(x)


class _Parent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c = _Child()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.c(x) * self.w.sum()


def _reparented(tmp_path: Path, old: bytes, new: bytes) -> Path:
    """A torch.jit.save archive of _Parent whose code has ``old`` replaced by ``new``."""
    src = tmp_path / "parent.pt"
    torch.jit.save(torch.jit.script(_Parent()), str(src))
    entries = zip_entries(src.read_bytes())
    hits = [i for i, (n, d) in enumerate(entries) if n.endswith(".py") and old in d]
    assert hits, old
    entries[hits[0]] = (entries[hits[0]][0], entries[hits[0]][1].replace(old, new, 1))
    return _write(tmp_path, zip_raw([(n.encode(), d, 0) for n, d in entries]), "edited.pt")


def test_a_module_class_without_declarations_is_still_a_module(tmp_path):
    """torch's importer takes the two lists as optional: a Module class without them still
    holds submodules, whose tensors torch.jit.load(...).state_dict() lists."""
    path = _reparented(tmp_path, b"  __parameters__ = []\n  __buffers__ = []\n", b"")
    assert sorted(torch_state(path, "jit")) == ["c.lin.bias", "c.lin.weight", "w"]
    _same_as_torch(path, "jit")


@pytest.mark.parametrize("old, new, match", [
    (b'__parameters__ = ["weight", "bias", ]\n  __buffers__ = []', b'__parameters__ = ["weight", "bias", ]\n  '
     b'__buffers__ = ["weight", ]', "both a parameter and a buffer"),
    (b"class Linear(Module):", b"class Linear:", "but is not a Module"),
    (b"class Linear(Module):", b"class Other(Module):", "does not define class Linear"),
    (b"  bias : Tensor\n", b"", "declares 'bias' without giving its type"),
    (b"  c : __torch__.", b"  c : Any\n  _unused : __torch__.", "holds submodule 'c' without its module type"),
])
def test_torchscript_classes_torch_cannot_load_are_refused(tmp_path, old, new, match):
    path = _reparented(tmp_path, old, new)
    with pytest.raises(Exception):
        torch_state(path, "jit")
    _refused(path, match)


_STATEFUL = """
import sys, torch


class Stateful(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.full((2,), 1.0))
        self.q = torch.nn.Parameter(torch.full((2,), 2.0))

    def forward(self, x):
        return x * self.p + self.q

    @torch.jit.export
    def __getstate__(self):
        return {"p": self.q, "q": self.p}

    @torch.jit.export
    def __setstate__(self, state: dict[str, torch.Tensor]):
        self.p = state["q"]
        self.q = state["p"]
        self.training = False


torch.jit.save(torch.jit.script(Stateful()), sys.argv[1])
"""


def test_a_module_that_restores_its_own_state_is_refused(tmp_path):
    """torch.jit.save writes such a module itself; only running its __setstate__ says which tensor is which."""
    import subprocess
    import sys

    path = tmp_path / "stateful.pt"  # scripted in a fresh process: TorchScript's type cache is process-wide
    (tmp_path / "make.py").write_text(_STATEFUL)
    subprocess.run([sys.executable, str(tmp_path / "make.py"), str(path)], check=True, capture_output=True, timeout=300)
    assert torch_state(path, "jit")["p"].tolist() == [1.0, 1.0]  # torch ran the archive's __setstate__
    _refused(path, r"restores its state with its own code \(__setstate__\)")


def test_a_tensor_a_shard_holds_outside_the_index_is_refused(tmp_path):
    folder = tmp_path / "sh"
    folder.mkdir()
    save_file({"w": torch.ones(2), "lm_head.weight": torch.full((2,), 9.0)}, str(folder / "model-00001-of-00001.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"w": "model-00001-of-00001.safetensors"}}))
    assert set(hf_shards_state(folder)) == {"w", "lm_head.weight"}  # what transformers would load
    _refused(folder, r"the index does not map: lm_head.weight")


# ------------------------------------------------------------- records torch checks before reading

def _with_record(raw, prefix: str, name: str, data: bytes | None) -> list:
    """The archive's entries with record ``name`` replaced by ``data`` (dropped when None)."""
    full = f"{prefix}/{name}".encode()
    out = [(n, data if n == full else d, f) for n, d, f in raw if not (n == full and data is None)]
    return out if any(n == full for n, _, _ in raw) or data is None else out + [(full, data, 0)]


@pytest.mark.parametrize("name, data, match", [
    ("byteorder", b" little\n", "holds b' little\\\\n', not 'little' or 'big'"),
    ("byteorder", b"", "not 'little' or 'big'"),
    ("byteorder", b"LITTLE", "not 'little' or 'big'"),
    ("version", None, "has no archive/version record"),
    ("version", b"abc", "does not hold a file format version torch reads"),
    ("version", b"", "does not hold a file format version"),
    ("version", b"0", "does not hold a file format version"),
    ("version", b"11", "does not hold a file format version"),
    ("version", b"-1", "does not hold a file format version"),
    (".data/version", b"99", "archive/.data/version does not hold"),  # read before archive/version, as torch does
    (".storage_alignment", b"abc", "storage_alignment does not hold an integer"),
    (".storage_alignment", b"64.0", "storage_alignment does not hold an integer"),
    (".storage_alignment", b"", "storage_alignment does not hold an integer"),
])
def test_a_record_torch_refuses_is_refused(tmp_path, parts, name, data, match):
    raw, prefix, _ = parts
    path = _write(tmp_path, zip_raw(_with_record(raw, prefix, name, data)))
    with pytest.raises((RuntimeError, ValueError)):
        torch_state(path)
    _refused(path, match)


@pytest.mark.parametrize("version", [b"1", b" 3", b"3abc", b"+3\n", b"10"])
def test_a_version_record_torch_reads_is_read(tmp_path, parts, version):
    raw, prefix, _ = parts
    _same_as_torch(_write(tmp_path, zip_raw(_with_record(raw, prefix, "version", version))))


@pytest.mark.parametrize("extra", ["CONSTANTS.PKL", "code/x.py", "Constants.pkl"])
def test_a_torch_save_file_with_a_stray_torchscript_name_reads_like_torch_load(tmp_path, parts, extra):
    """torch.load calls a file TorchScript only when its records include exactly ``constants.pkl``."""
    raw, prefix, _ = parts
    path = _write(tmp_path, zip_raw(raw + [(f"{prefix}/{extra}".encode(), b"\x80\x02).", 0)]))
    _same_as_torch(path)
    assert surgery.open(path).format == "torch-zip"


@pytest.mark.parametrize("literal, torch_refuses", [
    (rb'"\x62"', True), (b'u"b"', True), (b'r"b"', True), (b'"b" ""', False), (b'"""b"""', False)])
def test_a_declared_name_torchscript_does_not_write_is_refused(tmp_path, literal, torch_refuses):
    """Python reads each of these as "b"; TorchScript's own parser refuses the first three, and
    surgery reads only the plain quoted names TorchScript writes."""
    path = _rescripted(tmp_path, lambda d: d.replace(b'__buffers__ = ["b", ]', b"__buffers__ = [" + literal + b", ]", 1))
    if torch_refuses:
        with pytest.raises(Exception):
            torch_state(path, "jit")
    _refused(path, "not a plain quoted name")


def test_a_plain_torchscript_archive_still_reads_like_torch_jit(tmp_path):
    _same_as_torch(_rescripted(tmp_path, lambda d: d), "jit")


# ------------------------------------------------------------------- .bin shards are flat dicts

def _bin_shards(folder: Path, second: dict) -> Path:
    folder.mkdir()
    torch.save({"a": torch.ones(2)}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save(second, folder / "pytorch_model-00002-of-00002.bin")
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}))
    return folder / "pytorch_model.bin.index.json"


@pytest.mark.parametrize("second, match", [
    ({"model": {"b": torch.zeros(3)}, "epoch": 3}, "shard pytorch_model-00002-of-00002.bin is not a flat dict of tensors"),
    ({"b": torch.zeros(3), "epoch": 3}, "holds epoch beside its tensors"),
])
def test_a_bin_shard_that_is_not_a_flat_tensor_dict_is_refused(tmp_path, second, match):
    index = _bin_shards(tmp_path / "m", second)
    assert set(bin_shards_state(index)) != {"a", "b"}  # transformers' state dict is each file's top level
    _refused(index, match)


def test_flat_bin_shards_read_like_transformers(tmp_path):
    index = _bin_shards(tmp_path / "m", {"b": torch.zeros(3)})
    ours, theirs = surgery.open(index).state_dict(), bin_shards_state(index)
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_the_readme_states_the_limits_the_code_holds():
    """The "What surgery refuses" section (docs/formats.md, linked from the README) quotes the reader's
    own constants."""
    from surgery.formats import container, torch_zip

    text = (Path(__file__).resolve().parents[2] / "docs" / "formats.md").read_text()
    section = text[text.index("## What surgery refuses"):text.index("## Folders are data")]
    flat = " ".join(section.split())
    assert f"budget of {container.WALK_BUDGET // 1_000_000} M steps plus {container.WALK_PER_BYTE} a byte of pickle" in flat
    versions = torch_zip.FORMAT_VERSIONS
    assert f"format version outside {versions.start}..{versions.stop - 1}" in flat
    assert f"over {torch_zip.MAX_INFLATION} times the bytes it really uses" in flat


@pytest.mark.parametrize("name, write, match", [
    ("pytorch_model-00001-of-00001.bin", lambda p: torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(p)),
     "is torchscript, but its name makes transformers read it as torch-zip"),
    ("model-00001-of-00001.safetensors", lambda p: torch.save({"weight": torch.ones(2)}, p), "is torch-zip, but"),
    ("pytorch_model-00001-of-00001.bin", lambda p: save_file({"weight": torch.ones(2)}, str(p)), "is safetensors, but"),
])
def test_a_shard_whose_bytes_are_not_what_its_name_says_is_refused(tmp_path, name, write, match):
    """transformers picks a shard's loader by its name; the loader refuses each of these."""
    folder = tmp_path / "m"
    folder.mkdir()
    write(folder / name)
    index = folder / ("model.safetensors.index.json" if name.endswith(".safetensors") else "pytorch_model.bin.index.json")
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"weight": name}}))
    with pytest.raises(Exception):
        bin_shards_state(index) if name.endswith(".bin") else hf_shards_state(folder)
    _refused(index, match)


@pytest.mark.parametrize("at, fmt, value, match", [
    (34, "<H", 0xFFFF, "names another disk"),
    (8, "<H", 0x2000, "is encrypted or masks its local header"),
    (8, "<H", 0x1, "is encrypted"),
    (24, "<L", 41, "is stored with a compressed size other than its size"),
    (10, "<H", 99, "uses compression method 99"),
])
def test_a_record_torchs_zip_reader_refuses_is_refused_though_never_read(tmp_path, parts, at, fmt, value, match):
    """miniz checks every central directory record when it opens an archive."""
    raw, prefix, _ = parts
    data = patch_central(zip_raw(raw), f"{prefix}/.data/serialization_id".encode(), at, fmt, value)
    path = _write(tmp_path, data)
    with pytest.raises(RuntimeError):
        torch_state(path)
    _refused(path, match)


@pytest.mark.parametrize("how", ["nul", "long"])
def test_names_torch_reads_cut_short_are_refused(tmp_path, parts, how):
    raw, prefix, pkl = parts
    if how == "nul":  # torch lists archive/constants.pkl\0xyz as constants.pkl: TorchScript to torch.load
        extra = [(f"{prefix}/constants.pkl\0xyz".encode(), b"\x80\x02).", 0)]
        path = _write(tmp_path, zip_raw(raw + extra))
    else:  # a top folder of 600 bytes: torch reads the first name cut short
        folder = "f" * 600
        path = _write(tmp_path, zip_raw([(folder.encode() + n[len(prefix):], d, f) for n, d, f in raw]))
    with pytest.raises(Exception):
        torch_state(path)
    _refused(path, "holds a NUL byte or is 512 bytes or longer")


def test_a_deflated_pickle_larger_than_its_archive_is_refused(tmp_path, parts):
    """Ints deflate about 40x: a 250 KB file would carry an 8 MB pickle, and cost what an 8 MB file does."""
    import pickle as _pickle

    raw, prefix, pkl = parts
    big = _pickle.dumps({"junk": [i % 7 == 0 for i in range(2_000_000)]}, protocol=2)
    path = _write(tmp_path, zip_raw(raw, deflate={f"{prefix}/data.pkl".encode(): (big, 0)}))
    assert path.stat().st_size < 300_000 < len(big)
    t0 = time.process_time()
    _refused(path, "more than the whole archive .* plus 1 MiB; refusing a zip bomb")
    assert time.process_time() - t0 < 2


def _legacy_raw() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def test_a_legacy_storage_whose_count_differs_from_the_pickle_is_refused(tmp_path):
    import struct

    raw = _legacy_raw()
    assert raw[-24:-16] == struct.pack("<q", 4)  # the one storage: its count, then 16 bytes
    path = _write(tmp_path, raw[:-24] + struct.pack("<q", 5) + raw[-16:] + b"\0" * 4)
    with pytest.raises(RuntimeError):
        torch_state(path)
    _refused(path, "holds 5 elements in the file but the pickle declares 4")


def test_a_legacy_storage_key_that_is_not_a_string_is_refused(tmp_path):
    import pickle as _pickle

    raw = _legacy_raw()
    i = raw.rindex(b"\x80\x02]q\x00X")
    j = raw.index(b"a.", i) + 2
    key = _pickle.loads(raw[i:j])[0]
    path = _write(tmp_path, raw[:i] + _pickle.dumps([int(key)], protocol=2) + raw[j:])
    with pytest.raises(Exception):
        torch_state(path)
    _refused(path, "storage key list does not match")


def test_a_declared_name_the_data_does_not_hold_is_refused(tmp_path):
    path = _reparented(tmp_path, b'__parameters__ = ["weight", "bias", ]\n  __buffers__ = []',
                       b'__parameters__ = ["weight", "bias", ]\n  __buffers__ = ["ghost", ]\n  ghost : Tensor')
    _refused(path, "declares 'ghost', which its data does not hold")


def test_a_torchscript_archive_whose_constants_are_not_a_pickle_is_refused(tmp_path):
    src = tmp_path / "parent.pt"
    torch.jit.save(torch.jit.script(_Parent()), str(src))
    entries = [(n, b"garbage" if n.endswith("/constants.pkl") else d) for n, d in zip_entries(src.read_bytes())]
    path = _write(tmp_path, zip_raw([(n.encode(), d, 0) for n, d in entries]), "garbage.pt")
    with pytest.raises(Exception):
        torch_state(path, "jit")
    _refused(path, "constants.pkl is not a pickle")
