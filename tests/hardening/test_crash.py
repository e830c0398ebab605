"""Crash safety: SIGKILL mid-write, a full disk, two writers racing. DST is absent or complete.

Every test runs the real CLI (``python -m cli.main``) in a subprocess on a ~160 MB checkpoint. The
SIGKILL test aims its kills at a write in flight (DST's temp file exists and is growing; the process
is stopped, checked and killed) and counts how many landed mid-write. Temp files (``.NAME.*.tmp``)
that a SIGKILL leaves behind are reported, and must match surgery's own naming pattern; DST itself
is never partial.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import surgery
from tests import REPO

N_TENSORS, ROWS, COLS = 32, 1024, 1280  # 32 x 5.2 MB = 168 MB
CLI = [sys.executable, "-m", "cli.main"]
# SIGKILL, full-disk and racing-writer runs on a 168 MB file: the slow tier (`pytest -m slow`)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> dict[str, Path]:
    from fixtures.generate import make_large_checkpoint

    d = tmp_path_factory.mktemp("big")
    return {"safetensors": make_large_checkpoint(d / "big.safetensors", "safetensors", N_TENSORS, ROWS, COLS),
            "pt": make_large_checkpoint(d / "big.pt", "pt", N_TENSORS, ROWS, COLS)}


def _check_complete(dst: Path) -> None:
    """DST opens and holds every tensor, each filled with its index (so never a mix of two writers)."""
    ckpt = surgery.open(dst)
    assert len(ckpt.tensors) == N_TENSORS, sorted(ckpt.tensors)[:3]
    for name, t in ckpt.tensors.items():
        i = int(name.split(".")[-2])
        data = ckpt.read_bytes(name)
        assert len(data) == ROWS * COLS * (2 if t.dtype in ("BF16", "F16") else 4)
        want = ckpt.tensor(name) if t.dtype != "F32" else None
        if want is None:
            import struct

            assert data[:4] == struct.pack("<f", float(i)) and data[-4:] == data[:4]
            assert hashlib.sha256(data).digest() == hashlib.sha256(data[:4] * (ROWS * COLS)).digest()
        else:
            assert bool((want == i).all())


def _state(folder: Path, dst: Path) -> tuple[bool, list[str]]:
    temps = sorted(p for p in os.listdir(folder) if p.startswith(f".{dst.name}.") and p.endswith((".tmp", ".old")))
    others = sorted(p for p in os.listdir(folder) if p.startswith(".") and p not in temps)
    assert not others, f"unexpected hidden files {others}"
    return dst.exists(), temps


def _kill_at(args: list[str], delay: float, watch: Path | None, dst: Path) -> int | None:
    """Start the CLI, wait for ``watch``'s folder to show a temp file (if given), then SIGKILL after
    ``delay`` seconds. Returns the exit status if the process finished first."""
    proc = subprocess.Popen(CLI + args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    if watch is not None:
        while time.monotonic() - t0 < 60 and proc.poll() is None:
            if any(p.startswith(f".{dst.name}.") for p in os.listdir(watch)):
                break
            time.sleep(0.002)
    time.sleep(delay)
    rc = proc.poll()
    proc.kill()
    proc.wait()
    return rc


def _temp_bytes(folder: Path, dst: Path) -> int | None:
    """Bytes written so far into DST's temp file or folder; None while there is none."""
    total = None
    for e in os.scandir(folder):
        if e.name.startswith(f".{dst.name}.") and e.name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                total = (total or 0) + (sum(f.stat().st_size for f in os.scandir(e.path)) if e.is_dir()
                                        else e.stat().st_size)
    return total


def _kill_mid_write(args: list[str], folder: Path, dst: Path, at_bytes: int) -> tuple[int | None, bool]:
    """SIGKILL the CLI once DST's temp holds ``at_bytes``. Returns (exit status if it finished
    first, whether the kill landed mid-write: temp present, growing, DST not yet renamed)."""
    proc = subprocess.Popen(CLI + args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    seen = 0
    while time.monotonic() - t0 < 120 and proc.poll() is None:
        n = _temp_bytes(folder, dst)
        if n is not None and n >= at_bytes and n > seen > 0 and not dst.exists():
            proc.send_signal(signal.SIGSTOP)  # freeze it, then look again: the kill lands exactly here
            n2 = _temp_bytes(folder, dst)
            mid = n2 is not None and n2 > 0 and not dst.exists()
            proc.kill()
            proc.wait()
            return None, mid
        seen = n or 0
        time.sleep(0.0005)
    rc = proc.wait()
    return rc, False


REMAP_CASES = {
    "safetensors copy": ("safetensors", "o.safetensors", ["--auto"], 168 << 20),
    "cast to bf16": ("safetensors", "o.safetensors", ["--auto", "--dtype", "bf16"], 84 << 20),
    "sharded folder": ("safetensors", "o_sharded", ["--auto", "--shard-size", "40MB"], 168 << 20),
    "torch zip out": ("pt", "o.pt", ["--auto"], 168 << 20),
}


@pytest.mark.parametrize("case", sorted(REMAP_CASES))
def test_sigkill_remap_leaves_dst_absent_or_complete(big, tmp_path, case, record_property):
    """Kills aimed at a write in flight (the temp exists and is growing) leave DST absent and the
    temp named as surgery names it. Most aimed kills must land mid-write, or the test proves
    nothing."""
    src_kind, name, extra, size = REMAP_CASES[case]
    outcomes, mid_write = [], 0
    for frac in (0.15, 0.5, 0.85):
        folder = tmp_path / f"m{len(outcomes)}"
        folder.mkdir()
        dst = folder / name
        rc, mid = _kill_mid_write(["remap", str(big[src_kind]), str(dst), *extra], folder, dst, int(size * frac))
        exists, temps = _state(folder, dst)
        if mid:
            mid_write += 1
            assert not exists and temps, f"killed mid-write at {frac:.0%}, yet DST exists or no temp is left"
        elif exists:
            _check_complete(dst)
        outcomes.append((frac, "mid-write" if mid else "missed", "complete" if exists else "absent", len(temps)))
    record_property("outcomes", outcomes)
    print(case, outcomes)
    assert mid_write >= 2, f"only {mid_write} of 3 aimed kills landed mid-write: {outcomes}"


def test_sigkill_adapt_leaves_out_absent_or_complete(make, tmp_path):
    src = make("resnet18_pt")
    outcomes = []
    for delay in (0.0, 0.05, 0.2, 0.6):
        folder = tmp_path / f"a{len(outcomes)}"
        folder.mkdir()
        out = folder / "adapted"
        _kill_at(["adapt", str(src), "--arch", "resnet18", "--num-classes", "3", "--out", str(out)], delay, folder, out)
        exists, temps = _state(folder, out)
        if exists:
            from surgery.adapter.manifest import read_manifest

            assert {"model.safetensors", "manifest.json", "load_report.json"} <= set(os.listdir(out))
            read_manifest(out)
            assert len(surgery.open(out / "model.safetensors").tensors) > 100
        outcomes.append((delay, "complete" if exists else "absent", len(temps)))
    print("adapt", outcomes)


def _limit_fsize(nbytes: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return pre


@pytest.mark.parametrize("case", sorted(REMAP_CASES))
def test_disk_full_remap(big, tmp_path, case):
    src_kind, name, extra, _ = REMAP_CASES[case]
    dst = tmp_path / name
    r = subprocess.run(CLI + ["remap", str(big[src_kind]), str(dst), *extra], cwd=REPO, capture_output=True,
                       text=True, preexec_fn=_limit_fsize(4 << 20), timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    err = r.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "cannot write" in err or "too large" in err.lower(), err
    assert not dst.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_disk_full_adapt(make, tmp_path):
    out = tmp_path / "adapted"
    r = subprocess.run(CLI + ["adapt", str(make("resnet18_pt")), "--arch", "resnet18", "--num-classes", "3",
                              "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                       preexec_fn=_limit_fsize(4 << 20), timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    err = r.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


@pytest.mark.parametrize("name", ["o.safetensors", "o_sharded"])
def test_two_remaps_racing_to_one_dst(big, tmp_path, name):
    dst = tmp_path / name
    for round_ in range(2):
        args = ["remap", str(big["safetensors"]), str(dst), "--auto", "--force", "--shard-size", "60MB"]
        procs = [subprocess.Popen(CLI + args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
        for rc, err in results:
            assert rc == 0 or (rc == 2 and err.count("\n") == 1), (rc, err)
        assert any(rc == 0 for rc, _ in results), results
        _check_complete(dst)
        assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], os.listdir(tmp_path)
