"""Matching by shapes and key structure alone: B an architecture built on the meta device."""

from __future__ import annotations

import pytest

import surgery
from surgery.remapping import plan_names

from .helpers import resnet18_state, scramble


def test_scrambled_resnet18_is_matched_back_exactly():
    sd = resnet18_state(meta=True)
    renamed = {scramble(k): v for k, v in sd.items()}
    assert set(renamed).isdisjoint(sd)  # every name differs
    rep = surgery.match(renamed, "resnet18")
    assert rep.complete and rep.b_kind == "architecture"
    assert {p.a: p.b for p in rep.pairing.pairs} == {scramble(k): k for k in sd}
    assert all(p.dims is None for p in rep.pairing.pairs)
    # the rules take every scrambled name back to its own, as remap plans it
    assert plan_names(list(renamed), rep.rules.ops).mapping == {scramble(k): k for k in sd}
    assert len(rep.rules.ops) < len(sd) / 2  # a module at a time, not a key at a time


def test_timm_resnet18_has_torchvisions_keys():
    """What is true of these two: the same names, shapes and dtypes, the head included (fc)."""
    pytest.importorskip("timm")
    rep = surgery.match(resnet18_state(meta=True), "timm:resnet18")
    assert rep.complete
    assert all(p.a == p.b and p.evidence == "name" for p in rep.pairing.pairs)
    assert rep.rules.ops == []


def test_a_head_of_other_classes_is_missing_and_unused():
    sd = resnet18_state(meta=True)
    import torch

    sd["fc.weight"], sd["fc.bias"] = torch.empty(10, 512, device="meta"), torch.empty(10, device="meta")
    rep = surgery.match(sd, "resnet18")
    assert not rep.complete
    assert rep.pairing.missing == ["fc.weight", "fc.bias"]
    assert rep.pairing.unused == ["fc.weight", "fc.bias"] == rep.dropped
    assert [o.to_json() for o in rep.rules.ops] == [{"drop": r"^fc\.weight$"}, {"drop": r"^fc\.bias$"}]


def test_tied_candidates_are_reported_not_guessed():
    import torch

    a = {"x.weight": torch.empty(4, device="meta"), "y.weight": torch.empty(4, device="meta"),
         "proj.weight": torch.empty(3, 4, device="meta")}
    b = {"p.weight": torch.empty(4, device="meta"), "q.weight": torch.empty(4, device="meta"),
         "out.weight": torch.empty(3, 4, device="meta")}
    rep = surgery.match(a, b)
    assert not rep.complete
    assert rep.pairing.ambiguous == [(["p.weight", "q.weight"], ["x.weight", "y.weight"])]
    assert [(p.a, p.b) for p in rep.pairing.pairs] == [("proj.weight", "out.weight")]
    assert plan_names(list(a), rep.rules.ops).mapping == {"x.weight": "x.weight", "y.weight": "y.weight",
                                                          "proj.weight": "out.weight"}


def test_numbers_break_ties_between_blocks():
    import torch

    def blocks(fmt):
        return {fmt.format(i=i, leaf=leaf): torch.empty(4, device="meta") for i in range(3) for leaf in ("w", "b")}

    rep = surgery.match(blocks("enc.layers.{i}.{leaf}"), blocks("blocks_{i}.{leaf}"))
    assert rep.complete
    assert {p.a: p.b for p in rep.pairing.pairs} == {f"enc.layers.{i}.{x}": f"blocks_{i}.{x}"
                                                     for i in range(3) for x in ("w", "b")}


def test_a_wrapper_prefix_is_one_rename():
    sd = resnet18_state(meta=True)
    rep = surgery.match({f"module.{k}": v for k, v in sd.items()}, "resnet18")
    assert rep.complete
    assert [o.to_json() for o in rep.rules.ops] == [{"rename": [r"^module\.", ""]}]
