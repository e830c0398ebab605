"""Fuzz surgery's parsers and throw hostile inputs at it; write docs/RELIABILITY.md from one run.

Every input must end in success or a ``SurgeryError``: any other exception is "crashed", a worker
that dies (segfault, killed for memory) is "crashed", one that makes no progress for ``--stall``
seconds (10; time spent waiting for a CPU left out) is "hung", killed and counted, and a new worker
goes on with the next input; a remap that fails yet leaves something at DST, an output that does
not open, or a pre-existing file changed by a refused or successful command is "partial"; an
input after which the marker file its payload would create exists is "marker". Memory: per class,
the RSS before inputs (anonymous and file pages), the peak RSS, the peak RssAnon (sampled every
5 ms by the harness and after each input by the worker) and the largest rise of one input (the
kernel's VmHWM, reset after each input); the goal is held against anonymous memory.

    .venv/bin/python bench/reliability.py --inputs 100000 --seed 0 --jobs 2 --stall 10
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
  dcp-chunks    DCP folders of ranks' chunks whose .metadata lies: a chunk moved, resized, dropped
                or repeated, a global size or a storage entry changed, or the pickle's bytes mutated
  zero-parts    DeepSpeed ZeRO-2/3 folders whose records, partitions, rank files or `latest` lie
  rank-files    per-rank files of DTensors deleted, duplicated, renamed, linked or mutated
                (these two: bench/reliability_ranks.py; a folder that lost data must be refused)
  which-pkl     torch zips with a decoy *data.pkl listed first, a DATA.PKL case variant, one raw
                name twice with and without the UTF-8 flag, entries outside the archive's folder,
                a stray CONSTANTS.PKL or code/ entry (torch.load still reads them as torch.save files)
  central-dir   torch zips with two central directories (offset of one, size of the other), a
                wrong entry count, an end record after the declared comment
  tar-polyglot  legacy torch files whose first 512 bytes are (or nearly are) a valid tar header
  dup-shard     shard folders where a later (or earlier) shard stores a tensor mapped elsewhere,
                .bin shards whose top level is not a flat tensor dict
  jit-decl      TorchScript archives declaring __parameters__/__buffers__ twice in one class, or
                a name written other than as a plain quoted name (u"", r"", escapes)
  inflate       a deflated data.pkl: honest, with junk after its stream, or a MEMOIZE bomb padded
                so that its declared compressed size passes the ratio
  records       torch zips whose version (.data/version) or byteorder record is missing, or holds
                what torch accepts (" 3", "3abc") or refuses ("abc", "11", " little\n")
  The last seven are checked against the real loader (torch.load(weights_only=True), torch.jit.load,
  tarfile's tar-first test, transformers' shard order): reading other tensors is "differential".

The tests (tests/hardening/test_fuzz.py) import the same seeds, mutators and checker, and drive
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
import zlib
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import reliability_ranks  # noqa: E402 - once the checkout is importable

PARSERS = ("safetensors", "torch-zip", "data.pkl", "torch-legacy", "shard-index", "rules")
HOSTILE = ("big-ints", "memo", "build", "codecs", "dup-zip", "symlink-shard", "destination", "manifest", "dcp-chunks",
           "zero-parts", "rank-files")
# files where two readers could disagree: each must be refused or read exactly as torch's own reader reads it
DIFFERENTIAL = ("which-pkl", "central-dir", "tar-polyglot", "dup-shard", "jit-decl", "inflate", "records")
CLASSES = PARSERS + HOSTILE + DIFFERENTIAL
OUTCOMES = ("ok", "refused", "crashed", "hung", "partial", "marker", "differential")
RSS_GOAL_MB = 500
# what one input may cost (issue: every input under 1 MB at most 2 s and 300 MB): the CPU of the
# dearest input and the largest one-input rise of resident memory, per class
INPUT_CPU_GOAL_S = 2.0
INPUT_RISE_GOAL_MB = 300
# Seed files are kept between runs: legacy torch.save names storages by their address, so seeds
# built afresh differ from run to run, and so would the torch-legacy inputs made from them.
SEEDS = REPO / "bench" / "out" / "reliability-seeds"
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
    def dcp_seed(self) -> Path:
        """A DCP folder of 3 ranks' chunks (Shard(0) with uneven rows, Shard(1), a 2 x 2 grid, a
        replicated buffer, a scalar), as torch's FileSystemWriter lays them out."""
        import torch

        from fixtures.distributed import grid_boxes, shard_boxes, write_chunked_dcp

        g = torch.Generator().manual_seed(0)
        tensors = {"a.weight": torch.randn(7, 4, generator=g), "b.weight": torch.randn(4, 6, generator=g).half(),
                   "c.weight": torch.randn(4, 4, generator=g), "c.bias": torch.randn(3, generator=g),
                   "n": torch.tensor(3)}
        boxes = {"a.weight": shard_boxes((7, 4), 3), "b.weight": shard_boxes((4, 6), 3, dim=1),
                 "c.weight": grid_boxes((4, 4), (2, 2)), "c.bias": shard_boxes((3,), 3)}
        return write_chunked_dcp(self.dir / "dcp_seed", tensors, boxes, ranks=3, nested="model")

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

    try:
        ckpt = surgery.open(path)
        surgery.inspect(path)
        if sum(os.path.getsize(f) for f in ckpt.files) <= MATERIALIZE_LIMIT:
            ckpt.state_dict()
    except Exception as e:  # noqa: BLE001 - a refusal, or a bug
        return outcome_of(e)
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


# ---------------------------------------------------------------- reader differentials (torch's rules)
#
# Files two readers could read differently: each must be refused, or read exactly as torch's own
# reader reads it (torch.load(weights_only=True), torch.jit.load(...).state_dict(), tarfile for the
# tar-first order, transformers' shard-by-shard loading where a later shard's copy wins).

_LOCAL_HDR = struct.Struct("<4s5H3L2H")
_CENTRAL_HDR = struct.Struct("<4s6H3L5H2L")
_END = struct.Struct("<4s4H2LH")


def zip_raw(entries: list[tuple[bytes, bytes, int]], *, count: int | None = None, comment: bytes = b"",
            second: list[tuple[bytes, bytes, int]] | None = None,
            deflate: dict[bytes, tuple[bytes, int]] | None = None) -> bytes:
    """A stored zip of (raw name, data, flags) entries written by hand: names may repeat, differ in
    case or carry the UTF-8 flag (bit 11); ``count`` overrides the end record's entry count. With
    ``second``, those entries get their own central directory after the first, and the end record
    gives the first one's offset with the second one's size: zipfile reads the second (before the
    end record), torch's miniz the first (at the offset). ``deflate`` maps a name to the bytes it
    holds deflated, and how many junk bytes follow its deflate stream inside the entry."""
    out, dirs = bytearray(), []
    for group in ([entries] + ([second] if second else [])):
        cd = bytearray()
        for name, data, flags in group:
            plain, junk = (deflate or {}).get(name, (data, None))
            payload = plain if junk is None else _deflated(plain, junk)
            method, crc, size, csize = (0 if junk is None else 8), zlib.crc32(plain), len(plain), len(payload)
            cd += _CENTRAL_HDR.pack(b"PK\x01\x02", 20, 20, flags, method, 0, 33, crc, csize, size, len(name),
                                    0, 0, 0, 0, 0, len(out)) + name
            out += _LOCAL_HDR.pack(b"PK\x03\x04", 20, flags, method, 0, 33, crc, csize, size, len(name), 0) + name + payload
        dirs.append(cd)
    first_at = len(out)
    for cd in dirs:
        out += cd
    if second:  # zipfile adds (end - size - offset) to every offset of the directory it reads
        shift = len(dirs[0])
        second_cd = bytearray(dirs[1])
        pos = 0
        while pos < len(second_cd):
            (off,) = struct.unpack_from("<L", second_cd, pos + 42)
            struct.pack_into("<L", second_cd, pos + 42, off - shift)
            pos += 46 + struct.unpack_from("<H", second_cd, pos + 28)[0]
        out[first_at + shift:] = second_cd
    n = len(entries) if count is None else count
    out += _END.pack(b"PK\x05\x06", 0, 0, n, n, len(dirs[-1]), first_at, len(comment)) + comment
    return bytes(out)


def zip_entries(data: bytes) -> list[tuple[str, bytes]]:
    z = zipfile.ZipFile(io.BytesIO(data))
    return [(i.filename, z.read(i)) for i in z.infolist()]


def evil_pickle(pkl: bytes) -> bytes:
    """The same pickle with every key renamed (same length): another state dict over the same storages."""
    return pkl.replace(b"module.", b"EVILXX.")


def torch_state(path: Path, kind: str = "load") -> dict:
    """What torch's own reader returns: torch.load(weights_only=True), or torch.jit.load's state_dict."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "jit":
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj


def outcome_of(e: Exception) -> tuple[str, str]:
    """A reader's exception as an outcome: a one-line SurgeryError is a refusal; anything else,
    or a refusal whose message is empty or spans lines, is a crash."""
    from surgery.errors import SurgeryError

    if isinstance(e, SurgeryError):
        if "\n" in e.one_line() or not str(e).strip():
            return "crashed", f"SurgeryError with an empty or multi-line message: {e!r}"
        return "refused", ""
    return "crashed", f"{type(e).__name__}: {str(e)[:200]}"


def hf_shards_state(folder: Path) -> dict:
    """transformers' sharded loading: every shard the index names, in sorted order, each one's whole
    state dict loaded in turn, so a tensor stored in two shards takes the later shard's copy."""
    from safetensors.torch import load_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out: dict = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(folder / shard)))
    return out


def _flat(obj, prefix: str = "") -> dict:
    """name -> tensor of a nested checkpoint object, as surgery's container walk names them."""
    import torch

    if isinstance(obj, torch.Tensor):
        return {prefix.rstrip("."): obj}
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flat(val, f"{prefix}{key}.").items()}
    return {}


def agree(path: Path, env: "Env", reference) -> tuple[str, str]:
    """'refused' when surgery refuses the file, 'ok' when surgery reads what ``reference()`` (the real
    loader) reads, 'differential' when they read different tensors, 'crashed' on any other exception
    in surgery. torch is asked only when surgery reads the file: only then can the two differ."""
    import torch

    import surgery

    try:
        ours = surgery.open(path).state_dict()
    except Exception as e:  # noqa: BLE001 - a refusal, or a bug
        return outcome_of(e)
    try:
        theirs = reference()
    except Exception as e:  # noqa: BLE001 - the loader refusing what surgery reads is a disagreement too
        return "differential", f"surgery reads {len(ours)} tensors, the loader refuses: {type(e).__name__}: {str(e)[:120]}"
    theirs = _flat(theirs) if not all(isinstance(v, torch.Tensor) for v in theirs.values()) else theirs
    if sorted(ours) != sorted(theirs):
        return "differential", f"keys differ: surgery {sorted(ours)[:4]}, loader {sorted(theirs)[:4]}"
    bad = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    return ("differential", f"values differ: {bad[:4]}") if bad else ("ok", "")


def _write(env: "Env", name: str, data: bytes) -> Path:
    path = env.dir / name
    path.write_bytes(data)
    return path


def gen_which_pkl(rng: random.Random, env: "Env") -> tuple[str, str]:
    """Which data.pkl: a decoy listed first, a case variant, the same raw name with the UTF-8 flag,
    an entry outside the archive's folder, a storage named twice by case."""
    entries = zip_entries(env.templates[0])
    prefix = entries[0][0].split("/")[0]
    pkl = next(d for n, d in entries if n.endswith("/data.pkl"))
    raw = [(n.encode(), d, 0) for n, d in entries]
    how = rng.choice(("decoy-first", "case", "utf8-flag", "outside", "storage-case", "top-level", "stray-script", "clean"))
    if how == "decoy-first":
        raw.insert(0 if rng.random() < 0.5 else 1, (f"{prefix}/{rng.choice(('x', 'a', '_'))}data.pkl".encode(), evil_pickle(pkl), 0))
    elif how == "case":
        raw.insert(rng.randrange(len(raw) + 1), (f"{prefix}/{rng.choice(('DATA.PKL', 'Data.pkl', 'data.PKL'))}".encode(), evil_pickle(pkl), 0))
    elif how == "utf8-flag":  # a non-ASCII folder: one copy flagged UTF-8, one not; the bytes are the same
        raw = [("\u00e9".encode() + n[len(prefix):], d, 0x800 if rng.random() < 0.5 else 0) for n, d, _ in raw]
        at = next(i for i, (n, _, _) in enumerate(raw) if n.endswith(b"/data.pkl"))
        n, d, f = raw[at]
        raw.insert(rng.choice((at, at + 1, len(raw))), (n, evil_pickle(d), f ^ 0x800))
    elif how == "outside":
        raw.insert(rng.randrange(len(raw) + 1), (rng.choice((b"other/data.pkl", b"data.pkl", b"x")), evil_pickle(pkl), 0))
    elif how == "storage-case":
        name, data, _ = next(e for e in raw if b"/data/" in e[0])
        raw.append((name.replace(b"/data/", b"/DATA/"), bytes(len(data)), 0))
    elif how == "top-level":
        raw = [(n[len(prefix) + 1:], d, f) for n, d, f in raw]
    elif how == "stray-script":  # names only torch.jit.save writes, but not exactly constants.pkl
        stray = rng.choice(("CONSTANTS.PKL", "Constants.pkl", "code/x.py", "code/__torch__/m.py", "constants.pk"))
        raw.insert(rng.randrange(1, len(raw) + 1), (f"{prefix}/{stray}".encode(), b"\x80\x02).", 0))
    return agree(_write(env, "which.pt", zip_raw(raw)), env, lambda: torch_state(env.dir / "which.pt"))


RECORDS = {"version": (None, b"", b"abc", b"0", b"-1", b"11", b"99", b"1", b" 3", b"3abc", b"+3\n", b"10"),
           ".data/version": (b"0", b"99", b"2"),
           "byteorder": (None, b"little", b"big", b" little\n", b"", b"LITTLE", b"little\n"),
           ".storage_alignment": (None, b"64", b" 64\n", b"abc", b"", b"64.0", b"1_0")}


def gen_records(rng: random.Random, env: "Env") -> tuple[str, str]:
    """The records torch checks before it reads: ``version`` (``.data/version`` first) and
    ``byteorder``, dropped or holding what torch accepts and what it refuses."""
    entries = zip_entries(env.templates[0])
    prefix = entries[0][0].split("/")[0]
    name = rng.choice(sorted(RECORDS))
    value = rng.choice(RECORDS[name])
    full = f"{prefix}/{name}"
    raw = [(n.encode(), value if n == full else d, 0) for n, d in entries if not (n == full and value is None)]
    if value is not None and full not in dict(entries):
        raw.insert(rng.randrange(1, len(raw) + 1), (full.encode(), value, 0))
    path = _write(env, "records.pt", zip_raw(raw))
    return agree(path, env, lambda: torch_state(path))


def gen_central_dir(rng: random.Random, env: "Env") -> tuple[str, str]:
    """Which central directory: two of them (offset of one, size of the other), a record count
    that is not the records' number, a second end record after the first, a zip64 locator that
    points elsewhere."""
    entries = zip_entries(env.templates[0])
    raw = [(n.encode(), d, 0) for n, d in entries]
    how = rng.choice(("two", "count", "second-end", "record", "name", "clean"))
    if how == "two":
        evil = [(n, evil_pickle(d) if n.endswith(b"/data.pkl") else d, f) for n, d, f in raw]
        data = zip_raw(raw, second=evil) if rng.random() < 0.5 else zip_raw(evil, second=raw)
    elif how == "count":
        data = zip_raw(raw, count=len(raw) + rng.choice((-2, -1, 1)))
    elif how == "second-end":  # another end record in the comment, its own comment reaching past the end or not
        fake = zip_raw([(n, evil_pickle(d) if n.endswith(b"/data.pkl") else d, f) for n, d, f in raw])
        data = zip_raw(raw, comment=fake[-22:-2] + struct.pack("<H", rng.choice((0, 1, 9))))
    elif how == "record":  # a field of one record torch's zip reader checks at open, in an entry never read
        at, fmt, value = rng.choice(((34, "<H", 0xFFFF), (34, "<H", 1), (8, "<H", 0x2000), (8, "<H", 0x1),
                                     (8, "<H", 0x40), (24, "<L", 41), (10, "<H", 99), (10, "<H", 12)))
        data = patch_central(zip_raw(raw), rng.choice(raw)[0], at, fmt, value)
    elif how == "name":  # names torch reads as C strings: a NUL, or 512 bytes and more
        prefix = raw[0][0].split(b"/")[0]
        if rng.random() < 0.5:
            data = zip_raw(raw + [(prefix + b"/" + rng.choice((b"constants.pkl", b"x", b"data.pkl")) + b"\0y", b"\x80\x02).", 0)])
        else:
            folder = b"f" * rng.choice((400, 505, 506, 600))
            data = zip_raw([(folder + n[len(prefix):], d, f) for n, d, f in raw])
    else:
        data = zip_raw(raw)
    return agree(_write(env, "cd.pt", data), env, lambda: torch_state(env.dir / "cd.pt"))


def patch_central(data: bytes, name: bytes, at: int, fmt: str, value: int) -> bytes:
    """``data`` with one field (at offset ``at`` of its record) of ``name``'s central directory record set."""
    b = bytearray(data)
    i = 0
    while True:
        i = b.index(b"PK\x01\x02", i)
        nlen = struct.unpack_from("<H", b, i + 28)[0]
        if bytes(b[i + 46:i + 46 + nlen]) == name:
            struct.pack_into(fmt, b, i + at, value)
            return bytes(b)
        i += 4


def legacy_tar_polyglot(legacy: bytes, valid: bool = True) -> bytes:
    """A legacy torch file whose first 512 bytes are also a tar header (its checksum right when
    ``valid``): a string added to the sys_info pickle holds the header's fields from byte 100 on.
    torch.load tries tar first; the file is still a well-formed legacy pickle stream."""
    from surgery.formats.torch_legacy import SIGNATURE

    at = len(SIGNATURE) + 1 + 6  # the magic number's pickle, then the protocol's (PROTO 2, BININT2 1001, STOP)
    opening = b"\x80\x02}q\x00("  # sys_info: PROTO 2, EMPTY_DICT, BINPUT 0, MARK, then its items
    if not (legacy.startswith(SIGNATURE) and legacy[at:at + len(opening)] == opening):
        raise ValueError("not a legacy torch file as torch.save writes one")
    head = legacy[:at] + opening + b"X\x03\x00\x00\x00padX"
    block = bytearray(head + struct.pack("<I", 512) + b"\0" * 512)  # NULs and octal digits: valid UTF-8
    block[156] = ord("0")  # typeflag: a regular member (of size 0)
    block[148:156] = b" " * 8
    chksum = sum(block[:512]) + (0 if valid else 1)
    block[148:156] = b"%06o\0 " % chksum
    return bytes(block) + legacy[at + len(opening):]




def _deflated(data: bytes, junk: int) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush() + b"\0" * junk


def gen_tar_polyglot(rng: random.Random, env: "Env") -> tuple[str, str]:
    """Legacy files whose first 512 bytes are (or, checksum off by one, are not) a tar header."""
    import tarfile

    path = _write(env, "poly.pt", legacy_tar_polyglot((env.shard_dir / "legacy.pt").read_bytes(), rng.random() < 0.7))

    def reference() -> dict:
        try:  # torch.load's first step for a file that is not a zip: tarfile.open
            tarfile.open(path, "r:").close()
        except tarfile.TarError:
            return torch_state(path)
        raise RuntimeError("torch.load reads this file as a tar archive")

    return agree(path, env, reference)


def gen_dup_shard(rng: random.Random, env: "Env") -> tuple[str, str]:
    """A tensor the index maps to one shard and a later (or earlier) shard also stores; .bin
    shards whose top level is not the flat tensor dict transformers loads."""
    import torch
    from safetensors.torch import load_file, save_file

    if rng.random() < 0.25:
        return _bin_shard_case(rng, env)
    folder = env.fresh("dupshard")
    for p in env.shard_dir.glob("model-*.safetensors"):
        shutil.copy(p, folder / p.name)
    (folder / "model.safetensors.index.json").write_bytes(env.seed_index)
    wm = json.loads(env.seed_index)["weight_map"]
    name = rng.choice(sorted(wm))
    others = sorted(set(wm.values()) - {wm[name]})
    if others and rng.random() < 0.85:
        victim = folder / rng.choice(others)
        sd = load_file(str(victim))
        t = load_file(str(folder / wm[name]))[name]
        sd[name] = t.clone() if rng.random() < 0.2 else t + 1 if t.is_floating_point() else t ^ 1
        save_file(sd, str(victim))
    return agree(folder, env, lambda: hf_shards_state(folder))


def bin_shards_state(index: Path) -> dict:
    """transformers' loading of .bin shards: each file's top level, torch.load(weights_only=True)."""
    out: dict = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        out.update(torch_state(index.parent / shard))
    return out


def _holds_b():
    import torch

    class HoldsB(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.b = torch.nn.Parameter(torch.full((3,), 2.0))

        def forward(self, x):
            return x * self.b

    return HoldsB()


def _bin_shard_case(rng: random.Random, env: "Env") -> tuple[str, str]:
    import torch

    folder = env.fresh("binshard")
    b = torch.full((3,), 2.0)
    second = rng.choice(({"b": b}, {"model": {"b": b}, "epoch": 3}, {"b": b, "epoch": 3}, {"state_dict": {"b": b}},
                         [b], b, "script", "safetensors"))
    torch.save({"a": torch.ones(2)}, folder / "pytorch_model-00001-of-00002.bin")
    shard = folder / "pytorch_model-00002-of-00002.bin"
    if second == "script":  # a TorchScript archive named .bin: torch.load(weights_only=True) refuses it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.script(_holds_b()), str(shard))
    elif second == "safetensors":  # safetensors bytes named .bin: torch.load refuses them
        from safetensors.torch import save_file

        save_file({"b": b}, str(shard))
    else:
        torch.save(second, shard)
    index = folder / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {
        "a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}))
    return agree(index, env, lambda: bin_shards_state(index))


def _script_archive(env: "Env") -> bytes:
    cached = env.dir / "script-clean.pt"
    if not cached.is_file():
        import torch

        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
        torch.jit.save(torch.jit.script(net), str(cached))
    return cached.read_bytes()


JIT_EDITS = (
    (b'  __parameters__ = ["weight", "bias", ]\n', b'  __parameters__ = ["weight", "bias", ]\n  __parameters__ = []\n'),
    (b'  __parameters__ = ["weight", "bias", ]\n', b'  __parameters__ = []\n  __parameters__ = ["weight", "bias", ]\n'),
    (b'  __buffers__ = ["running_mean", "running_var", "num_batches_tracked", ]\n',
     b'  __buffers__ = ["running_mean", "running_var", "num_batches_tracked", ]\n  __buffers__ = []\n'),
    (b'  __buffers__ = []\n', b'  __buffers__ = []\n  __buffers__ = []\n'),
    (b'  __parameters__ = ["weight", "bias", ]\n', b'  __parameters__ : List[str] = []\n  __parameters__ = ["weight", "bias", ]\n'),
    # names Python reads as the plain name and TorchScript's parser refuses (or reads alike)
    (b'"running_var"', b'"running_\\x76ar"'), (b'"running_var"', b'u"running_var"'),
    (b'"running_var"', b'r"running_var"'), (b'"running_var"', b'"running_" "var"'),
    # a Module class without its lists (torch takes them as optional), lists on a class that is not a
    # Module, a name both parameter and buffer, a class the code does not define, a __setstate__
    (b'  __parameters__ = ["weight", "bias", ]\n  __buffers__ = []\n', b""),
    (b"class Linear(Module):", b"class Linear:"), (b"class Linear(Module):", b"class Other(Module):"),
    (b'  __buffers__ = []\n', b'  __buffers__ = ["weight", ]\n'),
    (b"  def forward(self: __torch__.torch.nn.modules.linear.Linear,",
     b"  def __setstate__(self: __torch__.torch.nn.modules.linear.Linear, state: Tensor) -> None:\n"
     b"    return None\n  def forward(self: __torch__.torch.nn.modules.linear.Linear,"),
    (b"  training : bool\n", b"  training : bool\n"),  # unchanged: the clean archive
)


def gen_jit_decl(rng: random.Random, env: "Env") -> tuple[str, str]:
    """TorchScript code declaring a class's parameters or buffers twice (torch adds the lists up)."""
    old, new = rng.choice(JIT_EDITS)
    entries = zip_entries(_script_archive(env))
    code = [i for i, (n, d) in enumerate(entries) if n.endswith(".py") and old in d]
    if code:
        i = rng.choice(code)
        entries[i] = (entries[i][0], entries[i][1].replace(old, new, 1))
    path = _write(env, "jit.pt", zip_raw([(n.encode(), d, 0) for n, d in entries]))
    return agree(path, env, lambda: torch_state(path, "jit"))


def gen_inflate(rng: random.Random, env: "Env") -> tuple[str, str]:
    """A deflated data.pkl: honest, with junk after its stream, or a MEMOIZE bomb whose declared
    compressed size is padded with junk to pass a ratio checked against it."""
    entries = zip_entries(env.templates[0])
    at = next(i for i, (n, _) in enumerate(entries) if n.endswith("/data.pkl"))
    pkl = entries[at][1]
    bomb = rng.random() < 0.5
    if bomb:  # n memo stores (BINPUT: torch's weights-only reader takes it, MEMOIZE it refuses), then
        # the real pickle: the same state dict, dear to unpickle
        n = rng.choice((1 << 18, 1 << 20, 4 << 20))
        pkl = pkl.replace(b"q\x00", b"q\x00" * (n + 1), 1)  # the first memo store, repeated
    junk = max(0, (len(pkl) - (1 << 20)) // 64 + 1024) if bomb else rng.choice((0, 0, 7, 4096))
    raw = [(n.encode(), d, 0) for n, d in entries]
    path = _write(env, "inflate.pt", zip_raw(raw, deflate={raw[at][0]: (pkl, junk)}))
    return agree(path, env, lambda: torch_state(path))


def gen_dcp_chunks(rng: random.Random, env: "Env") -> tuple[str, str]:
    """A DCP folder of ranks' chunks whose .metadata lies: a chunk moved, resized, dropped or
    repeated, a size or a storage entry changed (edited as records), or its pickle's bytes mutated."""
    import pickle

    folder = env.fresh("dcp")
    for p in env.dcp_seed.iterdir():
        shutil.copy(p, folder / p.name)
    meta = folder / ".metadata"
    if rng.random() < 0.6:
        md = pickle.loads(meta.read_bytes())  # the seed's own metadata, written by this process
        _lie(md, rng)
        meta.write_bytes(pickle.dumps(md))
    else:
        meta.write_bytes(mutate(meta.read_bytes(), "data.pkl", random_ops(rng, "data.pkl")))
    return _open_deep(folder, env, rng.random() < 0.3)


def _lie(md, rng: random.Random) -> None:
    """One edit of a DCP Metadata's records, at random."""
    import torch

    entries = [m for m in md.state_dict_metadata.values() if hasattr(m, "chunks")]
    m = rng.choice(entries)
    number = rng.choice(INTERESTING + (0, 1, 2, 3, 4, 5, 6, 7))
    kind = rng.randrange(6)
    if kind < 4 and m.chunks:
        i = rng.randrange(len(m.chunks))
        c = m.chunks[i]
        if kind == 0:  # a chunk moved
            offsets = list(c.offsets) or [0]
            offsets[rng.randrange(len(offsets))] = number
            m.chunks[i] = type(c)(torch.Size(offsets[:len(c.offsets)]), c.sizes)
        elif kind == 1:  # a chunk resized
            sizes = list(c.sizes) or [0]
            sizes[rng.randrange(len(sizes))] = number
            m.chunks[i] = type(c)(c.offsets, torch.Size(sizes[:len(c.sizes)]))
        elif kind == 2:
            del m.chunks[i]
        else:
            m.chunks.append(c)
    elif kind == 4:  # the global size
        size = list(m.size) or [1]
        size[rng.randrange(len(size))] = number
        m.size = torch.Size(size)
    else:  # where a chunk's bytes are
        key = rng.choice(list(md.storage_data))
        info = md.storage_data[key]
        field = rng.choice(("offset", "length"))
        md.storage_data[key] = type(info)(info.relative_path, number if field == "offset" else info.offset,
                                          number if field == "length" else info.length)


GENERATORS = {"big-ints": gen_big_ints, "memo": gen_memo, "build": gen_build, "codecs": gen_codecs,
              "dup-zip": gen_dup_zip, "symlink-shard": gen_symlink_shard, "destination": gen_destination,
              "manifest": gen_manifest, "which-pkl": gen_which_pkl, "central-dir": gen_central_dir,
              "tar-polyglot": gen_tar_polyglot, "dup-shard": gen_dup_shard, "jit-decl": gen_jit_decl,
              "inflate": gen_inflate, "records": gen_records, "dcp-chunks": gen_dcp_chunks,
              "zero-parts": lambda rng, env: reliability_ranks.gen_zero_parts(rng, env, INTERESTING, _byte_mutator(rng), _open_deep),
              "rank-files": lambda rng, env: reliability_ranks.gen_rank_files(rng, env, _byte_mutator(rng), _open_deep)}


def _byte_mutator(rng: random.Random) -> Callable[[bytes], bytes]:
    """Mutations of a torch.save file's bytes, drawn from ``rng``."""
    return lambda data: mutate(data, "torch-zip", random_ops(rng, "torch-zip"))


# ------------------------------------------------------------------------------------- worker

STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """Resident-memory figures (kB) of a process from /proc/PID/status; {} once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_KEYS:
            out[key] = int(value.split()[0])
    return out


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def warm_up(cls: str, env: Env, seeds: dict[str, list[bytes]]) -> None:
    """Pay one-time costs before the first input: imports (torch; torch._dynamo, which adapt's
    meta-device probe imports, about 3 s; torchvision for load_adapted) and the class's scratch
    files. No input is then charged for them, neither on the stall clock nor in memory."""
    import torch  # noqa: F401

    import surgery

    outcome, detail = check("torch-zip", seeds["torch-zip"][0], env, do_remap=True)
    if outcome != "ok":
        raise RuntimeError(f"a valid seed file does not remap: {outcome} {detail}")
    if cls == "manifest":
        env.evil  # noqa: B018 - written once, rewritten by no input
        surgery.load_adapted(env.adapted)
    elif cls == "destination":
        surgery.adapt(env.tiny_ckpt, arch=env.tiny_arch, num_classes=3, out=env.dir / "warm", force=True)
    elif cls == "dcp-chunks":
        surgery.remap(env.dcp_seed, env.dir / "warm.safetensors", [], force=True)  # and torch.distributed's imports
    elif cls == "zero-parts":
        for stage in (2, 3):
            surgery.remap(reliability_ranks.zero_seed(env.dir, stage), env.dir / "warm.safetensors", [], force=True)
    elif cls == "rank-files":
        surgery.remap(reliability_ranks.rank_seed(env.dir), env.dir / "warm.safetensors", [], force=True)


def run_input(cls: str, seed: int, i: int, env: Env, seeds: dict[str, list[bytes]]) -> tuple[str, str, dict]:
    """Input i of (class, seed): generated from its own rng, so any input replays alone."""
    rng = random.Random(f"{cls}:{seed}:{i}")
    extra: dict = {}
    if cls in GENERATORS:
        outcome, detail = GENERATORS[cls](rng, env)
    else:
        which = rng.randrange(len(seeds[cls]))
        ops = random_ops(rng, cls)
        data = mutate(seeds[cls][which], cls, ops)
        outcome, detail = check(cls, data, env, which, deep=True, do_remap=(i % 20 == 0 and cls != "rules"))
        extra = {"ops": [(k, p, b.hex()) for k, p, b in ops], "which": which}
    if env.marker.exists():
        outcome, detail = "marker", f"the payload's marker file exists ({outcome}: {detail})"
        env.marker.unlink()
    return outcome, detail, extra


def worker(cls: str, seed: int, start: int, count: int, workdir: Path) -> None:
    """Inputs start..start+count-1 of (class, seed). Prints 'base RSS ANON FILE CPU EXACT' once
    warmed up, '#i' before each input, '=OUTCOME HWM RSS ANON CPU' after it (kB; HWM is the kernel's
    peak RSS since the previous input when EXACT is 1: VmHWM is reset after each input), a JSON
    line per problem, and 'end CPU' (CPU seconds, as in 'base')."""
    import resource

    seeds = build_seeds(workdir.parent / "seeds")
    env = Env(workdir, seeds)
    warm_up(cls, env, seeds)
    out = sys.stdout
    st = proc_status()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    exact = reset_peak()
    out.write(f"base {st['VmRSS']} {st['RssAnon']} {st['RssFile']} {ru.ru_utime + ru.ru_stime:.3f} {int(exact)}\n")
    for i in range(start, start + count):
        out.write(f"#{i}\n")
        out.flush()
        outcome, detail, extra = run_input(cls, seed, i, env, seeds)
        st = proc_status()
        if exact:
            reset_peak()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        out.write(f"={outcome} {st['VmHWM']} {st['VmRSS']} {st['RssAnon']} {ru.ru_utime + ru.ru_stime:.3f}\n")
        if outcome not in ("ok", "refused"):
            out.write(json.dumps({"i": i, "outcome": outcome, "detail": detail, **extra}) + "\n")
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out.write(f"end {ru.ru_utime + ru.ru_stime:.3f}\n")
    out.flush()


class Chunk:
    """What the harness learns about one chunk of inputs from its workers' output and from
    sampling their /proc/PID/status (RssAnon every few ms, independent of the worker's GIL)."""

    def __init__(self, cls: str, seed: int, start: int, count: int, workdir: Path):
        self.cls, self.seed, self.start, self.end, self.workdir = cls, seed, start, start + count, workdir
        self.tally = dict.fromkeys(OUTCOMES, 0)
        self.problems: list[dict] = []
        self.mem = {"base_rss": 0, "base_anon": 0, "base_file": 0, "peak_hwm": 0, "peak_anon": 0, "rise": 0,
                    "rise_i": -1, "samples": 0}
        self.cpu_inputs = self.cpu_setup = 0.0
        self.workers, self.exact = 0, True
        self.current: int | None = None
        self.last_done = start - 1
        self.prev_rss, self.prev_cpu = 0, 0.0
        self.slowest = (0.0, -1)  # CPU seconds of the dearest input, and which
        self.started = self.ended = False

    def line(self, line: str) -> None:
        head, *rest = line.split(" ")
        if head == "base":
            rss, anon, file, cpu, exact = rest
            self.started, self.prev_rss, self.segment_setup = True, int(rss), float(cpu)
            self.prev_cpu = float(cpu)
            self.exact = self.exact and exact == "1"
            for key, value in (("base_rss", rss), ("base_anon", anon), ("base_file", file), ("peak_hwm", rss),
                               ("peak_anon", anon)):
                self.mem[key] = max(self.mem[key], int(value))
        elif head.startswith("#"):
            self.current = int(head[1:])
        elif head.startswith("="):
            hwm, rss, anon, cpu = int(rest[0]), int(rest[1]), int(rest[2]), float(rest[3])
            self.tally[head[1:]] += 1
            self.slowest = max(self.slowest, (cpu - self.prev_cpu, self.current))
            self.prev_cpu = cpu
            self.mem["peak_hwm"] = max(self.mem["peak_hwm"], hwm)
            self.mem["peak_anon"] = max(self.mem["peak_anon"], anon)
            if hwm - self.prev_rss > self.mem["rise"]:
                self.mem["rise"], self.mem["rise_i"] = hwm - self.prev_rss, self.current
            self.prev_rss, self.last_done, self.current = rss, self.current, None
        elif head == "end":
            self.ended, self.segment_end = True, float(rest[0])
        elif line.startswith("{"):
            self.problems.append(json.loads(line))

    def sample(self, pid: int) -> None:
        anon = proc_status(pid).get("RssAnon", 0)
        self.mem["peak_anon"] = max(self.mem["peak_anon"], anon)
        self.mem["samples"] += 1

    def lost(self, hung: bool, returncode: int, err: Path, cpu: float) -> int:
        """The worker stopped inside an input (or, dying between inputs, before the next one):
        count it and return where the next worker starts. ``cpu``: the worker's CPU seconds."""
        i = self.current if self.current is not None else self.last_done + 1
        outcome = "hung" if hung else "crashed"
        tail = err.read_text(errors="replace").strip().splitlines()[-3:] if err.is_file() else []
        self.tally[outcome] += 1
        self.problems.append({"i": i, "outcome": outcome, "detail": f"worker exit {returncode} after "
                              f"{cpu - self.prev_cpu:.1f} s of CPU in the input"
                              + (f"; stderr: {' | '.join(tail)}" if tail and not hung else "")})
        self.current, self.last_done = None, i
        return i + 1

    def result(self, wall_s: float) -> dict:
        return {"parser": self.cls, "tally": self.tally, "problems": self.problems, "mem_kb": self.mem,
                "exact_peak": self.exact, "cpu_inputs_s": round(self.cpu_inputs, 3),
                "slowest": [round(self.slowest[0], 3), self.slowest[1]],
                "cpu_setup_s": round(self.cpu_setup, 3), "workers": self.workers, "wall_s": round(wall_s, 3)}


def run_chunk(cls: str, seed: int, start: int, count: int, workdir: Path, stall_s: float) -> dict:
    """Run workers over a chunk, restarting past inputs that crash the process or hang it."""
    t0 = time.monotonic()
    chunk = Chunk(cls, seed, start, count, workdir)
    err = workdir.parent / f"{workdir.name}.stderr"
    i = start
    while i < chunk.end:
        cmd = [sys.executable, __file__, "--worker", cls, str(seed), str(i), str(chunk.end - i), str(workdir)]
        with open(err, "wb") as errf:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf, bufsize=0)
        chunk.started, chunk.ended, chunk.segment_setup = False, False, 0.0
        hung, cpu = _follow(proc, stall_s, chunk.line, busy=lambda: chunk.current is not None,
                            sample=lambda: chunk.sample(proc.pid))
        chunk.workers += 1
        inputs = ((chunk.segment_end if chunk.ended else cpu) - chunk.segment_setup) if chunk.started else 0.0
        chunk.cpu_inputs += inputs
        chunk.cpu_setup += cpu - inputs  # start-up, warm-up and exit
        if chunk.ended:
            break
        if not chunk.started:
            raise RuntimeError(f"{cls} worker failed before its first input (exit {proc.returncode}): "
                               f"{err.read_text(errors='replace')[-2000:]}")
        i = chunk.lost(hung, proc.returncode, err, cpu)
    return chunk.result(time.monotonic() - t0)


def runqueue_s(pid: int) -> float:
    """Seconds the process's main thread has been runnable but waiting for a CPU
    (/proc/PID/schedstat); 0 where the kernel does not say."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def _follow(proc: subprocess.Popen, stall_s: float, on_line, busy, sample, every: float = 0.005) -> tuple[bool, float]:
    """Feed the worker's output lines to ``on_line`` as they come (raw reads: no line waits in a
    buffer the poll cannot see) and call ``sample`` every ``every`` seconds; kill the worker when
    ``busy()`` (an input in progress) for ``stall_s`` seconds without output, not counting the
    time it waited for a CPU (other processes on the machine slow an input down; they do not
    make it hang). Returns whether it was killed as hung, and the CPU seconds it used."""
    import selectors

    fd = proc.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    pending, hung, reaped = b"", False, None
    last = sampled = time.monotonic()
    waited = runqueue_s(proc.pid)
    try:
        while True:
            ready = sel.select(timeout=every)
            now = time.monotonic()
            if now - sampled >= every:
                sample()
                sampled = now
            if not ready:
                if busy() and now - last > stall_s and now - last - (runqueue_s(proc.pid) - waited) > stall_s:
                    proc.kill()
                    hung = True
                    break
                reaped = os.wait4(proc.pid, os.WNOHANG)  # not poll(): it would drop the rusage
                if reaped[0]:
                    break
                reaped = None
                continue
            data = os.read(fd, 1 << 16)
            if not data:
                break
            last, waited = now, runqueue_s(proc.pid)
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                on_line(line.decode())
    finally:
        sel.close()
        proc.stdout.close()
        _, status, ru = reaped or os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return hung, ru.ru_utime + ru.ru_stime


# ---------------------------------------------------------------------------------- the report

def hostile_pickles(workdir: Path) -> list[tuple[str, str]]:
    """The named hostile inputs of the issue, each with its outcome (in this process)."""
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


def merge(results: list[dict]) -> dict[str, dict]:
    """Chunk results summed (counts, CPU) or maxed (memory) per class."""
    by_class: dict[str, dict] = {}
    for r in results:
        d = by_class.setdefault(r["parser"], {"tally": dict.fromkeys(OUTCOMES, 0), "problems": [], "mem_kb": {},
                                              "cpu_inputs_s": 0.0, "cpu_setup_s": 0.0, "workers": 0, "wall_s": 0.0,
                                              "slowest": [0.0, -1],
                                              "exact": True})
        for k, v in r["tally"].items():
            d["tally"][k] += v
        d["problems"] += r["problems"]
        for k in ("cpu_inputs_s", "cpu_setup_s", "workers", "wall_s"):
            d[k] += r[k]
        d["exact"] = d["exact"] and r["exact_peak"]
        d["slowest"] = max(d["slowest"], r["slowest"])
        m = d["mem_kb"]
        for k, v in r["mem_kb"].items():
            if k == "rise_i":
                continue
            if k == "rise" and v > m.get("rise", -1):
                m["rise_i"] = r["mem_kb"]["rise_i"]
            m[k] = m.get(k, 0) + v if k == "samples" else max(m.get(k, 0), v)
    return by_class


def _mb(kb: int) -> str:
    return f"{kb / 1024:.0f}"


def input_cost_met(d: dict) -> bool:
    """The class's dearest input within the per-input bound of CPU and memory."""
    return d["slowest"][0] <= INPUT_CPU_GOAL_S and d["mem_kb"].get("rise", 0) < INPUT_RISE_GOAL_MB * 1024


def goal_met(m: dict) -> bool:
    """Peak anonymous memory, sampled and bounded, under the goal (see render's text)."""
    return max(m["peak_anon"], m["base_anon"] + m["rise"]) < RSS_GOAL_MB * 1024


def render(results: list[dict], args, elapsed: float, load: float, hostile: list[tuple[str, str]]) -> str:
    by_class = merge(results)
    total = sum(sum(d["tally"].values()) for d in by_class.values())
    cpu_in = sum(d["cpu_inputs_s"] for d in by_class.values())
    cpu_setup = sum(d["cpu_setup_s"] for d in by_class.values())
    bad = {k: sum(d["tally"].get(k, 0) for d in by_class.values())
           for k in ("crashed", "hung", "partial", "marker", "differential")}
    over = [c for c, d in by_class.items() if not goal_met(d["mem_kb"])]
    dear = [c for c, d in by_class.items() if not input_cost_met(d)]
    classes = " ".join(f"--classes {c}" for c in args.classes) if args.classes != list(CLASSES) else ""
    verdict = ("met" if not any(bad.values()) and not over and not dear else
               "NOT met: " + ", ".join([f"{v} {k}" for k, v in bad.items() if v]
                                       + [f"memory over the goal in {c}" for c in over]
                                       + [f"an input over the cost bound in {c}" for c in dear]))
    lines = [
        "# Reliability: fuzzed and hostile inputs", "",
        "Generated by `bench/reliability.py` from one run; do not edit by hand. Reproduce with:", "", "```",
        f".venv/bin/python bench/reliability.py --inputs {args.inputs} --seed {args.seed} --jobs {args.jobs} "
        f"--stall {args.stall:g} {classes}".rstrip(), "```", "",
        f"{total:,} inputs in {elapsed / 60:.1f} min on {os.cpu_count()} CPUs ({args.jobs} worker processes at a "
        f"time), python {sys.version.split()[0]}, {args.torch}, scratch files on {args.fs}, seed files from "
        f"`{SEEDS.relative_to(REPO)}` (built by the first run; delete it to build new ones). Load average during "
        f"the run: {load:.1f} "
        f"(other processes shared the CPUs when it exceeds {args.jobs}). CPU time: {cpu_in / 60:.1f} core-min for "
        f"the inputs, {cpu_setup / 60:.1f} core-min to start and warm up {sum(d['workers'] for d in by_class.values())} "
        f"worker processes; on {args.jobs} idle cores the workers would take about "
        f"{(cpu_in + cpu_setup) / args.jobs / 60:.1f} min.", "",
        f"**Goal** (0 crashed, 0 hung over {args.stall:g} s, 0 partial, 0 marker, 0 differential; peak anonymous "
        f"memory under {RSS_GOAL_MB} MB in every class; every input at most {INPUT_CPU_GOAL_S:g} s of CPU and a "
        f"rise of resident memory under {INPUT_RISE_GOAL_MB} MB, the *dearest input* and *largest one-input rise* "
        f"columns below): **{verdict}**.", "",
    ]
    lines += _method(args, by_class) + _outcome_table(by_class) + _memory_table(by_class, args)
    lines += _problems(by_class, args) + _hostile_table(hostile)
    return "\n".join(lines)


def _method(args, by_class: dict) -> list[str]:
    per_input = {c: d["cpu_inputs_s"] / max(sum(d["tally"].values()), 1) for c, d in by_class.items()}
    dear = max(per_input, key=per_input.get)
    return [
        "## What runs", "",
        "The first six classes are real files (written by torch.save or by surgery) with one to five mutations "
        "(" + ", ".join(MUTATIONS) + "), opened through the public API: `surgery.open(path)` then "
        "`Checkpoint.state_dict()` for files under 1 MB, and every 20th input also through "
        "`surgery.remap(path, dst, verify=True)`; rules files through `Rules.from_file` and a plan over real key "
        "names. The other classes are generated attacks (see the docstring of `bench/reliability.py`): reader "
        "inputs go through `surgery.open`, `surgery.inspect`, `state_dict()` and some through `remap`; "
        "`destination` runs `surgery.remap`/`surgery.adapt` against a folder of pre-existing files and compares "
        "every one of them before and after; `manifest` runs `surgery.load_adapted` without `trust_code`.", "",
        f"Every class gets the same number of inputs: the dearest, `{dear}`, costs {1000 * per_input[dear]:.1f} ms "
        f"of CPU per input (the CPU column below), too little to give any class fewer. "
        f"Each worker process takes a chunk of up to {args.chunk:,} inputs of one class; before its first input it "
        "imports torch and surgery, writes "
        "its scratch files and takes the class's valid path once (a remap; an adapt, whose meta-device probe imports "
        "torch._dynamo; a load_adapted), so that no input is charged for one-time costs.", "",
        f"Outcomes: **ok**, **refused** (a one-line `SurgeryError`), **crashed** (any other exception, or the "
        f"worker died), **hung** (no output for {args.stall:g} s during an input, not counting the time the worker "
        f"waited for a CPU while other processes ran (its run-queue delay from /proc/PID/schedstat), so the "
        f"{args.stall:g} s are what it would take on an idle machine: the worker is killed, the input counted and a "
        f"new worker continues with the next input), **partial** (an output left after a failure, "
        f"an output that does not open, or a pre-existing file changed), **marker** (the file a payload would "
        f"create exists afterwards: code ran), **differential** (surgery read a file as other tensors than the "
        f"real loader reads from it: torch.load(weights_only=True), torch.jit.load(...).state_dict(), tarfile "
        f"for torch's tar-first order, or transformers' shard-by-shard loading; the loader is asked only when "
        f"surgery reads the file). CPU per input: the workers' user + system time over the inputs "
        f"(start-up, warm-up and exit not included); dearest input: the one that took the most CPU.", "",
    ]


def _outcome_table(by_class: dict) -> list[str]:
    lines = ["| class | inputs | ok | refused | crashed | hung | partial | marker | differential | CPU per input | "
             "dearest input |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in CLASSES:
        if c in by_class:
            d = by_class[c]
            t, n = d["tally"], sum(d["tally"].values())
            lines.append(f"| {c} | {n:,} | {t['ok']:,} | {t['refused']:,} | {t['crashed']} | {t['hung']} | "
                         f"{t['partial']} | {t['marker']} | {t.get('differential', 0)} | "
                         f"{1000 * d['cpu_inputs_s'] / max(n, 1):.1f} ms | "
                         f"{1000 * d['slowest'][0]:,.0f} ms (#{d['slowest'][1]}) |")
    return lines + [""]


def _memory_table(by_class: dict, args) -> list[str]:
    exact = all(d["exact"] for d in by_class.values())
    light = min((d["mem_kb"] for d in by_class.values()), key=lambda m: m["base_rss"])
    samples = sum(d["mem_kb"]["samples"] for d in by_class.values())
    every = 1000 * sum(d["wall_s"] for d in by_class.values()) / max(samples, 1)
    lines = [
        "## Memory", "",
        f"A worker that has imported {args.torch} and surgery, and read nothing, is resident at "
        f"{_mb(light['base_rss'])} MB (the lightest class here): {_mb(light['base_anon'])} MB of anonymous memory "
        f"(its heap) and {_mb(light['base_file'])} MB of shared-library pages mapped from disk (RssFile: shared "
        "between processes and dropped by the kernel under pressure). A worker's peak RSS (VmHWM) therefore "
        f"starts near or above the {RSS_GOAL_MB} MB goal with no input read, and says nothing about what inputs "
        "cost. The goal is held against anonymous memory, which is what parsing an "
        f"input allocates: a class meets it when its peak RssAnon stays under {RSS_GOAL_MB} MB, both as sampled "
        "and as bounded (RssAnon before inputs plus the largest one-input rise of RSS).", "",
        "How each figure is taken (all from /proc/PID/status, in MB, the largest over the class's workers): "
        "*before inputs*: once the worker is warmed up; *peak RSS*: the kernel's VmHWM during inputs; "
        "*peak RssAnon*: sampled "
        f"by the harness process every 5 ms (outside the worker, so it needs no GIL; {samples:,} samples, one every "
        f"{every:.0f} ms on average as the CPUs allowed) and read by the worker after each input; *largest one-input "
        "rise*: "
        + ("the kernel's VmHWM, reset (`5 > /proc/self/clear_refs`) after each input, minus the RSS the input "
           "started from: exact, it sees peaks shorter than the sampling interval, and it counts file pages too, "
           "so it bounds what one input made resident." if exact else
           "VmHWM minus the RSS the input started from (this kernel could not reset VmHWM, so it is the peak since "
           "the worker started: an upper bound)."), "",
        "| class | workers | before inputs: RSS (anon + file) | peak RSS | peak RssAnon | inputs' cost (peak anon "
        "- anon before) | largest one-input rise (input) | goal |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in CLASSES:
        if c in by_class:
            d, m = by_class[c], by_class[c]["mem_kb"]
            lines.append(f"| {c} | {d['workers']} | {_mb(m['base_rss'])} ({_mb(m['base_anon'])} + {_mb(m['base_file'])}) "
                         f"| {_mb(m['peak_hwm'])} | {_mb(m['peak_anon'])} | {_mb(m['peak_anon'] - m['base_anon'])} | "
                         f"{_mb(m['rise'])} ({'#' + str(m['rise_i']) if m['rise'] else '-'}) | "
                         f"{'met' if goal_met(m) else 'NOT met'} |")
    return lines + [""]


def _problems(by_class: dict, args) -> list[str]:
    problems = [(c, x) for c, d in by_class.items() for x in d["problems"]]
    if not problems:
        return ["No input crashed, hung, left partial output, ran code or was read other than its loader reads it.", ""]
    lines = [f"## Problems found ({len(problems)}; the first 60)", "",
             f"Replay one input with `.venv/bin/python bench/reliability.py --worker CLASS {args.seed} INPUT 1 DIR`.", ""]
    lines += [f"- {c} input {x['i']}: {x['outcome']}: {x.get('detail', '')}" for c, x in problems[:60]]
    return lines + [""]


def _hostile_table(hostile: list[tuple[str, str]]) -> list[str]:
    lines = ["## Named hostile pickles (data.pkl of a torch zip)", "",
             "Each must be refused with nothing executed (the marker file it would create must not exist) "
             "and without allocating what its length fields claim.", "", "| payload | outcome |", "|---|---|"]
    return lines + [f"| {n} | {o} |" for n, o in hostile]


def torch_build() -> str:
    """'torch 2.x (CUDA 12.y build)' or 'torch 2.x (CPU build)': what a worker imports."""
    import torch

    cuda = torch.version.cuda
    return f"torch {torch.__version__} ({f'CUDA {cuda}' if cuda else 'CPU'} build)"


def scratch_root(requested: Path | None) -> tuple[Path, str]:
    """Where workers write their inputs: tmpfs when there is one, so that fsync and directory
    churn (a fresh folder per destination input) time the code rather than the disk."""
    if requested is not None:
        requested.mkdir(parents=True, exist_ok=True)
        return requested, f"`{requested}`"
    import tempfile

    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="surgery-reliability-", dir=shm)), "tmpfs (/dev/shm)"
    out = REPO / "bench" / "out" / "reliability"
    out.mkdir(parents=True, exist_ok=True)
    return out, "`bench/out/reliability`"


def run_all(args, root: Path) -> tuple[list[dict], float]:
    """Every chunk of every class, ``args.jobs`` at a time, the generated attacks (the dearer
    classes) first so that cheap chunks fill the end; returns the results and the mean 1-minute
    load average."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    per = -(-args.inputs // len(args.classes))  # at least --inputs in all
    jobs = [(c, args.seed, s, min(args.chunk, per - s), root / f"w-{c}-{k}")
            for c in reversed(args.classes) for k, s in enumerate(range(0, per, args.chunk))]
    results, loads = [], []
    with ThreadPoolExecutor(args.jobs) as pool:
        pending = {pool.submit(run_chunk, *j, args.stall) for j in jobs}
        while pending:
            done, pending = wait(pending, timeout=10, return_when=FIRST_COMPLETED)
            loads.append(os.getloadavg()[0])
            for f in done:
                r = f.result()
                results.append(r)
                print(f"[{len(results)}/{len(jobs)}] {r['parser']}: {r['tally']} cpu {r['cpu_inputs_s']:.0f} s", flush=True)
    return results, sum(loads) / len(loads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=100_000, help="inputs in total (at least), split evenly across classes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("--chunk", type=int, default=10_000, help="inputs per worker process")
    ap.add_argument("--stall", type=float, default=10.0, help="seconds without progress that count as a hang")
    ap.add_argument("--classes", action="append", choices=CLASSES, help="only these classes (repeat; default all)")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a new one on tmpfs)")
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "RELIABILITY.md")
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="write --doc again from a run's bench/out/reliability-results.json (no inputs run)")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.render:
        _write_doc(json.loads(args.render.read_text()), args.doc)
        return
    args.classes = args.classes or list(CLASSES)
    if args.worker:
        parser, seed, start, count, workdir = args.worker
        worker(parser, int(seed), int(start), int(count), Path(workdir))
        return
    root, args.fs = scratch_root(args.workdir)
    args.torch = torch_build()
    t0 = time.monotonic()
    try:
        (root / "seeds").mkdir(exist_ok=True)
        build_seeds(SEEDS)
        shutil.copy(SEEDS / "seeds.json", root / "seeds" / "seeds.json")
        results, load = run_all(args, root)
        elapsed = time.monotonic() - t0
        hostile = hostile_pickles(root)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    run = {"results": results, "elapsed": elapsed, "load": load, "hostile": hostile,
           "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    (out / "reliability-results.json").write_text(json.dumps(run, indent=1))
    _write_doc(run, args.doc)


def _write_doc(run: dict, doc: Path) -> None:
    args = argparse.Namespace(**run["args"])
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(render(run["results"], args, run["elapsed"], run["load"], [tuple(h) for h in run["hostile"]]) + "\n")
    print(f"wrote {doc} ({run['elapsed']:.0f} s)")


if __name__ == "__main__":
    main()
