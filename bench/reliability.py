"""Fuzz surgery's parsers and throw hostile inputs at it; write docs/RELIABILITY.md from one run.

Every input must end in success or a ``SurgeryError``: any other exception is "crashed", a worker
that dies (segfault, killed for memory) is "crashed", one that stops making progress for
``--stall`` seconds (10) is "hung"; a remap that fails yet leaves something at DST, an output that
does not open, or a pre-existing file changed by a refused or successful command is "partial";
an input after which the marker file its payload would create exists is "marker".

    .venv/bin/python bench/reliability.py                    # >= 100,000 inputs
    .venv/bin/python bench/reliability.py --inputs 2000      # smoke run

Classes, each a generator of inputs (see CLASSES):
  safetensors   whole .safetensors files: header length, JSON header, data section (mutated)
  torch-zip     whole torch.save zip files: local/central headers, size fields, entries (mutated)
  data.pkl      the pickle inside a torch zip, re-zipped with a valid CRC (mutated)
  torch-legacy  whole legacy (torch < 1.6) pickle-stream files (mutated)
  shard-index   model.safetensors.index.json beside real shards (mutated, plus ../x, /abs)
  rules         rules files, YAML and JSON (mutated)
  big-ints      huge or negative integers in safetensors shapes/offsets/header length and in
                pickled tensor records (size, stride, offset, storage numel)
  memo          pickles whose memo makes a DAG that expands to 2**depth nodes when walked
  build         BUILD applied to tensor records, allowed functions and containers
  codecs        _codecs.encode with encodings other than latin1 (zlib, rot13, hex, ...)
  dup-zip       torch zips with duplicate entries (data.pkl, storages, byteorder)
  symlink-shard shard folders whose shards or index are symlinks out (files, FIFO, /dev/zero, loops)
  destination   remap/adapt to hostile destinations: SRC itself, a folder holding SRC, inside SRC,
                FIFO, device, socket, symlinks, folders with foreign files (with and without --force)
  manifest      adapted folders whose manifest names code (os:system, subprocess:run, a file
                factory, timm loaders) or absurd sizes, loaded without trust_code

The tests (tests/test_hardening_fuzz.py) import the same seeds, mutators and checker, and drive
them with hypothesis.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import stat
import time
import warnings
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PARSERS = ("safetensors", "torch-zip", "data.pkl", "torch-legacy", "shard-index", "rules")
HOSTILE = ("big-ints", "memo", "build", "codecs", "dup-zip", "symlink-shard", "destination", "manifest")
CLASSES = PARSERS + HOSTILE
OUTCOMES = ("ok", "refused", "crashed", "hung", "partial", "marker")
RSS_GOAL_MB = 500
MUTATIONS = ("flip", "byte", "int", "truncate", "insert", "delete", "dup", "field", "splice")
MATERIALIZE_LIMIT = 1 << 20  # state_dict() only for files this small: it imports torch and reads every byte

INTERESTING = (0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
               2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1)

# Pickle fragments an attacker would splice in: code execution, deep nesting, memo bombs, huge
# declared lengths. Each is a complete sub-expression that leaves one object on the stack.
PICKLE_FRAGMENTS = (
    b"cos\nsystem\n(S'touch /tmp/surgery-pwned'\ntR",
    b"cposix\nsystem\n(S'id'\ntR",
    b"cbuiltins\neval\n(S'1+1'\ntR",
    b"csubprocess\nPopen\n(S'id'\ntR",
    b"c__builtin__\nexec\n(S'x=1'\ntR",
    b"\x8c\x02os\x8c\x06system\x93\x8c\x02id\x85R",
    b"(" * 200 + b"t" * 200,
    b")" + b"\x85" * 5000,
    b"]" + b"\x85" * 3000,
    b"K\x01\x85\x94" + b"h\x00h\x00\x86\x94" * 50,
    b"B\xff\xff\xff\x7f",
    b"\x8e" + (2**62).to_bytes(8, "little"),
    b"\x8b\xff\xff\xff\x7f",
    b"X\xff\xff\xff\xff",
    b"\x8d" + (2**60).to_bytes(8, "little"),
    b"\x96" + (2**61).to_bytes(8, "little"),
    b"L" + b"9" * 6000 + b"L\n",
    b"h\xff",
    b"(\x91",
)
JSON_FRAGMENTS = (
    '"../x.safetensors"', '"/etc/passwd"', '"../../../../etc/shadow"', '""', '"."', '"sub/x.safetensors"',
    '"model.safetensors.index.json"', '"a\\u0000b"', "[" * 5000 + "]" * 5000, "1" + "0" * 5000, "1e999",
    "-1", "null", "true", "{}", "[]", '"\\ud800"', "18446744073709551616",
)
YAML_FRAGMENTS = ("&a [*a]", "!!python/object/apply:os.system ['id']", "[" * 3000, "{1: 2, x: 3}", "? [a]\n: b",
                  "*undefined", "!!binary AAAA", "ops: &x [*x, *x]")


# ------------------------------------------------------------------------------------- seeds

def build_seeds(folder: Path) -> dict[str, list[bytes]]:
    """Real files for every parser (written by torch and surgery), cached under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    cache = folder / "seeds.json"
    if cache.is_file():
        raw = json.loads(cache.read_text())
        return {k: [bytes.fromhex(x) for x in v] for k, v in raw.items()}
    import torch

    from surgery.remapping import remap

    g = torch.Generator().manual_seed(0)
    sd = {"conv.weight": torch.randn(4, 3, 3, 3, generator=g), "bn.weight": torch.ones(4),
          "bn.running_mean": torch.zeros(4), "bn.num_batches_tracked": torch.tensor(3),
          "fc.weight": torch.randn(5, 4, generator=g).half(), "fc.bias": torch.zeros(5, dtype=torch.bfloat16)}
    tied = {"embed.weight": torch.randn(6, 4, generator=g)}
    tied["head.weight"] = tied["embed.weight"]
    tied["view.weight"] = tied["embed.weight"].t()

    def saved(obj, **kw) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf, **kw)
        return buf.getvalue()

    zips = [saved({"module." + k: v for k, v in sd.items()}),
            saved({"state_dict": sd, "epoch": 3, "optimizer": {"state": {0: {"step": torch.tensor(1.0)}},
                                                               "param_groups": [{"lr": 0.1, "params": [0]}]}}),
            saved(tied)]
    legacy = [saved(sd, _use_new_zipfile_serialization=False), saved({"model": tied}, _use_new_zipfile_serialization=False)]
    tmp = folder / "build"
    tmp.mkdir(exist_ok=True)
    (tmp / "a.pt").write_bytes(zips[0])
    (tmp / "t.pt").write_bytes(zips[2])
    remap(tmp / "a.pt", tmp / "a.safetensors", [], force=True)
    remap(tmp / "t.pt", tmp / "t.safetensors", [], force=True)
    safet = [(tmp / "a.safetensors").read_bytes(), (tmp / "t.safetensors").read_bytes()]
    remap(tmp / "a.pt", tmp / "sharded", [], force=True, shard_size=200)
    shards = {p.name: p.read_bytes().hex() for p in sorted((tmp / "sharded").iterdir()) if p.suffix == ".safetensors"}
    index = (tmp / "sharded" / "model.safetensors.index.json").read_bytes()
    pkls = [zipfile.ZipFile(io.BytesIO(z)).read(_pkl_name(z)) for z in zips]
    rules_yaml = (b"select: state_dict\nops:\n  - auto: true\n  - strip_prefix: \"module.\"\n"
                  b"  - rename: [\"^fc\\\\.\", \"head.\"]\n  - rename: \"^conv=>stem\"\n  - drop: \"num_batches_tracked$\"\n"
                  b"  - keep: \"\\\\.(weight|bias|running_mean)$\"\n  - add_prefix: \"net.\"\n  - dtype: bf16\n")
    rules_json = json.dumps({"select": "model", "ops": [{"auto": True}, {"strip-prefix": "module."},
                                                         {"rename": ["^fc\\.", "head."]}, {"drop": "tracked$"},
                                                         {"dtype": "fp16"}]}).encode()
    seeds = {"safetensors": safet, "torch-zip": zips, "data.pkl": pkls, "torch-legacy": legacy,
             "shard-index": [index], "rules": [b"Y" + rules_yaml, b"J" + rules_json]}
    out = {k: [x.hex() for x in v] for k, v in seeds.items()}
    out["_shards"] = [json.dumps(shards).encode().hex()]
    out["_zip_template"] = [zips[0].hex(), zips[1].hex(), zips[2].hex()]
    cache.write_text(json.dumps(out))
    shutil.rmtree(tmp, ignore_errors=True)
    return build_seeds(folder)


def _pkl_name(z: bytes) -> str:
    return next(n for n in zipfile.ZipFile(io.BytesIO(z)).namelist() if n.endswith("data.pkl"))


# ----------------------------------------------------------------------------------- mutators

def _positions(data: bytes, parser: str) -> list[tuple[int, int]]:
    """(offset, width) of length/size fields worth corrupting in ``data``."""
    out: list[tuple[int, int]] = []
    if parser == "safetensors":
        out.append((0, 8))
    if parser in ("torch-zip",):
        i = data.find(b"PK")
        while i != -1 and len(out) < 64:
            sig = data[i:i + 4]
            if sig == b"PK\x03\x04":
                out += [(i + 18, 4), (i + 22, 4), (i + 26, 2), (i + 28, 2), (i + 8, 2)]
            elif sig == b"PK\x01\x02":
                out += [(i + 20, 4), (i + 24, 4), (i + 28, 2), (i + 30, 2), (i + 42, 4), (i + 10, 2)]
            elif sig == b"PK\x05\x06":
                out += [(i + 8, 2), (i + 10, 2), (i + 12, 4), (i + 16, 4)]
            i = data.find(b"PK", i + 2)
    if parser in ("data.pkl", "torch-legacy"):
        widths = {b"B": 4, b"X": 4, b"\x8d": 8, b"\x8e": 8, b"\x8a": 1, b"\x8b": 4, b"C": 1, b"\x8c": 1,
                  b"\x95": 8, b"\x96": 8, b"T": 4, b"U": 1, b"r": 4, b"j": 4, b"q": 1, b"h": 1}
        for j, c in enumerate(data):
            w = widths.get(bytes([c]))
            if w and j + 1 + w <= len(data):
                out.append((j + 1, w))
            if len(out) > 256:
                break
    return out


def mutate(data: bytes, parser: str, ops: list[tuple[str, int, bytes]]) -> bytes:
    """Apply mutation ops, each (kind, position seed, payload), deterministically."""
    buf = bytearray(data)
    for kind, pos, payload in ops:
        n = len(buf)
        if kind == "flip" and n:
            p = pos % (n * 8)
            buf[p // 8] ^= 1 << (p % 8)
        elif kind == "byte" and n:
            buf[pos % n] = payload[0] if payload else 0xFF
        elif kind == "int" and n:
            width = (1, 2, 4, 8)[pos % 4]
            value = INTERESTING[(pos >> 2) % len(INTERESTING)] % (1 << (8 * width))
            p = (pos >> 8) % n
            buf[p:p + width] = value.to_bytes(width, "little")
        elif kind == "truncate":
            del buf[pos % (n + 1):]
        elif kind == "insert":
            p = pos % (n + 1)
            buf[p:p] = payload
        elif kind == "delete" and n:
            p = pos % n
            del buf[p:p + 1 + (payload[0] if payload else 0)]
        elif kind == "dup" and n:
            p = pos % n
            chunk = buf[p:p + 1 + (payload[0] if payload else 16) * 4]
            buf[p:p] = chunk
        elif kind == "field":
            fields = _positions(bytes(buf), parser)
            if fields:
                off, width = fields[pos % len(fields)]
                value = INTERESTING[(pos >> 8) % len(INTERESTING)] % (1 << (8 * width))
                if (pos >> 16) % 3 == 0:
                    value = (int.from_bytes(buf[off:off + width], "little") + (pos >> 20) % 64 - 32) % (1 << (8 * width))
                buf[off:off + width] = value.to_bytes(width, "little")
            elif parser in ("shard-index", "rules"):
                text = bytes(buf)
                quotes = [i for i, c in enumerate(text) if c == 0x22]
                frags = JSON_FRAGMENTS if parser == "shard-index" else JSON_FRAGMENTS + YAML_FRAGMENTS
                frag = frags[pos % len(frags)].encode()
                if len(quotes) >= 2:
                    k = (pos >> 8) % (len(quotes) - 1)
                    buf[quotes[k]:quotes[k + 1] + 1] = frag
                else:
                    buf[pos % (n + 1):pos % (n + 1)] = frag
        elif kind == "splice":
            if parser in ("data.pkl", "torch-legacy"):
                frag = PICKLE_FRAGMENTS[pos % len(PICKLE_FRAGMENTS)]
            elif parser in ("shard-index", "rules"):
                frag = (JSON_FRAGMENTS + YAML_FRAGMENTS)[pos % (len(JSON_FRAGMENTS) + len(YAML_FRAGMENTS))].encode()
            else:
                frag = payload or b"\xff" * 8
            p = (pos >> 8) % (n + 1)
            buf[p:p] = frag
    return bytes(buf)


def random_ops(rng: random.Random, parser: str) -> list[tuple[str, int, bytes]]:
    k = rng.choice((1, 1, 1, 2, 3, 5))
    return [(rng.choice(MUTATIONS), rng.getrandbits(40), rng.randbytes(rng.choice((0, 1, 4, 16)))) for _ in range(k)]


# ------------------------------------------------------------------------------------ checker

class Env:
    """Scratch files one worker reuses: the shards beside the index, a zip template for data.pkl."""

    def __init__(self, workdir: Path, seeds: dict[str, list[bytes]]):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard_dir = self.dir / "shards"
        self.shard_dir.mkdir(exist_ok=True)
        for name, hexdata in json.loads(seeds["_shards"][0]).items():
            (self.shard_dir / name).write_bytes(bytes.fromhex(hexdata))
        (self.shard_dir / "legacy.pt").write_bytes(seeds["torch-legacy"][0])
        (self.dir / "x.safetensors").write_bytes(seeds["safetensors"][0])  # outside the index's folder
        self.templates = seeds["_zip_template"]
        self.seed_safetensors = seeds["safetensors"][0]
        self.seed_index = seeds["shard-index"][0]
        self.out = self.dir / "out"
        self.out.mkdir(exist_ok=True)
        self.marker = self.dir / "MARKER"  # what every code-running payload would create

    def fresh(self, name: str) -> Path:
        """An empty scratch folder (emptied for each input)."""
        p = self.dir / name
        if p.exists():
            shutil.rmtree(p)
        p.mkdir()
        return p

    @functools.cached_property
    def fifo(self) -> Path:
        p = self.dir / "fifo"
        if not p.exists():
            os.mkfifo(p)
        return p

    @functools.cached_property
    def tiny_arch(self) -> str:
        """A file factory of a tiny CNN, and (tiny_ckpt) a checkpoint of it."""
        path = self.dir / "tiny.py"
        path.write_text(TINY_FACTORY)
        return f"{path}:tiny"

    @functools.cached_property
    def tiny_ckpt(self) -> Path:
        import importlib.util

        import torch
        from safetensors.torch import save_file

        spec = importlib.util.spec_from_file_location("reliability_tiny", self.tiny_arch.rsplit(":", 1)[0])
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        torch.manual_seed(0)
        save_file(mod.tiny(5).state_dict(), str(self.dir / "tiny.safetensors"))
        return self.dir / "tiny.safetensors"

    @functools.cached_property
    def adapted(self) -> Path:
        """A real adapted folder (torchvision mobilenet_v3_small, 3 classes) that manifest inputs rewrite."""
        import torch
        import torchvision

        import surgery

        out = self.dir / "adapted"
        if not (out / "manifest.json").is_file():
            torch.manual_seed(0)
            sd = torchvision.models.mobilenet_v3_small(num_classes=10).state_dict()
            surgery.adapt(sd, arch="mobilenet_v3_small", num_classes=3, out=out, force=True)
        return out

    @functools.cached_property
    def evil(self) -> Path:
        p = self.dir / "evil.py"
        p.write_text(f"import pathlib\npathlib.Path({str(self.marker)!r}).write_text('ran')\n"
                     "def tiny(num_classes=3):\n    raise SystemExit(1)\n")
        return p

    def zip_with_pickle(self, pkl: bytes, which: int) -> bytes:
        """The template zip with data.pkl replaced (valid CRC): the unpickler sees the mutation."""
        src = zipfile.ZipFile(io.BytesIO(self.templates[which % len(self.templates)]))
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            for info in src.infolist():
                z.writestr(info.filename, pkl if info.filename.endswith("data.pkl") else src.read(info))
        return buf.getvalue()


def materialize_file(parser: str, data: bytes, env: Env, which: int = 0) -> Path:
    """Write ``data`` where its parser expects it; returns what to open."""
    if parser == "data.pkl":
        data = env.zip_with_pickle(data, which)
    if parser == "shard-index":
        p = env.shard_dir / "model.safetensors.index.json"
        p.write_bytes(data)
        return env.shard_dir
    if parser == "rules":
        suffix = ".yaml" if data[:1] == b"Y" else ".json"
        p = env.dir / f"rules{suffix}"
        p.write_bytes(data[1:])
        return p
    p = env.dir / {"safetensors": "in.safetensors", "torch-legacy": "in.pt"}.get(parser, "in.pt")
    p.write_bytes(data)
    return p


KEYS = ["module.conv.weight", "module.bn.weight", "module.bn.num_batches_tracked", "module.fc.weight", "module.fc.bias"]


def check(parser: str, data: bytes, env: Env, which: int = 0, deep: bool = True, do_remap: bool = False) -> tuple[str, str]:
    """Run one input through the public API. Returns (outcome, detail): outcome is 'ok',
    'refused' (a SurgeryError), 'crashed' (anything else) or 'partial' (remap left a bad DST)."""
    import surgery
    from surgery.errors import SurgeryError
    from surgery.remapping import Rules, plan_names

    path = materialize_file(parser, data, env, which)
    try:
        if parser == "rules":
            rules = Rules.from_file(path)
            plan_names(KEYS, rules.ops)
            return "ok", ""
        ckpt = surgery.open(path)
        if deep and sum(os.path.getsize(f) for f in ckpt.files) <= MATERIALIZE_LIMIT:
            ckpt.state_dict()
    except SurgeryError as e:
        if "\n" in e.one_line() or not str(e).strip():
            return "crashed", f"SurgeryError with an empty or multi-line message: {e!r}"
        return "refused", ""
    except Exception as e:  # noqa: BLE001 - the whole point: anything else is a bug
        return "crashed", f"{type(e).__name__}: {str(e)[:200]}"
    if do_remap:
        return check_remap(path, env)
    return "ok", ""


def check_remap(path: Path, env: Env) -> tuple[str, str]:
    """remap to safetensors: on error nothing at DST, on success a DST that opens and verifies."""
    import surgery
    from surgery.errors import SurgeryError

    dst = env.out / "o.safetensors"
    if dst.exists():
        dst.unlink()
    try:
        surgery.remap(path, dst, [], verify=True)
    except SurgeryError:
        if dst.exists() or [p for p in os.listdir(env.out) if p.startswith(".")]:
            return "partial", "remap failed but left output behind"
        return "refused", ""
    except Exception as e:  # noqa: BLE001
        return "crashed", f"remap: {type(e).__name__}: {str(e)[:200]}"
    try:
        surgery.open(dst)
    except Exception as e:  # noqa: BLE001
        return "partial", f"remap succeeded but its output does not open: {e}"
    return "ok", ""


# ------------------------------------------------------------------------- hostile generators

BIG = (0, 1, 3, 4, 2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64, 2**64 + 1, 10**30, -1, -2**63)
TINY_FACTORY = '''
from torch import nn


def tiny(num_classes=3):
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))
'''


def _s(text: str) -> bytes:
    b = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(b)) + b


def _i(n: int) -> bytes:
    return b"I%d\n" % n


def _tensor(numel: int = 4, offset: int = 0, size=(4,), stride=(1,), storage: str = "0",
            cls: str = "FloatStorage") -> bytes:
    """A pickled tensor record as torch.save writes it (protocol 2), with any integers."""
    pid = b"(" + _s("storage") + b"ctorch\n" + cls.encode() + b"\n" + _s(storage) + _s("cpu") + _i(numel) + b"tQ"
    tup = lambda xs: b"(" + b"".join(_i(x) for x in xs) + b"t"  # noqa: E731
    return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + _i(offset) + tup(size) + tup(stride) + b"\x89"
            + b"ccollections\nOrderedDict\n)R" + b"tR")


def _sd(entries: list[tuple[str, bytes]]) -> bytes:
    return b"\x80\x02}(" + b"".join(_s(k) + v for k, v in entries) + b"u."


def _open_deep(path: Path, env: "Env", remap: bool) -> tuple[str, str]:
    """surgery.open, inspect, state_dict (small files), and optionally remap: the reader's paths."""
    import surgery
    from surgery.errors import SurgeryError

    try:
        ckpt = surgery.open(path)
        surgery.inspect(path)
        if sum(os.path.getsize(f) for f in ckpt.files) <= MATERIALIZE_LIMIT:
            ckpt.state_dict()
    except SurgeryError as e:
        if "\n" in e.one_line() or not str(e).strip():
            return "crashed", f"SurgeryError with an empty or multi-line message: {e!r}"
        return "refused", ""
    except Exception as e:  # noqa: BLE001 - anything else is a bug
        return "crashed", f"{type(e).__name__}: {str(e)[:200]}"
    return check_remap(path, env) if remap else ("ok", "")


def _pickle_case(env: "Env", pkl: bytes, rng: random.Random) -> tuple[str, str]:
    return _open_deep(materialize_file("data.pkl", pkl, env, 0), env, rng.random() < 0.2)


def gen_big_ints(rng: random.Random, env: "Env") -> tuple[str, str]:
    if rng.random() < 0.5:
        shape = [rng.choice(BIG) for _ in range(rng.randint(1, 4))]
        offs = [rng.choice(BIG + (0, 16)) for _ in range(2)]
        header = {"t": {"dtype": rng.choice(("F32", "F16", "BF16", "I64", "BOOL", "U8")), "shape": shape,
                        "data_offsets": offs}}
        if rng.random() < 0.3:
            header["__metadata__"] = {"n": str(rng.choice(BIG))}
        text = json.dumps(header).encode()
        n = len(text) if rng.random() < 0.6 else rng.choice(BIG) % 2**64
        path = env.dir / "big.safetensors"
        path.write_bytes(struct.pack("<Q", n) + text + b"\0" * 16)
        return _open_deep(path, env, rng.random() < 0.2)
    size = tuple(rng.choice(BIG) for _ in range(rng.randint(1, 3)))
    stride = tuple(rng.choice(BIG) for _ in range(len(size)))
    rec = _tensor(numel=rng.choice(BIG + (108,)), offset=rng.choice(BIG), size=size, stride=stride)
    return _pickle_case(env, _sd([("w", rec)]), rng)


def gen_memo(rng: random.Random, env: "Env") -> tuple[str, str]:
    depth = rng.randint(8, 80)
    leaf = _tensor(108, 0, (108,), (1,)) if rng.random() < 0.5 else _i(1)
    body = leaf + b"q\x00"
    pair = rng.choice((b"h\x00h\x00\x86", b"(h\x00h\x00l", b"(" + _s("a") + b"h\x00" + _s("b") + b"h\x00d"))
    body += (pair + b"q\x00") * depth
    where = rng.random()
    entries = [("w", _tensor(108, 0, (108,), (1,)))]
    entries.append(("extra" if where < 0.5 else "module.bomb", body))
    pkl = _sd(entries) if where < 0.8 else b"\x80\x02" + body + b"."
    return _pickle_case(env, pkl, rng)


def gen_build(rng: random.Random, env: "Env") -> tuple[str, str]:
    targets = (_tensor(108, 0, (108,), (1,)), b"ctorch._utils\n_rebuild_tensor_v2\n", b"ccollections\nOrderedDict\n)R",
               b"ccollections\nOrderedDict\n", b"ctorch\nFloatStorage\n", b"}", b"]")
    marker = str(env.marker)
    states = (b"}", b"N", _i(1), b"}(" + _s("__dict__") + b"}u", b"(}}t", b"(N}(" + _s("x") + _i(1) + b"ut",
              b"}(" + _s("requires_grad") + b"\x88u", b"}(" + _s("__class__") + b"cos\nsystem\nu",
              b"}(" + _s("__setstate__") + b"cbuiltins\nexec\nu",
              b"cos\nsystem\n(" + _s(f"touch {marker}") + b"tR", b"}(" + _s("_backward_hooks") + b"}u")
    val = rng.choice(targets)
    for _ in range(rng.randint(1, 3)):
        val += rng.choice(states) + b"b"
    return _pickle_case(env, _sd([("w", _tensor(108, 0, (108,), (1,))), (rng.choice(("x", "module.y")), val)]), rng)


ENCODINGS = ("latin1", "latin-1", "utf-8", "utf-16", "rot13", "hex", "hex_codec", "base64", "zlib", "zlib_codec",
             "bz2", "uu", "quopri", "punycode", "idna", "unicode_escape", "raw_unicode_escape", "undefined", "mbcs",
             "ascii", "cp1252", "x" * 300, "")


def gen_codecs(rng: random.Random, env: "Env") -> tuple[str, str]:
    text = rng.choice(("abc", "\u00ff" * 1000, "A" * 100_000, "\ud800", "x\x00y"))
    fn = rng.choice((b"c_codecs\nencode\n", b"c_codecs\nencode\n", b"c_codecs\ndecode\n", b"ccodecs\nencode\n"))
    call = fn + b"(" + _s(text) + _s(rng.choice(ENCODINGS)) + b"tR"
    if rng.random() < 0.3:  # nested: encode the encoded
        call = fn + b"(" + call + _s(rng.choice(ENCODINGS)) + b"tR"
    return _pickle_case(env, _sd([("w", _tensor(108, 0, (108,), (1,))), ("x", call)]), rng)


def gen_dup_zip(rng: random.Random, env: "Env") -> tuple[str, str]:
    src = zipfile.ZipFile(io.BytesIO(env.templates[0]))
    entries = [(i.filename, src.read(i)) for i in src.infolist()]
    names = [n for n, _ in entries]
    pick = rng.choice([n for n in names if n.endswith(("data.pkl", "byteorder", "/0", "/1", "version"))])
    data = dict(entries)[pick]
    other = {"data.pkl": _sd([("evil", _tensor(2**40, 0, (2**20, 2**20), (2**20, 1)))]),
             "byteorder": b"big"}.get(pick.rsplit("/", 1)[-1], data[: len(data) // 2])
    dup = (pick, other)
    pos = names.index(pick) + (1 if rng.random() < 0.5 else 0)
    entries.insert(pos if rng.random() < 0.7 else len(entries), dup)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            for n, d in entries:
                z.writestr(n, d)
    path = env.dir / "dup.pt"
    path.write_bytes(buf.getvalue())
    return _open_deep(path, env, rng.random() < 0.3)


def gen_symlink_shard(rng: random.Random, env: "Env") -> tuple[str, str]:
    folder = env.fresh("sym")
    for p in env.shard_dir.glob("model-*"):
        shutil.copy(p, folder / p.name)
    (folder / "model.safetensors.index.json").write_bytes(env.seed_index)
    targets = [env.dir / "x.safetensors", Path("/etc/passwd"), Path("/dev/zero"), env.fifo, env.dir, folder / "loop",
               env.dir / "missing", Path("../shards") / "model-00001-of-00003.safetensors", Path("/proc/self/environ")]
    names = sorted(p.name for p in folder.iterdir())
    victim = folder / rng.choice(names)
    victim.unlink()
    target = rng.choice(targets)
    os.symlink(target if target != folder / "loop" else victim, victim)
    return _open_deep(folder, env, rng.random() < 0.5)


def gen_destination(rng: random.Random, env: "Env") -> tuple[str, str]:
    import surgery
    from surgery.errors import SurgeryError

    root = env.fresh("dst")
    src = root / "src.safetensors"
    src.write_bytes(env.seed_safetensors)
    folder_src = root / "hf"
    shutil.copytree(env.shard_dir, folder_src, ignore=shutil.ignore_patterns("legacy.pt", "*.index.json"))
    (folder_src / "model.safetensors.index.json").write_bytes(env.seed_index)
    (folder_src / "config.json").write_text("{}")
    (root / "notes.txt").write_text("mine")
    (root / "foreign").mkdir()
    (root / "foreign" / "manifest.json").write_text("{}")
    (root / "foreign" / "README").write_text("mine")
    os.mkfifo(root / "fifo")
    with contextlib.suppress(OSError):
        os.mknod(root / "dev", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.symlink(src, root / "link-src.safetensors")
    os.symlink(root / "fifo", root / "link-fifo.safetensors")
    os.symlink(root / "missing", root / "dangling.safetensors")
    use_folder = rng.random() < 0.4
    s = folder_src if use_folder else src
    dst = rng.choice([s, root, folder_src / "x.safetensors", folder_src / "sub", root / "fifo", root / "dev",
                      root / "link-src.safetensors", root / "link-fifo.safetensors", root / "foreign",
                      root / "dangling.safetensors", root / "notes.txt", root / "new.safetensors", root / "new"])
    force, in_place = rng.random() < 0.7, rng.random() < 0.3
    before = _snapshot(root)
    adapt = rng.random() < 0.25
    try:
        if adapt:
            surgery.adapt(env.tiny_ckpt, arch=env.tiny_arch, num_classes=3, out=dst, force=force)
        else:
            surgery.remap(s, dst, [], force=force, in_place=in_place)
    except SurgeryError:
        changed = _changed(before, _snapshot(root), ignore=None)
        return ("partial", f"refused but changed {changed[:3]}") if changed else ("refused", "")
    except Exception as e:  # noqa: BLE001
        return "crashed", f"{type(e).__name__}: {str(e)[:200]}"
    rel = os.path.relpath(dst, root)
    rewrote = (not adapt) and in_place and os.path.realpath(dst) == os.path.realpath(s)
    changed = _changed(before, _snapshot(root), ignore=rel, keep_foreign=rewrote)
    if changed:
        return "partial", f"{'adapt' if adapt else 'remap'} to {rel} changed {changed[:3]}"
    try:
        surgery.read_manifest(dst) if adapt else surgery.open(dst)
    except Exception as e:  # noqa: BLE001
        return "partial", f"output {rel} does not open: {e}"
    return "ok", ""


def _snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            body = (hashlib.sha256(open(p, "rb").read()).hexdigest() if stat.S_ISREG(kind)
                    else os.readlink(p) if stat.S_ISLNK(kind) else None)
            out[os.path.relpath(p, root)] = (kind, body)
    return out


def _changed(before: dict, after: dict, ignore: str | None, keep_foreign: bool = False) -> list[str]:
    """Entries that existed before and differ now, except the destination itself (or, for an
    in-place rewrite of a folder, its index and shards: the rest must survive)."""
    out = []
    for k, v in before.items():
        if k == ignore:
            continue
        inside = ignore is not None and k.startswith(ignore + os.sep)
        if inside and not (keep_foreign and not os.path.basename(k).startswith("model")):
            continue
        if after.get(k) != v:
            out.append(k)
    return out


HOSTILE_ARCH = (
    ("module", "os:system", {"command": "touch {marker}"}),
    ("module", "subprocess:run", {"args": "touch {marker}", "shell": True}),
    ("module", "posix:system", {"command": "touch {marker}"}),
    ("module", "builtins:exec", {"source": "open({marker!r}, 'w')"}),
    ("file", "{evil}:tiny", {}),
    ("timm", "resnet18", {"checkpoint_path": "{evil}"}),
    ("timm", "hf-hub:attacker/model", {}),
    ("eval", "print", {}),
    ("torchvision", "resnet18", {"num_classes": 2**40}),
    ("torchvision", "squeezenet1_1", {"weights": "DEFAULT"}),
    ("torchvision", "no_such_model", {}),
)


def gen_manifest(rng: random.Random, env: "Env") -> tuple[str, str]:
    import surgery
    from surgery.errors import SurgeryError

    folder = env.fresh("m")
    for name in ("model.safetensors", "load_report.json"):
        os.link(env.adapted / name, folder / name)
    data = json.loads((env.adapted / "manifest.json").read_text())
    kind, name, kwargs = rng.choice(HOSTILE_ARCH)
    fill = lambda v: v.format(marker=str(env.marker), evil=str(env.evil)) if isinstance(v, str) else v  # noqa: E731
    data["arch"] = {"kind": kind, "name": fill(name), "kwargs": {k: fill(v) for k, v in kwargs.items()}}
    if kind == "file" and rng.random() < 0.7:
        data["arch"]["sha256"] = hashlib.sha256(env.evil.read_bytes()).hexdigest()
    if rng.random() < 0.3:
        data["num_classes"] = rng.choice(BIG)
    (folder / "manifest.json").write_text(json.dumps(data))
    try:
        surgery.load_adapted(folder)
    except SurgeryError as e:
        return ("crashed", f"multi-line error {e!r}") if "\n" in e.one_line() else ("refused", "")
    except Exception as e:  # noqa: BLE001
        return "crashed", f"{type(e).__name__}: {str(e)[:200]}"
    return "ok", ""


GENERATORS = {"big-ints": gen_big_ints, "memo": gen_memo, "build": gen_build, "codecs": gen_codecs,
              "dup-zip": gen_dup_zip, "symlink-shard": gen_symlink_shard, "destination": gen_destination,
              "manifest": gen_manifest}


# ------------------------------------------------------------------------------------- worker

def worker(cls: str, seed: int, start: int, count: int, workdir: Path) -> None:
    """Inputs start..start+count-1 of (class, seed); prints '#i' before each, a line per problem."""
    seeds = build_seeds(workdir.parent / "seeds")
    env = Env(workdir, seeds)
    import torch  # noqa: F401 - paid once here, not counted against the first input's stall

    import surgery  # noqa: F401
    if cls == "manifest":
        env.adapted, env.evil
    elif cls == "destination":
        env.tiny_ckpt
    out = sys.stdout
    import resource

    out.write(f"base {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\n")  # torch and the scratch files loaded
    for i in range(start, start + count):
        rng = random.Random(f"{cls}:{seed}:{i}")
        out.write(f"#{i}\n")
        out.flush()
        ops: list = []
        which = 0
        if cls in GENERATORS:
            outcome, detail = GENERATORS[cls](rng, env)
        else:
            which = rng.randrange(len(seeds[cls]))
            ops = random_ops(rng, cls)
            data = mutate(seeds[cls][which], cls, ops)
            outcome, detail = check(cls, data, env, which, deep=True, do_remap=(i % 20 == 0 and cls != "rules"))
        if env.marker.exists():
            outcome, detail = "marker", f"the payload's marker file exists ({outcome}: {detail})"
            env.marker.unlink()
        out.write(f"={outcome}\n")
        if outcome not in ("ok", "refused"):
            out.write(json.dumps({"i": i, "outcome": outcome, "detail": detail, "ops": [(k, p, b.hex()) for k, p, b in ops],
                                  "which": which}) + "\n")
    out.write(f"rss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\n")
    out.flush()


def run_chunk(parser: str, seed: int, start: int, count: int, workdir: Path, stall_s: float) -> dict:
    """Run a worker over a chunk, restarting past inputs that crash the process or hang it."""
    tally = dict.fromkeys(OUTCOMES, 0)
    problems: list[dict] = []
    rss = base = 0
    i = start
    end = start + count
    while i < end:
        cmd = [sys.executable, __file__, "--worker", parser, str(seed), str(i), str(end - i), str(workdir)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
        state = {"current": None, "rss": 0, "base": 0}
        hung = _follow(proc, stall_s, lambda line: _record(line, state, tally, problems),
                       busy=lambda: state["current"] is not None)
        rss = max(rss, state["rss"])
        base = max(base, state["base"])
        current = state["current"]
        if current is None:
            break  # finished (or died between inputs, which cannot happen: it only exits at the end)
        outcome = "hung" if hung else "crashed"
        tally[outcome] += 1
        problems.append({"i": current, "outcome": outcome, "detail": f"worker exit {proc.returncode}"})
        i = current + 1
    return {"parser": parser, "tally": tally, "problems": problems, "rss_kb": rss, "base_kb": base}


def _follow(proc: subprocess.Popen, stall_s: float, on_line, busy) -> bool:
    """Feed the worker's output lines to ``on_line`` as they come (raw reads: no line waits in a
    buffer the poll cannot see); kill it when ``busy()`` (an input in progress) for ``stall_s``
    seconds without output. Returns whether it was killed as hung."""
    import selectors

    fd = proc.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    pending, last, hung = b"", time.monotonic(), False
    try:
        while True:
            if not sel.select(timeout=1.0):
                if busy() and time.monotonic() - last > stall_s:
                    proc.kill()
                    hung = True
                    break
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            last = time.monotonic()
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                on_line(line.decode())
    finally:
        sel.close()
        proc.wait()
    return hung


def _record(line: str, state: dict, tally: dict, problems: list) -> None:
    if line.startswith("#"):
        state["current"] = int(line[1:])
    elif line.startswith("="):
        tally[line[1:].strip()] += 1
        state["current"] = None
    elif line.startswith(("rss ", "base ")):
        key, value = line.split()
        state[key] = max(state[key], int(value))
    elif line.startswith("{"):
        problems.append(json.loads(line))


# ---------------------------------------------------------------------------------- the report

def hostile_pickles(workdir: Path) -> list[tuple[str, str]]:
    """The named hostile inputs of the issue, each with its outcome (in this process)."""
    from surgery.errors import SurgeryError
    import surgery

    seeds = build_seeds(workdir / "seeds")
    env = Env(workdir / "hostile", seeds)
    marker = workdir / "hostile" / "pwned"
    cmd = f"touch {marker}".encode()
    payloads = {
        "GLOBAL os.system": b"\x80\x02cos\nsystem\nq\x00X" + struct.pack("<I", len(cmd)) + cmd + b"\x85R.",
        "GLOBAL posix.system": b"\x80\x02cposix\nsystem\nX" + struct.pack("<I", len(cmd)) + cmd + b"\x85R.",
        "builtins.eval": b"\x80\x02cbuiltins\neval\nX" + struct.pack("<I", 40) + b"__import__('os').system('touch /tmp/x')\x85R.",
        "subprocess.Popen": b"\x80\x02csubprocess\nPopen\n]X\x05\x00\x00\x00touch\x85R.",
        "STACK_GLOBAL os.system": b"\x80\x04\x8c\x02os\x8c\x06system\x93X" + struct.pack("<I", len(cmd)) + cmd + b"\x85R.",
        "deep nesting (100k tuples)": b"\x80\x02}" + b")" + b"\x85" * 100_000 + b"K\x01s.",
        "memo bomb (2**60 expansion)": b"\x80\x02}K\x01\x85q\x00" + b"h\x00h\x00\x86q\x00" * 60 + b"K\x01s.",
        "BINBYTES8 declaring 2**62 bytes": b"\x80\x04\x8e" + (2**62).to_bytes(8, "little") + b"ab.",
        "LONG4 declaring 2**31-1 bytes": b"\x80\x02\x8b\xff\xff\xff\x7f\x00.",
        "BINUNICODE declaring 4 GiB": b"\x80\x02X\xff\xff\xff\xffab.",
    }
    out = []
    for name, pkl in payloads.items():
        outcome, detail = check("data.pkl", pkl, env)
        out.append((name, outcome + (" (SIDE EFFECT: marker created)" if marker.exists() else "")))
    return out


def render(results: list[dict], args, elapsed: float, hostile: list[tuple[str, str]]) -> str:
    by_class: dict[str, dict] = {}
    for r in results:
        d = by_class.setdefault(r["parser"], {"tally": dict.fromkeys(OUTCOMES, 0), "problems": [], "rss_kb": 0,
                                              "base_kb": 0})
        for k, v in r["tally"].items():
            d["tally"][k] = d["tally"].get(k, 0) + v
        d["problems"] += r["problems"]
        d["rss_kb"] = max(d["rss_kb"], r["rss_kb"])
        d["base_kb"] = max(d["base_kb"], r.get("base_kb", 0))
    total = sum(sum(d["tally"].values()) for d in by_class.values())
    classes = " ".join(f"--classes {c}" for c in args.classes) if args.classes != list(CLASSES) else ""
    lines = [
        "# Reliability: fuzzed and hostile inputs",
        "",
        "Generated by `bench/reliability.py` from one run; do not edit by hand. Reproduce with:",
        "",
        "```",
        f".venv/bin/python bench/reliability.py --inputs {args.inputs} --seed {args.seed} --jobs {args.jobs} "
        f"--stall {args.stall:g} {classes}".rstrip(),
        "```",
        "",
        f"{total:,} inputs in {elapsed / 60:.1f} min on {os.cpu_count()} CPUs ({args.jobs} worker processes), "
        f"python {sys.version.split()[0]}.",
        "",
        "The first six classes are real files (written by torch.save or by surgery) with one to five mutations "
        "(" + ", ".join(MUTATIONS) + "), opened through the public API: `surgery.open(path)` then "
        "`Checkpoint.state_dict()` for files under 1 MB, and every 20th input also through "
        "`surgery.remap(path, dst, verify=True)`; rules files through `Rules.from_file` and a plan over real key "
        "names. The other classes are generated attacks (see the docstring of `bench/reliability.py`): reader "
        "inputs go through `surgery.open`, `surgery.inspect`, `state_dict()` and some through `remap`; "
        "`destination` runs `surgery.remap`/`surgery.adapt` against a folder of pre-existing files and compares "
        "every one of them before and after; `manifest` runs `surgery.load_adapted` without `trust_code`.",
        "",
        f"Outcomes: **ok**, **refused** (a one-line `SurgeryError`), **crashed** (any other exception, or the "
        f"worker died), **hung** (no progress for {args.stall:g} s), **partial** (an output left after a failure, "
        f"an output that does not open, or a pre-existing file changed), **marker** (the file a payload would "
        f"create exists afterwards: code ran). Peak RSS: the largest resident size of one worker process over "
        f"its chunk of inputs (goal: under {RSS_GOAL_MB} MB); before inputs: its resident size once torch, "
        f"surgery and the class's scratch files (the adapted folder for `manifest`) are loaded, so the "
        f"difference is what the inputs cost.",
        "",
        "| class | inputs | ok | refused | crashed | hung | partial | marker | peak RSS of a worker | before inputs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in CLASSES:
        if c not in by_class:
            continue
        t, rss, base = by_class[c]["tally"], by_class[c]["rss_kb"] / 1024, by_class[c]["base_kb"] / 1024
        lines.append(f"| {c} | {sum(t.values()):,} | {t['ok']:,} | {t['refused']:,} | {t['crashed']} | {t['hung']} | "
                     f"{t['partial']} | {t['marker']} | {rss:.0f} MB{'' if rss < RSS_GOAL_MB else ' (over the goal)'} | "
                     f"{base:.0f} MB |")
    problems = [(c, x) for c, d in by_class.items() for x in d["problems"]]
    lines.append("")
    if problems:
        lines += [f"## Problems found ({len(problems)}; the first 60)", ""]
        for c, x in problems[:60]:
            lines.append(f"- {c} input {x['i']}: {x['outcome']}: {x.get('detail', '')}")
        lines.append("")
    else:
        lines += ["No input crashed, hung, left partial output or ran code.", ""]
    lines += ["## Named hostile pickles (data.pkl of a torch zip)", "",
              "Each must be refused with nothing executed (the marker file it would create must not exist) "
              "and without allocating what its length fields claim.", "",
              "| payload | outcome |", "|---|---|"]
    lines += [f"| {n} | {o} |" for n, o in hostile]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=126_000, help="inputs in total, split evenly across classes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("--chunk", type=int, default=2500, help="inputs per worker process")
    ap.add_argument("--stall", type=float, default=10.0, help="seconds without progress that count as a hang")
    ap.add_argument("--classes", action="append", choices=CLASSES, help="only these classes (repeat; default all)")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "reliability")
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "RELIABILITY.md")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.classes = args.classes or list(CLASSES)
    if args.worker:
        parser, seed, start, count, workdir = args.worker
        worker(parser, int(seed), int(start), int(count), Path(workdir))
        return
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.monotonic()
    build_seeds(args.workdir / "seeds")
    per = args.inputs // len(args.classes)
    jobs = []
    for p in args.classes:
        for k, s in enumerate(range(0, per, args.chunk)):
            jobs.append((p, args.seed, s, min(args.chunk, per - s), args.workdir / f"w-{p}-{k}"))
    results = []
    with ThreadPoolExecutor(args.jobs) as pool:
        futs = [pool.submit(run_chunk, *j, args.stall) for j in jobs]
        for n, f in enumerate(futs, 1):
            r = f.result()
            results.append(r)
            print(f"[{n}/{len(jobs)}] {r['parser']}: {r['tally']}", flush=True)
    elapsed = time.monotonic() - t0
    hostile = hostile_pickles(args.workdir)
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(render(results, args, elapsed, hostile) + "\n")
    (args.workdir / "results.json").write_text(json.dumps(results, indent=1))
    for j in jobs:
        shutil.rmtree(j[4], ignore_errors=True)
    print(f"wrote {args.doc} ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
