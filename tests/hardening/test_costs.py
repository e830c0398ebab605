"""Tiny files stay cheap: the reader's stand-ins for torch.Size and torch.device take what torch's
weights-only loader takes, what they build in all is metered against the pickle's size, the
searches of the unpickled object are linear under one budget, and globs never follow symlinked
folders. The hostile files come from bench/costs.py (the benchmark of the same classes); the time
and memory bounds here only guard against a return of costs orders of magnitude larger."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

import surgery
from bench import costs
from bench.costs import ckpt, s
from surgery.errors import FormatError
from surgery.formats import container
from surgery.inspection import zoo_scan as zoo_module
from tests import REPO


def _pt(tmp_path: Path, pkl: bytes, name: str = "x.pt") -> Path:
    path = tmp_path / name
    path.write_bytes(costs.torch_zip(pkl))
    return path


def _refused(cli, *args, match: str) -> str:
    r = cli(*args)
    lines = r.stderr.splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (r.exit_code, r.stderr[-2000:])
    assert match in lines[0], lines[0]
    return lines[0]


class _Cost:
    """CPU seconds of this process (so tests on the other cores do not count) and, with ``trace``,
    peak traced memory of the block (tracing slows allocation several times): a guard against
    costs orders of magnitude larger, not a benchmark."""

    def __init__(self, trace: bool = False):
        self.trace, self.mb = trace, 0.0

    def __enter__(self):
        if self.trace:
            tracemalloc.start()
        self.t0 = time.process_time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.process_time() - self.t0
        if self.trace:
            self.mb = tracemalloc.get_traced_memory()[1] / 1e6
            tracemalloc.stop()


# ----------------------------------------------------------------------------- torch.Size

def test_torch_size_of_a_string_is_refused_at_once(cli, tmp_path):
    """30 calls of torch.Size on one 200,000-character string built 6 M one-character strings that
    every search then visited; torch.load refuses the first call."""
    path = _pt(tmp_path, costs.size_of_str(200_000))
    with _Cost() as cost:
        _refused(cli, "inspect", path, match="torch.Size(str) is not a size")
    assert cost.seconds < 5, cost.seconds


@pytest.mark.parametrize("arg, shown", [(b"K\x02K\x03\x86", "tuple (2 items)"), (b"(\x88K\x04l", "tuple (2 items)"),
                                        (b")", "tuple (0 items)"), (b"C\x02ab", "tuple (2 items)")])
def test_torch_size_takes_what_torch_takes(tmp_path, arg, shown):
    path = _pt(tmp_path, ckpt(("size", b"ctorch\nSize\n" + arg + b"\x85R")))
    assert surgery.open(path).extras["size"] == shown


@pytest.mark.parametrize("args", [b"G?\xf8\x00\x00\x00\x00\x00\x00\x85\x85", b"K\x01K\x02\x86", b"K\x05\x85",
                                  b"(K\x01\x85t\x85", b"(\x8a\x09" + bytes(8) + b"\x01t\x85"])
def test_torch_size_refuses_what_torch_refuses(tmp_path, args):
    """A float, two arguments, an int, a nested tuple, an integer past int64."""
    path = _pt(tmp_path, ckpt(("size", b"ctorch\nSize\n" + args + b"R")))
    with pytest.raises(FormatError, match="torch.Size"):
        surgery.open(path)


def test_one_object_passed_to_stand_ins_again_and_again_is_refused(cli, tmp_path):
    """torch.Size of one 200,000-int list, 60 times: torch accepts each call (12 M elements); the
    stand-ins together build at most one element per pickle byte plus a constant."""
    path = _pt(tmp_path, costs.size_repeated(200_000, calls=60))
    with _Cost() as cost:
        _refused(cli, "inspect", path, match="again and again")
    assert cost.seconds < 20, cost.seconds


def test_large_objects_passed_once_are_read(tmp_path):
    """The meter grows with the pickle: a protocol-2 bytes value of 3 MB (pickle writes bytes as
    _codecs.encode(str, 'latin1')) is read, and so is a set of 1.5 M members."""
    blob = b"c_codecs\nencode\n" + s("z" * 3_000_000) + s("latin1") + b"\x86R"
    members = b"cbuiltins\nset\n](" + b"".join(b"J" + i.to_bytes(4, "little") for i in range(1_500_000)) + b"e\x85R"
    ck = surgery.open(_pt(tmp_path, ckpt(("blob", blob), ("members", members))))
    assert ck.extras["blob"].startswith("b'zzz") and ck.extras["members"] == "set"


# ----------------------------------------------------------------------------- torch.device

@pytest.mark.parametrize("args, shown", [(s("cuda") + b"K\x01\x86", "'cuda:1'"), (s("cpu") + b"\x85", "'cpu'"),
                                         (b"C\x03cpu\x85", "'cpu'"), (s("cuda:0") + b"\x85", "'cuda:0'"),
                                         (b"K\x00\x85", "'cuda:0'"), (s("meta") + b"N\x86", "'meta'")])
def test_torch_device_takes_what_torch_takes(tmp_path, args, shown):
    path = _pt(tmp_path, ckpt(("d", b"ctorch\ndevice\n" + args + b"R")))
    assert surgery.open(path).extras["d"] == shown


@pytest.mark.parametrize("args", [s("foo") + b"\x85", s("cuda:01") + b"\x85", s("cuda:0") + b"K\x01\x86",
                                  s("cuda") + b"\x88\x86", s("cuda") + b"J\xff\xff\xff\xff\x86", s("x" * 1000) + b"\x85",
                                  b")", s("cpu") + b"K\x00K\x00\x87", b"]\x85"])
def test_torch_device_refuses_what_torch_refuses(tmp_path, args):
    path = _pt(tmp_path, ckpt(("d", b"ctorch\ndevice\n" + args + b"R")))
    with pytest.raises(FormatError, match="names no device torch.load accepts"):
        surgery.open(path)


def test_torch_device_never_joins_its_arguments(cli, tmp_path):
    """torch.device(S, S, ... 30 times) of a 2 MB string joined them: 60 MB from a 2 MB file."""
    path = _pt(tmp_path, costs.device_join(2_000_000))
    with _Cost(trace=True) as cost:
        line = _refused(cli, "inspect", path, match="torch.device(str, str, str, str, ... (30 arguments))")
    assert len(line) < 300 and cost.mb < 40, (len(line), cost.mb)


# ----------------------------------------------------------------------------- the searches

def test_the_container_search_is_linear(cli, tmp_path):
    """A list of 400,000 references to one dict: the search queued each and popped the front of a
    list (quadratic: minutes); now each costs one step."""
    path = _pt(tmp_path, costs.queue(400_000))
    with _Cost() as cost:
        r = cli("inspect", path, "--json")
    assert r.exit_code == 0, r.stderr[-500:]
    assert json.loads(r.stdout)["extras"]["l"] == "list (400000 items)"
    assert cost.seconds < 20, cost.seconds


def test_pickled_modules_are_walked_once(cli, monkeypatch, tmp_path):
    """15 pickled modules, each holding one shared module of 100,000 children: walking the module
    tree again from every module cost 15 x 100,000 steps per search (two searches); now the
    steps are counted and stay within a dozen per child."""
    monkeypatch.setattr(container, "WALK_BUDGET", 1_200_000)
    monkeypatch.setattr(container, "WALK_PER_BYTE", 0)
    r = cli("inspect", _pt(tmp_path, costs.module_comb(100_000)), "--allow-global", "mylib.Net", "--json")
    assert r.exit_code == 0, r.stderr[-500:]
    assert json.loads(r.stdout)["extras"]["model"] == "mylib.Net (opaque)"


def test_summaries_count_a_shared_object_once(cli, monkeypatch, tmp_path):
    """30 entries around one shared list of 200,000 items: each summary walked the list again."""
    monkeypatch.setattr(container, "WALK_BUDGET", 2_000_000)
    monkeypatch.setattr(container, "WALK_PER_BYTE", 0)
    r = cli("inspect", _pt(tmp_path, costs.summaries(200_000)), "--json")
    assert r.exit_code == 0, r.stderr[-500:]
    assert json.loads(r.stdout)["extras"]["e7"] == "list (1 items)"


def test_the_walk_budget_refuses_by_name(cli, monkeypatch, tmp_path):
    monkeypatch.setattr(container, "WALK_BUDGET", 1000)
    monkeypatch.setattr(container, "WALK_PER_BYTE", 0)
    _refused(cli, "inspect", _pt(tmp_path, costs.queue(5000)), match="more than 1,000 steps (surgery's walk budget)")


def test_the_walk_budget_grows_with_the_pickle(cli, monkeypatch, tmp_path):
    """Metadata of many small objects (a dataset index saved beside the weights) walks in steps
    proportional to its bytes: a larger pickle gets a larger budget, so no real file runs out."""
    import torch

    path = tmp_path / "meta.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "meta": [[i, i + 1] for i in range(3000)]}, path)
    monkeypatch.setattr(container, "WALK_BUDGET", 1000)
    r = cli("inspect", path, "--json")
    assert r.exit_code == 0, r.stderr[-500:]
    assert json.loads(r.stdout)["extras"]["meta"] == "list (3000 items)"
    monkeypatch.setattr(container, "WALK_PER_BYTE", 0)
    _refused(cli, "inspect", path, match="more than 1,000 steps")


# ----------------------------------------------------------------------------- globs

def _zoo(tmp_path: Path) -> Path:
    zoo = tmp_path / "zoo"
    (zoo / "sub" / ".hidden").mkdir(parents=True)
    for rel in ("a.pt", "sub/b.pt", "sub/.hidden/c.pt"):
        _pt(zoo, ckpt(), rel)
    (zoo / "sub" / "notes.txt").write_text("x")
    return zoo


def test_globs_never_follow_symlinked_folders(tmp_path):
    """Two links to "." made `zoo/**/*.pt` list zoo/l1/l2/l1/... without end; the folder form never
    followed them, and the glob now matches what it matches."""
    zoo = _zoo(tmp_path)
    os.symlink(".", zoo / "l1")
    os.symlink(".", zoo / "l2")
    os.symlink("..", zoo / "sub" / "up")
    rows = {}
    for arg in (f"{zoo}/**/*.pt", str(zoo)):
        r = subprocess.run([sys.executable, "-m", "cli.main", "inspect", arg, "--json"], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-500:]
        rows[arg] = sorted(Path(json.loads(line)["path"]).relative_to(zoo).as_posix() for line in r.stdout.splitlines())
    assert rows[f"{zoo}/**/*.pt"] == rows[str(zoo)] == ["a.pt", "sub/b.pt"]


@pytest.mark.parametrize("pattern", ["**/*.pt", "*", "**", "*/*.pt", "**/", "*/", "sub/.*/*.pt", "**/*.p?", "[as]*"])
def test_globs_match_what_glob_matches_without_links(tmp_path, monkeypatch, pattern):
    zoo = _zoo(tmp_path)
    monkeypatch.chdir(tmp_path)
    for p in (pattern, f"zoo/{pattern}", f"{zoo}/{pattern}"):
        assert sorted(zoo_module.glob_paths(p)) == sorted(glob.glob(p, recursive=True)), p
