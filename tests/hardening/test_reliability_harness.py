"""The reliability harness (bench/reliability.py) counts what it claims to count: a worker that
stalls is killed and counted as hung, one that dies is counted as crashed, the next worker starts
after the lost input, and memory figures come from the worker."""

from __future__ import annotations

import subprocess
import sys

from bench.reliability import Chunk, _follow, render, run_chunk


def _fake_worker(tmp_path, body: str) -> tuple[Chunk, subprocess.Popen]:
    """A process that speaks the worker's protocol as ``body`` says, followed by the harness."""
    chunk = Chunk("rules", 0, 5, 10, tmp_path / "w")
    proc = subprocess.Popen([sys.executable, "-c", body], stdout=subprocess.PIPE, bufsize=0)
    return chunk, proc


BASE = "print('base 1000 600 400 0.5 1', flush=True); print('#5', flush=True); print('=ok 1500 1100 700 0.75', flush=True);"


def test_a_stalled_input_is_killed_counted_and_skipped(tmp_path):
    chunk, proc = _fake_worker(tmp_path, BASE + "print('#6', flush=True); import time; time.sleep(60)")
    hung, cpu = _follow(proc, 0.5, chunk.line, busy=lambda: chunk.current is not None,
                        sample=lambda: chunk.sample(proc.pid))
    assert hung and proc.returncode == -9 and cpu >= 0
    assert chunk.lost(hung, proc.returncode, tmp_path / "none", 3.75) == 7  # the next starts after input 6
    assert chunk.tally["hung"] == 1 and chunk.tally["ok"] == 1
    assert chunk.problems == [{"i": 6, "outcome": "hung", "detail": "worker exit -9 after 3.0 s of CPU in the input"}]


def test_a_worker_that_dies_mid_input_is_a_crash(tmp_path):
    chunk, proc = _fake_worker(tmp_path, BASE + "print('#6', flush=True); import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    hung, _ = _follow(proc, 30, chunk.line, busy=lambda: chunk.current is not None, sample=lambda: None)
    assert not hung and proc.returncode == -11
    assert chunk.lost(hung, proc.returncode, tmp_path / "none", 1.0) == 7
    assert chunk.tally["crashed"] == 1


def test_memory_figures_come_from_the_worker_lines(tmp_path):
    chunk, proc = _fake_worker(tmp_path, BASE + "print('end 0.7', flush=True)")
    _follow(proc, 30, chunk.line, busy=lambda: chunk.current is not None, sample=lambda: None)
    m = chunk.mem
    assert (m["base_rss"], m["base_anon"], m["base_file"]) == (1000, 600, 400)
    assert (m["peak_hwm"], m["peak_anon"], m["rise"], m["rise_i"]) == (1500, 700, 500, 5)
    assert chunk.ended and chunk.segment_end == 0.7
    assert chunk.slowest == (0.25, 5)  # CPU 0.5 at 'base', 0.75 after input 5


def test_a_real_chunk_runs_and_renders(tmp_path):
    """Three inputs of the rules class through a real worker, and the report made from them."""
    r = run_chunk("rules", 0, 0, 3, tmp_path / "w-rules-0", stall_s=60)
    assert sum(r["tally"].values()) == 3 and r["workers"] == 1
    m = r["mem_kb"]
    assert m["base_anon"] > 0 and m["base_file"] > 0 and m["peak_anon"] >= m["base_anon"]
    assert r["cpu_inputs_s"] > 0 and r["cpu_setup_s"] > r["cpu_inputs_s"]

    class Args:
        inputs, seed, jobs, stall, chunk, fs, classes, torch = 3, 0, 1, 10.0, 2500, "tmpfs", ["rules"], "torch 2"

    doc = render([r], Args, 60.0, 1.0, [("GLOBAL os.system", "refused")])
    assert "--inputs 3 --seed 0 --jobs 1 --stall 10 --classes rules" in doc
    assert "| rules | 3 |" in doc and "peak RssAnon" in doc and "| GLOBAL os.system | refused |" in doc


def test_an_input_spinning_on_the_cpu_is_hung_however_loaded_the_machine(tmp_path):
    """The stall clock leaves out time spent waiting for a CPU, never time spent computing."""
    chunk, proc = _fake_worker(tmp_path, BASE + "print('#6', flush=True)\nwhile True: pass")
    hung, cpu = _follow(proc, 0.5, chunk.line, busy=lambda: chunk.current is not None, sample=lambda: None)
    assert hung and proc.returncode == -9 and cpu > 0


def test_a_refusal_is_refused_and_anything_else_is_a_crash():
    from bench.reliability import outcome_of
    from surgery.errors import SurgeryError

    assert outcome_of(SurgeryError("not a checkpoint")) == ("refused", "")
    assert outcome_of(ValueError("boom"))[0] == "crashed"
    assert outcome_of(SurgeryError(""))[0] == "crashed"


def test_a_real_chunk_of_generated_attacks_has_no_crash(tmp_path):
    """Generated attacks go through the same outcome rules as the parsers: none crashes a worker."""
    r = run_chunk("memo", 0, 0, 3, tmp_path / "w-memo-0", stall_s=60)
    assert r["tally"]["crashed"] == 0 and r["tally"]["refused"] == 3 and r["workers"] == 1


def test_lying_dcp_chunks_are_refused_or_read_never_crash(tmp_path):
    """DCP folders whose .metadata moves, resizes, drops or repeats chunks: one worker, no crash."""
    r = run_chunk("dcp-chunks", 0, 0, 12, tmp_path / "w-dcp-0", stall_s=60)
    assert sum(r["tally"].values()) == 12 and r["workers"] == 1
    assert r["tally"]["crashed"] == r["tally"]["hung"] == r["tally"]["partial"] == r["tally"]["marker"] == 0, r
    assert r["tally"]["refused"] > 0
