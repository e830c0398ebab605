"""`surgery merge`: each method against its published definition, written here as plain tensor math on
the stacked inputs (the command streams one input at a time); parameters and inputs refused in one
line before anything is written. The comparison with mergekit is in test_merge_mergekit.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import surgery
from surgery.merging.methods import dare_generator, keep_mask

TOL = dict(rtol=0, atol=1e-12)  # float64 in, float64 out: only the order of the sums differs


def _models(n: int = 3, dtype=torch.float64, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """A base and ``n`` fine-tunes of it (small task vectors, mixed signs)."""
    g = torch.Generator().manual_seed(seed)
    base = {"fc.weight": torch.randn(6, 5, generator=g, dtype=torch.float64), "fc.bias": torch.randn(6, generator=g,
            dtype=torch.float64), "bn.num_batches_tracked": torch.tensor(7)}
    out = [base]
    for i in range(n):
        out.append({k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64) if v.is_floating_point()
                    else v + i + 1 for k, v in base.items()})
    return [{k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()} for sd in out]


def _save(tmp_path, sds) -> list:
    paths = [tmp_path / f"{'base' if i == 0 else f'm{i}'}.safetensors" for i in range(len(sds))]
    for p, sd in zip(paths, sds):
        save_file(sd, p)
    return paths


def _merge(tmp_path, sds, method, base: bool = True, **kw) -> dict[str, torch.Tensor]:
    """Merge ``sds[1:]`` onto ``sds[0]`` (or, ``base=False``, all of ``sds``) and read the result."""
    paths = _save(tmp_path, sds)
    out = tmp_path / f"{method}.safetensors"
    if base:
        surgery.merge(paths[1:], out, method, base=paths[0], force=True, **kw)
    else:
        surgery.merge(paths, out, method, force=True, **kw)
    return load_file(out)


def _check(got, want):
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        torch.testing.assert_close(got[k], v, **TOL, msg=k)


def test_linear_is_the_weighted_mean(tmp_path):
    sds = _models()
    w = [1.0, 2.0, 0.5]
    want = {k: sum(wi * sd[k] for wi, sd in zip(w, sds[1:])) / sum(w) for k in ("fc.weight", "fc.bias")}
    got = _merge(tmp_path, sds[1:], "linear", base=False, weights=w)
    _check(got, want)
    assert int(got["bn.num_batches_tracked"]) == 8  # the first input's (there is no base)


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_adds_lambda_times_the_weighted_task_vectors(tmp_path, normalize):
    """Ilharco et al. 2023: theta = theta_base + lambda * sum_i w_i (theta_i - theta_base); a negative
    weight subtracts a task."""
    sds = _models()
    w, lam = [1.0, -0.5, 0.25], 0.7
    want = {}
    for k in ("fc.weight", "fc.bias"):
        tau = sum(wi * (sd[k] - sds[0][k]) for wi, sd in zip(w, sds[1:]))
        want[k] = sds[0][k] + lam * (tau / sum(w) if normalize else tau)
    got = _merge(tmp_path, sds, "task-arithmetic", weights=w, lam=lam, normalize=normalize)
    _check(got, want)
    assert int(got["bn.num_batches_tracked"]) == 7  # the base's


def _ties_reference(base, models, density, lam=1.0):
    """Yadav et al. 2023, with equal weights: trim each task vector to its top-k magnitudes, elect the
    sign of the sum, average the values that agree with it (the disjoint mean)."""
    taus = torch.stack([m - base for m in models]).reshape(len(models), -1)
    k = max(1, int(density * taus.shape[1]))
    trimmed = torch.zeros_like(taus)
    for i, tau in enumerate(taus):
        top = tau.abs().topk(k).indices
        trimmed[i, top] = tau[top]
    elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).to(taus.dtype)
    agree = torch.sign(trimmed) == elected
    count = agree.sum(0)
    mean = (trimmed * agree).sum(0) / count.clamp_min(1)
    return base + lam * mean.reshape(base.shape)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_trims_elects_the_sign_and_takes_the_disjoint_mean(tmp_path, density):
    sds = _models(4)
    want = {k: _ties_reference(sds[0][k], [sd[k] for sd in sds[1:]], density, lam=1.2)
            for k in ("fc.weight", "fc.bias")}
    _check(_merge(tmp_path, sds, "ties", density=density, lam=1.2), want)


def test_ties_by_hand(tmp_path):
    """Four elements, three task vectors, density 0.5: each keeps its two largest magnitudes."""
    taus = [[1.0, -2.0, 0.5, 3.0], [-3.0, 1.0, 0.2, 2.0], [2.0, 1.5, -0.1, -1.0]]
    # trimmed: [0, -2, 0, 3], [-3, 0, 0, 2], [2, 1.5, 0, 0]; sums [-1, -0.5, 0, 5] elect [-, -, +, +];
    # agreeing values: [-3], [-2], none, [3, 2] -> means [-3, -2, 0, 2.5]
    sds = [{"w": torch.zeros(4, dtype=torch.float64)}] + [{"w": torch.tensor(t, dtype=torch.float64)} for t in taus]
    got = _merge(tmp_path, sds, "ties", density=0.5)
    assert got["w"].tolist() == [-3.0, -2.0, 0.0, 2.5]
    assert _merge(tmp_path, sds, "ties", density=0.5, normalize=False)["w"].tolist() == [-3.0, -2.0, 0.0, 5.0]
    # equal magnitudes: the first by index are kept, so the trim is reproducible
    one = [{"w": torch.zeros(5, dtype=torch.float64)},
           {"w": torch.tensor([0.5, 1.0, -1.0, 1.0, -1.0], dtype=torch.float64)}]
    assert _merge(tmp_path, one, "ties", density=0.4)["w"].tolist() == [0.0, 1.0, -1.0, 0.0, 0.0]


def test_dare_drops_with_p_1_minus_density_and_rescales_by_1_over_density(tmp_path):
    """Yu et al. 2023: tau~ = m * tau / density with m ~ Bernoulli(density), then task arithmetic. The mask
    is surgery's seeded draw, fixed here to check the arithmetic exactly."""
    sds = _models(2)
    density, w, lam, seed = 0.3, [1.0, 0.5], 0.9, 11
    want = {}
    for k in ("fc.weight", "fc.bias"):
        tau = 0
        for i, (wi, sd) in enumerate(zip(w, sds[1:])):
            m = keep_mask(sds[0][k].shape, density, dare_generator(seed, i, k))
            tau = tau + wi * m * (sd[k] - sds[0][k]) / density
        want[k] = sds[0][k] + lam * tau
    _check(_merge(tmp_path, sds, "dare", density=density, weights=w, lam=lam, seed=seed), want)


def test_dare_keeps_a_density_fraction_unbiased_and_reproducibly(tmp_path):
    g = torch.Generator().manual_seed(3)
    base = torch.zeros(200, 100, dtype=torch.float64)
    tau = torch.rand(200, 100, generator=g, dtype=torch.float64) + 0.5
    sds = [{"w": base}, {"w": tau}]
    density, n = 0.1, tau.numel()
    got = _merge(tmp_path, sds, "dare", density=density, seed=5)["w"]
    kept = got != 0
    sigma = math.sqrt(density * (1 - density) / n)
    assert abs(kept.float().mean().item() - density) < 5 * sigma  # Bernoulli(density) per element
    torch.testing.assert_close(got[kept], tau[kept] / density, rtol=1e-15, atol=0)
    # E[tau~] = tau: the sum over the tensor is preserved within the draw's noise
    ratio = got.sum().item() / tau.sum().item()
    assert abs(ratio - 1) < 5 * math.sqrt((1 - density) / (density * n)) * 1.2
    again = _merge(tmp_path, sds, "dare", density=density, seed=5)["w"]
    other = _merge(tmp_path, sds, "dare", density=density, seed=6)["w"]
    assert torch.equal(got, again) and not torch.equal(got, other)


def test_dare_l1_and_no_rescale(tmp_path):
    sds = _models(1)
    k, d = "fc.weight", 0.5
    m = keep_mask(sds[0][k].shape, d, dare_generator(0, 0, k))
    tau = sds[1][k] - sds[0][k]
    none = _merge(tmp_path, sds, "dare", density=d, rescale="none")[k]
    torch.testing.assert_close(none, sds[0][k] + m * tau, **TOL)
    l1 = _merge(tmp_path, sds, "dare", density=d, rescale="l1")[k]
    kept = m * tau
    torch.testing.assert_close(l1, sds[0][k] + kept * tau.abs().sum() / kept.abs().sum(), **TOL)


def _slerp_reference(v0, v1, t):
    """Shoemake 1985 on the flattened tensors; linear interpolation when nearly colinear."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    cos = torch.clamp(a @ b / (a.norm() * b.norm()), -1, 1)
    if cos.abs() > 0.9995:
        return (1 - t) * v0 + t * v1
    omega = torch.arccos(cos)
    return (torch.sin((1 - t) * omega) * v0 + torch.sin(t * omega) * v1) / torch.sin(omega)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_follows_the_great_circle(tmp_path, t):
    sds = _models(1)
    sds[1]["fc.bias"] = sds[0]["fc.bias"] * 2.0  # colinear: the linear fallback
    got = _merge(tmp_path, sds, "slerp", t=t)
    want = {k: _slerp_reference(sds[0][k], sds[1][k], t) for k in ("fc.weight", "fc.bias")}
    _check(got, want)
    torch.testing.assert_close(got["fc.bias"], sds[0]["fc.bias"] * (1 + t), **TOL)
    if t in (0.0, 1.0):
        assert torch.equal(got["fc.weight"], sds[int(t)]["fc.weight"])


def test_slerp_of_orthogonal_unit_vectors_stays_on_the_circle(tmp_path):
    sds = [{"v": torch.tensor([1.0, 0.0], dtype=torch.float64)}, {"v": torch.tensor([0.0, 1.0], dtype=torch.float64)}]
    got = _merge(tmp_path, sds, "slerp", base=False, t=1 / 3)["v"]
    torch.testing.assert_close(got, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)], dtype=torch.float64),
                               **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_and_single_precision_are_merged_in_float64_and_cast_back(tmp_path, dtype):
    sds = _models(2, dtype=dtype)
    got = _merge(tmp_path, sds, "ties", density=0.5)
    for k in ("fc.weight", "fc.bias"):
        want = _ties_reference(sds[0][k].double(), [sd[k].double() for sd in sds[1:]], 0.5).to(dtype)
        assert got[k].dtype == dtype and torch.equal(got[k], want), k


def test_wrapper_prefixes_formats_and_json(tmp_path, cli):
    sds = _models(2, dtype=torch.float32)
    base, a, b = tmp_path / "base.pth", tmp_path / "a.safetensors", tmp_path / "b.ckpt"
    torch.save({"module." + k: v for k, v in sds[0].items()}, base)
    save_file(sds[1], a)
    torch.save({"state_dict": sds[2], "epoch": 1}, b)
    r = cli("merge", "--method", "task-arithmetic", "--base", base, a, b, "--lambda", "0.5", "--out",
            tmp_path / "ta.pt", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["schema"] == "surgery.merge/1" and data["method"] == "task-arithmetic"
    assert data["params"] == {"weights": [1.0, 1.0], "lambda": 0.5, "normalize": False}
    assert data["stripped_prefixes"] == ["module.", "", ""] and data["copied"] == ["bn.num_batches_tracked"]
    assert data["merged"] == 2 and data["base"] == str(base)
    got = torch.load(tmp_path / "ta.pt", weights_only=True)
    for k in ("fc.weight", "fc.bias"):
        want = (sds[0][k].double() + 0.5 * (sds[1][k].double() + sds[2][k].double() - 2 * sds[0][k].double())).float()
        assert torch.equal(got[k], want), k
    assert int(got["bn.num_batches_tracked"]) == 7
    r = cli("merge", "--method", "ties", "--base", base, a, b, "--density", "0.5", "--out", tmp_path / "t.safetensors")
    assert r.exit_code == 0 and "(stripped module.)" in r.output and "ties (weights 1,1, density 0.5" in r.output


@pytest.mark.parametrize("args, said", [
    (["--method", "ties", "--density", "0.5"], "ties needs --base"),
    (["--method", "ties", "--base", "B"], "ties needs --density"),
    (["--method", "dare", "--base", "B", "--density", "0"], "--density 0 is outside (0, 1]"),
    (["--method", "ties", "--base", "B", "--density", "1.5"], "--density 1.5 is outside (0, 1]"),
    (["--method", "slerp", "--t", "1.2"], "--t 1.2 is outside [0, 1]"),
    (["--method", "slerp", "--base", "B"], "slerp interpolates exactly two checkpoints"),
    (["--method", "linear", "--base", "B"], "linear takes no --base"),
    (["--method", "linear", "--density", "0.5", "--seed", "1"], "--density does not apply to linear; --seed"),
    (["--method", "task-arithmetic", "--base", "B", "--weights", "1"], "1 weights for 2 models"),
    (["--method", "task-arithmetic", "--base", "B", "--rescale", "l1"], "--rescale does not apply"),
    (["--method", "dare", "--base", "B", "--density", "0.5", "--rescale", "l2"], "--rescale 'l2'"),
    (["--method", "soup"], "choose one of linear, task-arithmetic, ties, dare, slerp"),
    (["--method", "linear", "--weights", "1,-1"], "must not sum to zero"),
    (["--method", "linear", "--weights", "1,x"], "numbers separated by commas"),
])
def test_bad_parameters_are_one_line_before_anything_is_written(tmp_path, cli, args, said):
    paths = _save(tmp_path, _models(2))
    args = [str(paths[0]) if a == "B" else a for a in args]
    out = tmp_path / "out.safetensors"
    r = cli("merge", *args, paths[1], paths[2], "--out", out)
    assert r.exit_code == 2 and said in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not out.exists()


def test_slerp_refuses_three_and_mismatched_inputs_are_listed_in_one_line(tmp_path, cli):
    sds = _models(2)
    paths = _save(tmp_path, sds)
    out = tmp_path / "out.safetensors"
    r = cli("merge", "--method", "slerp", *paths, "--out", out)
    assert r.exit_code == 2 and "got 3" in r.output and not out.exists()
    before = paths[0].read_bytes()
    r = cli("merge", "--method", "task-arithmetic", "--base", paths[0], paths[1], "--out", paths[0], "--force")
    assert r.exit_code == 2 and "destination is the source" in r.output and paths[0].read_bytes() == before
    bad = dict(sds[2])
    bad["fc.weight"] = torch.zeros(7, 5, dtype=torch.float64)
    del bad["fc.bias"]
    save_file(bad, paths[2])
    r = cli("merge", "--method", "ties", "--base", paths[0], paths[1], paths[2], "--density", "0.5", "--out", out)
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "cannot merge: 2 disagreements" in r.output and "[7, 5]" in r.output and "'fc.bias'" in r.output
    assert not out.exists()


def test_a_sparse_tensor_in_any_input_is_refused_not_only_in_the_first(tmp_path, cli):
    torch.save({"w": torch.eye(3)}, tmp_path / "dense.pt")
    torch.save({"w": torch.eye(3).to_sparse()}, tmp_path / "sparse.pt")
    out = tmp_path / "m.pt"
    r = cli("merge", "--method", "ties", "--base", tmp_path / "dense.pt", tmp_path / "dense.pt", tmp_path / "sparse.pt",
            "--density", "0.5", "--out", out)
    assert r.exit_code == 2 and "'w' is a sparse coo tensor in sparse.pt; `surgery remap --densify` first" in r.output, r.output
    assert not out.exists()
