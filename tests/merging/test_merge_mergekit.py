"""`surgery merge` against mergekit's output on a tiny LlamaForCausalLM (float64, so both compute in
float64). The outputs mergekit produced are committed under data/mergekit/ (made by
data/make_mergekit_reference.py, whose docstring says how); the live test reruns mergekit where it
is installed.

What matches and how closely:
- linear, task_arithmetic (plain and normalized), ties (equal and unequal weights, lambda), slerp
  (including a colinear tensor, the linear fallback): within 1e-14 absolute (2.2e-16 measured,
  the order of float64 sums).
- dare: mergekit draws its mask with torch.bernoulli, surgery from a generator seeded per
  (seed, model, tensor), so the masks differ. With surgery's mask substituted into mergekit's
  kernel, the kept elements are the same and the values agree within 4e-7 of each delta
  (mergekit's CPU path rounds the delta to float32: 2.1e-7 measured); surgery's ``--rescale l1``
  is mergekit's rescale, ``--rescale none`` its rescale=false. On mergekit's own run, both keep a
  fraction of elements within 4 sigma of the density and preserve each tensor's l1 norm.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import surgery

DATA = Path(__file__).parent / "data" / "mergekit"
DENSITY = 0.4  # as in the make script
# mergekit case -> surgery.merge arguments; inputs by name: base, a, b
CASES = {
    "linear": (["a", "b", "base"], dict(method="linear", weights=[1.0, 3.0, 0.5])),
    "task_arithmetic": (["a", "b"], dict(method="task-arithmetic", base="base", weights=[1.0, -0.5], lam=0.8)),
    "task_arithmetic_normalized": (["a", "b"], dict(method="task-arithmetic", base="base", weights=[2.0, 1.0],
                                                    normalize=True)),
    "ties": (["a", "b"], dict(method="ties", base="base", density=DENSITY)),
    "ties_weighted": (["a", "b"], dict(method="ties", base="base", density=DENSITY, weights=[0.7, 0.2], lam=1.3)),
    "slerp": (["a"], dict(method="slerp", base="base", t=0.3)),
}
FIXED_MASK = {"dare_l1_fixed_mask": "l1", "dare_none_fixed_mask": "none"}


def _ours(folder: Path, tmp_path: Path, case: str) -> dict[str, torch.Tensor]:
    models, kw = CASES[case]
    kw = dict(kw)
    method = kw.pop("method")
    if "base" in kw:
        kw["base"] = folder / "inputs" / f"{kw['base']}.safetensors"
    out = tmp_path / f"{case}.safetensors"
    surgery.merge([folder / "inputs" / f"{m}.safetensors" for m in models], out, method, **kw)
    return load_file(out)


def _dare(folder: Path, tmp_path: Path, rescale: str, name: str) -> dict[str, torch.Tensor]:
    inputs = folder / "inputs"
    out = tmp_path / f"{name}.safetensors"
    surgery.merge([inputs / "a.safetensors"], out, "dare", base=inputs / "base.safetensors", density=DENSITY,
                  rescale=rescale, seed=0)
    return load_file(out)


def _compare(folder: Path, tmp_path: Path) -> None:
    for case in CASES:
        got, want = _ours(folder, tmp_path, case), load_file(folder / f"{case}.safetensors")
        assert sorted(got) == sorted(want), case
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-14, msg=f"{case}: {k}")
    base = load_file(folder / "inputs" / "base.safetensors")
    for name, rescale in FIXED_MASK.items():
        got, want = _dare(folder, tmp_path, rescale, name), load_file(folder / f"{name}.safetensors")
        for k in want:
            assert torch.equal(got[k] == base[k], want[k] == base[k]), f"{name}: {k} keeps other elements"
            assert ((got[k] - want[k]).abs() <= 4e-7 * (want[k] - base[k]).abs()).all(), f"{name}: {k}"
    _dare_statistics(folder, tmp_path)


def _dare_statistics(folder: Path, tmp_path: Path) -> None:
    """mergekit's own DARE run (its random mask) and surgery's: the kept fraction and the l1 norm."""
    base, a = (load_file(folder / "inputs" / f"{n}.safetensors") for n in ("base", "a"))
    theirs, ours = load_file(folder / "dare_linear.safetensors"), _dare(folder, tmp_path, "l1", "dare_stats")
    n = sum(v.numel() for v in base.values())
    sigma = math.sqrt(DENSITY * (1 - DENSITY) / n)
    for merged in (theirs, ours):
        kept = sum(int((merged[k] != base[k]).sum()) for k in base) / n
        assert abs(kept - DENSITY) < 4 * sigma, kept
        for k in base:
            l1, after = (a[k] - base[k]).abs().sum(), (merged[k] - base[k]).abs().sum()
            assert abs(after - l1) <= 1e-6 * l1, k


def test_surgery_matches_the_committed_mergekit_outputs(tmp_path):
    _compare(DATA, tmp_path)


@pytest.mark.slow
def test_surgery_matches_mergekit_run_now(tmp_path):
    pytest.importorskip("mergekit")
    from tests.merging.data.make_mergekit_reference import make

    make(tmp_path / "ref")
    _compare(tmp_path / "ref", tmp_path)
