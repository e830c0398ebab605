"""DeepSpeed ZeRO checkpoints written by real runs (torchrun, two ranks, gloo on the CPU:
fixtures/zero_save.py), consolidated by `surgery remap` and compared, tensor by tensor and bit for
bit, with DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint``; and the hand-written layout
the default tier uses, checked to be the one DeepSpeed writes. Slow tier: each run starts two ranks."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fixtures.zero_save import write_zero

# deepspeed is imported only by the tests that compare with it, not when the suite is collected
pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                                   reason="needs deepspeed: pip install --no-build-isolation deepspeed")]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``run(stage, dtype)``: the folder a real run saved, made once per module."""
    root = tmp_path_factory.mktemp("zero")
    done: dict[tuple[int, str], Path] = {}

    def _run(stage: int, dtype: str) -> Path:
        if (stage, dtype) not in done:
            out = root / f"zero{stage}_{dtype}"
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   str(ROOT / "fixtures" / "zero_save.py"), str(stage), dtype, str(out)]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stderr[-3000:]
            done[stage, dtype] = out
        return done[stage, dtype]

    return _run


def _reference(src: Path) -> dict[str, torch.Tensor]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed looks for an accelerator
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(src))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_real_zero_run_consolidates_as_deepspeeds_converter_does(tmp_path, cli, run, stage, dtype):
    src = run(stage, dtype)
    r = cli("inspect", src, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["format"] == "deepspeed-zero" and data["certificate"]["complete"]
    assert data["certificate"]["ranks"] == 2 and data["certificate"]["split"]
    out = tmp_path / "one.safetensors"
    r = cli("remap", src, out, "--verify")
    assert r.exit_code == 0, r.output
    got = load_file(out)
    with safe_open(out, "pt") as f:
        aliases = json.loads((f.metadata() or {}).get("surgery.aliases", "{}"))
    got.update({a: got[t] for a, t in aliases.items()})
    ref = _reference(src)
    assert sorted(got) == sorted(ref)
    for name in ref:
        assert got[name].dtype == ref[name].dtype and torch.equal(got[name], ref[name]), name


@pytest.mark.parametrize("stage", [2, 3])
def test_the_hand_written_layout_is_the_one_deepspeed_writes(tmp_path, run, stage):
    src = run(stage, "fp32")
    tag = src / "global_step2"
    ref = _reference(src)
    model = torch.load(sorted(tag.glob("*model_states.pt"))[0], weights_only=False)
    weights = [{k: ref[k] for k in group} for group in model["param_shapes"]]
    assert len(weights) == 2  # the run's two param groups
    frozen = {k: ref[k] for k in model["frozen_param_shapes"]}
    buffers = {k: ref[k] for k in model["buffer_names"]}
    fake = write_zero(tmp_path / "fake", stage, weights, buffers, ranks=2, frozen=frozen,
                      shared=model["shared_params"], tag="global_step2")
    # where the layout puts data, not padding (DeepSpeed leaves its stage 3 padding uninitialised)
    ones = write_zero(tmp_path / "ones", stage, [{k: torch.ones_like(v) for k, v in g.items()} for g in weights],
                      buffers, ranks=2, frozen={k: torch.ones_like(v) for k, v in frozen.items()}, tag="global_step2")
    key = "single_partition_of_fp32_groups" if stage < 3 else "fp32_flat_groups"
    for rank in range(2):
        name = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        real = torch.load(tag / name, weights_only=False)["optimizer_state_dict"][key]
        mine, data = (torch.load(f / "global_step2" / name, weights_only=True)["optimizer_state_dict"][key]
                      for f in (fake, ones))
        assert [t.shape for t in real] == [t.shape for t in mine], rank
        assert all(torch.equal(a[m != 0], b[m != 0]) for a, b, m in zip(real, mine, data)), rank
    if stage == 3:
        for rank in range(2):
            name = f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
            real = torch.load(tag / name, weights_only=False)["frozen_param_fragments"]
            mine, data = (torch.load(f / "global_step2" / name, weights_only=True)["frozen_param_fragments"]
                          for f in (fake, ones))
            assert list(real) == list(mine) and all(real[k].shape == mine[k].shape for k in real), rank
            assert all(torch.equal(real[k][data[k] != 0], mine[k][data[k] != 0]) for k in real), rank
