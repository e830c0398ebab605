"""Matching two checkpoints that hold the same weights: pairs and dim orders confirmed bit for bit,
and the written rules taking A onto B through `surgery remap`."""

from __future__ import annotations

import pytest
import torch

import surgery

from .helpers import CONV1D, gpt2_conv1d, gpt2_linear, resnet18_state, scramble


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_conv1d_against_linear_detects_every_transpose_by_value(tmp_path):
    a = gpt2_conv1d()
    b = gpt2_linear(a)
    rep = surgery.match(a, b)
    assert rep.complete and rep.values_compared
    assert rep.confirmed == len(b)
    pairs = {p.a: p for p in rep.pairing.pairs}
    assert {k for k, p in pairs.items() if p.dims} == {k for k in a if CONV1D.search(k)}
    assert all(p.dims == (1, 0) and p.b == f"transformer.{k}" for k, p in pairs.items() if p.dims)
    # the square c_proj ([8, 8]) has B's shape as it is: only its values say it is transposed
    assert pairs["h.0.attn.c_proj.weight"].dims == (1, 0)
    # one transpose per Conv1D weight of every block, as the shipped gpt2-conv1d-to-linear profile does
    assert [o.to_json() for o in rep.rules.ops if o.kind != "rename"] == [
        {"transpose": {"match": rf"^transformer\.h\.\d+\.{m}\.weight$", "dims": [0, 1]}}
        for m in (r"attn\.c_attn", r"attn\.c_proj", r"mlp\.c_fc", r"mlp\.c_proj")]
    torch.save(a, tmp_path / "a.pt")
    surgery.remap(tmp_path / "a.pt", tmp_path / "b.safetensors", rep.rules)
    assert _same(surgery.open(tmp_path / "b.safetensors").state_dict(), b)


def test_a_permute_of_four_dims_is_found_by_value():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, 3, 4, 5, generator=g)
    a = {"w": w, "u": torch.randn(2, 3, 4, 5, generator=g)}
    b = {"kernel": w.permute(2, 3, 1, 0).contiguous(), "other": a["u"].clone()}
    rep = surgery.match(a, b)
    assert rep.complete
    got = {p.b: (p.a, p.dims) for p in rep.pairing.pairs}  # kernel[i, j, k, l] == w[l, k, i, j]
    assert got == {"kernel": ("w", (2, 3, 1, 0)), "other": ("u", None)}
    assert [o.to_json() for o in rep.rules.ops if o.kind == "permute"] == [{"permute": {"match": "^kernel$",
                                                                                     "dims": [2, 3, 1, 0]}}]


def test_values_pick_the_partner_names_cannot():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, generator=g), torch.randn(4, generator=g)
    rep = surgery.match({"x.weight": x, "y.weight": y}, {"p.weight": y.clone(), "q.weight": x.clone()})
    assert rep.complete
    assert {p.a: p.b for p in rep.pairing.pairs} == {"y.weight": "p.weight", "x.weight": "q.weight"}
    assert plan_after(rep) == {"x.weight": "q.weight", "y.weight": "p.weight"}


def test_equal_values_and_no_structure_stay_ambiguous():
    z = torch.zeros(4)
    a = {"x.bias": z, "y.bias": z.clone(), "z.bias": z.clone()}  # sorted by name: no module order either
    rep = surgery.match(a, {"p.bias": z.clone(), "q.bias": z.clone(), "o.bias": z.clone()})
    assert not rep.complete
    assert rep.pairing.ambiguous == [(["p.bias", "q.bias", "o.bias"], ["x.bias", "y.bias", "z.bias"])]
    assert rep.rules.ops == []


@pytest.mark.slow  # a real resnet18 (46 MB) written twice, read, matched and remapped: seconds
def test_scrambled_resnet18_remaps_back_bit_for_bit(tmp_path):
    sd = resnet18_state(meta=False)
    torch.save({scramble(k): v for k, v in sd.items()}, tmp_path / "a.pt")
    torch.save(sd, tmp_path / "b.pt")
    rep = surgery.match(tmp_path / "a.pt", tmp_path / "b.pt", out=tmp_path / "rules.yaml")
    assert rep.complete and rep.confirmed == len(sd)
    surgery.remap(tmp_path / "a.pt", tmp_path / "out.safetensors", tmp_path / "rules.yaml")
    back = surgery.open(tmp_path / "out.safetensors").state_dict()
    assert _same(dict(sorted(back.items())), dict(sorted(sd.items())))


def plan_after(rep) -> dict:
    from surgery.remapping import plan_names

    return plan_names([p.a for p in rep.pairing.pairs], rep.rules.ops).mapping


def test_swapped_names_are_renamed_through_a_first_pass():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(3, generator=g), torch.randn(3, generator=g)
    rep = surgery.match({"enc.w": x, "dec.w": y}, {"enc.w": y.clone(), "dec.w": x.clone()})
    assert rep.complete
    assert plan_after(rep) == {"enc.w": "dec.w", "dec.w": "enc.w"}
    assert rep.rules.ops[-1].to_json() == {"rename": ["^match_tmp_", ""]}


def test_a_whole_leaf_of_unused_keys_is_one_drop():
    a = {"bn.weight": torch.ones(2), "bn.num_batches_tracked": torch.tensor(0),
         "bn2.weight": torch.full((2,), 2.0), "bn2.num_batches_tracked": torch.tensor(0)}
    b = {"norm.weight": torch.ones(2), "norm2.weight": torch.full((2,), 2.0)}
    rep = surgery.match(a, b)
    assert rep.complete and rep.pairing.unused == ["bn.num_batches_tracked", "bn2.num_batches_tracked"]
    assert rep.rules.ops[0].to_json() == {"drop": r"(^|\.)num_batches_tracked$"}
    assert plan_after(rep) == {"bn.weight": "norm.weight", "bn2.weight": "norm2.weight"}


def test_a_reorder_pattern_is_widened_only_where_it_matches_exactly_those_keys():
    g = torch.Generator().manual_seed(4)
    a = {f"h.{i}.w": torch.randn(3, 3, generator=g) for i in range(3)}
    b = {"h.0.w": a["h.0.w"].t().contiguous(), "h.1.w": a["h.1.w"].t().contiguous(), "h.2.w": a["h.2.w"].clone()}
    rep = surgery.match(a, b)  # h.\d+.w would transpose h.2.w too
    assert [o.to_json() for o in rep.rules.ops] == [{"transpose": {"match": rf"^h\.{i}\.w$", "dims": [0, 1]}}
                                                    for i in (0, 1)]
    b["h.2.w"] = b["h.2.w"].t().contiguous()
    assert [str(o) for o in surgery.match(a, b).rules.ops] == [r"--transpose '^h\.\d+\.w$:0,1'"]


def test_odd_key_names_survive_the_rules_file(tmp_path):
    from surgery.remapping import plan_names

    g = torch.Generator().manual_seed(5)
    names = ["a: b.w", "#c.'q'.w", 'd"=>e.w', "f\\g.w"]
    a = {n: torch.randn(2, generator=g) for n in names}
    b = {f"new {i}.w": v.clone() for i, v in enumerate(a.values())}
    for out in ("rules.yaml", "rules.json"):
        rep = surgery.match(a, b, out=tmp_path / out)
        assert rep.complete
        rules = surgery.Rules.from_file(tmp_path / out)
        assert plan_names(names, rules.ops).mapping == {n: f"new {i}.w" for i, n in enumerate(names)}
