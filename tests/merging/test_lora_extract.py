"""`surgery extract-lora`: the truncated SVD of each delta (its residual is the Eckart-Young bound,
computed here from the singular values), written as a peft adapter that merge-lora folds back into
TUNED within that residual; what a LoRA cannot carry is listed."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import surgery
from tests import REPO

DATA = REPO / "tests" / "merging" / "data"


def _pair(tmp_path, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"fc.weight": torch.randn(12, 10, generator=g), "fc.bias": torch.randn(12, generator=g),
            "conv.weight": torch.randn(6, 3, 3, 3, generator=g), "same.weight": torch.randn(4, 4, generator=g),
            "norm.weight": torch.ones(12), "bn.num_batches_tracked": torch.tensor(3)}
    tuned = dict(base)
    tuned["fc.weight"] = base["fc.weight"] + torch.randn(12, 10, generator=g) * 0.1  # full rank
    tuned["conv.weight"] = base["conv.weight"] + torch.randn(6, 3, 3, 3, generator=g) * 0.1
    tuned["fc.bias"] = base["fc.bias"] + 1
    tuned["norm.weight"] = base["norm.weight"] * 2
    tuned["bn.num_batches_tracked"] = torch.tensor(9)
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    return base, tuned


def _bound(d: torch.Tensor, r: int) -> float:
    s = torch.linalg.svdvals(d.double())
    return float(s[r:].norm() / s.norm())


def test_residual_is_the_truncated_svd_bound_and_merge_gives_it_back(tmp_path, cli):
    base, tuned = _pair(tmp_path)
    r = cli("extract-lora", tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", "--rank", "3",
            "--out", tmp_path / "lora", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["schema"] == "surgery.extract-lora/1" and data["unchanged"] == 1
    res = {f["name"]: f["residual"] for f in data["factored"]}
    assert res.keys() == {"fc.weight", "conv.weight"}
    for k in res:
        d = tuned[k] - base[k]
        assert abs(res[k] - _bound(d.flatten(1), 3)) < 1e-5, k
    assert {n["name"] for n in data["not_representable"]} == {"fc.bias", "norm.weight", "bn.num_batches_tracked"}
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], sorted(cfg["target_modules"])) == (3, 3, ["conv", "fc"])
    ad = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert ad["base_model.model.conv.lora_A.weight"].shape == (3, 3, 3, 3)
    assert ad["base_model.model.conv.lora_B.weight"].shape == (6, 3, 1, 1)
    surgery.merge_lora(tmp_path / "base.safetensors", tmp_path / "lora", tmp_path / "back.safetensors")
    back = load_file(tmp_path / "back.safetensors")
    for k in res:
        d = tuned[k] - base[k]
        assert abs(float((back[k] - base[k] - d).norm() / d.norm()) - res[k]) < 1e-4, k
    for k in ("fc.bias", "norm.weight", "same.weight"):
        assert torch.equal(back[k], base[k]), k  # not carried: the base's


def test_a_rank_above_a_tensors_size_keeps_its_full_rank_through_rank_pattern(tmp_path):
    _pair(tmp_path)
    rep = surgery.extract_lora(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "lora", rank=16)
    assert {f.name: f.rank for f in rep.factored} == {"fc.weight": 10, "conv.weight": 6}
    assert max(f.residual for f in rep.factored) < 1e-5
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {"^fc": 10, "^conv": 6} == cfg["alpha_pattern"]


def test_peft_adapters_come_back_from_their_merge(tmp_path):
    """extract(base, peft's merge) at the adapter's rank, merged back: peft's merge within 1e-5, for
    embeddings (--embedding) and GPT-2's Conv1D (--fan-in-fan-out) too."""
    for case, base, extra in (("lora_net", "base.safetensors", {"embeddings": ["emb.weight"]}),
                              ("lora_gpt2", "base", {"fan_in_fan_out": True})):
        want = load_file(DATA / case / "merged.safetensors")
        out = tmp_path / case
        surgery.extract_lora(DATA / case / base, DATA / case / "merged.safetensors", out, rank=4, **extra)
        surgery.merge_lora(DATA / case / base, out, tmp_path / f"{case}.safetensors")
        got = load_file(tmp_path / f"{case}.safetensors")
        for k, v in want.items():
            if k.endswith(".weight"):
                assert torch.allclose(got[k], v, rtol=0, atol=1e-5), (case, k)


@pytest.mark.parametrize("change, said", [
    (lambda t: None, "differs from"),
    (lambda t: t.update({"fc.weight": torch.zeros(3, 10)}), "[12, 10] in base.safetensors but F32 [3, 10]"),
    (lambda t: t.pop("fc.bias"), "'fc.bias' is only in base.safetensors"),
])
def test_refusals_before_any_write(tmp_path, cli, change, said):
    base, _ = _pair(tmp_path)
    tuned = dict(base)
    change(tuned)
    save_file(tuned, tmp_path / "tuned.safetensors")
    r = cli("extract-lora", tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", "-r", "2", "-o", tmp_path / "lora")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and said in r.output, r.output
    assert not (tmp_path / "lora").exists()


def test_a_rank_below_one_and_a_non_finite_delta(tmp_path, cli):
    base, tuned = _pair(tmp_path)
    r = cli("extract-lora", tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", "-r", "0", "-o", tmp_path / "lora")
    assert r.exit_code == 2 and "--rank 0" in r.output, r.output
    tuned["conv.weight"] = tuned["conv.weight"].clone()
    tuned["conv.weight"][0, 0, 0, 0] = float("nan")
    save_file(tuned, tmp_path / "tuned.safetensors")
    rep = surgery.extract_lora(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "lora", rank=2)
    assert rep.not_representable["conv.weight"] == "its delta holds NaN or inf"
    assert [f.name for f in rep.factored] == ["fc.weight"]


def test_text_output(tmp_path, cli):
    _pair(tmp_path)
    r = cli("extract-lora", tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", "-r", "2", "-o", tmp_path / "lora")
    assert r.exit_code == 0, r.output
    assert "  conv.weight  rank 2, residual " in r.output and ", conv" in r.output
    assert "  not carried: fc.bias (1-D (a bias or a norm)); merging keeps the base's" in r.output
    assert "2 tensors factored at rank 2" in r.output and "1 unchanged, 3 not carried" in r.output


def test_a_small_tensors_rank_pattern_does_not_reach_a_module_ending_in_its_name(tmp_path):
    """peft matches a rank_pattern key against the end of each module path: an unanchored `fc`
    would give `body.fc` fc's smaller rank, and the adapter would load in neither peft nor merge-lora."""
    g = torch.Generator().manual_seed(0)
    base = {"fc.weight": torch.randn(4, 6, generator=g), "body.fc.weight": torch.randn(6, 6, generator=g)}
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    rep = surgery.extract_lora(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "lora", rank=5)
    assert {f.name: f.rank for f in rep.factored} == {"fc.weight": 4, "body.fc.weight": 5}
    surgery.merge_lora(tmp_path / "base.safetensors", tmp_path / "lora", tmp_path / "m.safetensors")
    back = load_file(tmp_path / "m.safetensors")
    assert torch.allclose(back["fc.weight"], tuned["fc.weight"], atol=1e-5)


def test_a_sparse_tensor_is_refused_with_the_remap_flag_that_densifies_it(tmp_path, cli):
    base, tuned = _pair(tmp_path)
    torch.save({**base, "extra": torch.eye(3).to_sparse()}, tmp_path / "base.pt")
    torch.save({**tuned, "extra": (2 * torch.eye(3)).to_sparse()}, tmp_path / "tuned.pt")
    r = cli("extract-lora", tmp_path / "base.pt", tmp_path / "tuned.pt", "--rank", 2, "--out", tmp_path / "lora")
    assert r.exit_code == 2 and "'extra' is a sparse coo tensor in base.pt; `surgery remap --densify`" in r.output, r.output
    assert not (tmp_path / "lora").exists()
