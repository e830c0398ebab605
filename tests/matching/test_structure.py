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

    a = {"proj.weight": torch.empty(3, 4, device="meta"), "x.weight": torch.empty(4, device="meta"),
         "y.weight": torch.empty(4, device="meta")}  # sorted by name, as safetensors stores keys: no order
    b = {"p.weight": torch.empty(4, device="meta"), "q.weight": torch.empty(4, device="meta"),
         "out.weight": torch.empty(3, 4, device="meta")}
    rep = surgery.match(a, b)
    assert not rep.complete
    assert rep.pairing.ambiguous == [(["p.weight", "q.weight"], ["x.weight", "y.weight"])]
    assert [(p.a, p.b) for p in rep.pairing.pairs] == [("proj.weight", "out.weight")]
    assert plan_names(list(a), rep.rules.ops).mapping == {"proj.weight": "out.weight", "x.weight": "x.weight",
                                                          "y.weight": "y.weight"}


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


def _meta(names, shape=(4,)):
    import torch

    return {n: torch.empty(*shape, device="meta") for n in names}


def test_module_order_breaks_ties_unless_the_keys_are_sorted_by_name():
    b = _meta(["x.w", "a.w", "m.w"])
    rep = surgery.match(_meta(["stem.w", "body.w", "norm.w"]), b)  # both in the order the modules were built
    assert rep.complete
    assert [(p.a, p.b, p.evidence) for p in rep.pairing.pairs] == [("stem.w", "x.w", "order"), ("body.w", "a.w", "order"),
                                                                  ("norm.w", "m.w", "order")]
    rep = surgery.match(_meta(["body.w", "norm.w", "stem.w"]), b)  # as safetensors stores them: no order to go by
    assert rep.pairing.ambiguous == [(["x.w", "a.w", "m.w"], ["body.w", "norm.w", "stem.w"])]


def test_names_without_numbers_are_not_alike_for_that():
    """``encoder.ln.bias`` and ``patch_embed.proj.bias`` both lack numbers, which makes them no more alike."""
    a = _meta(["stem.proj.bias", "encoder.layers.0.ln.bias", "encoder.ln.bias"])
    b = _meta(["patch_embed.proj.bias", "blocks.0.norm1.bias", "norm.bias"])
    rep = surgery.match(a, b)
    assert {p.a: p.b for p in rep.pairing.pairs} == {"stem.proj.bias": "patch_embed.proj.bias",
                                                     "encoder.layers.0.ln.bias": "blocks.0.norm1.bias",
                                                     "encoder.ln.bias": "norm.bias"}


@pytest.mark.slow  # two real models each, built and run on an image
@pytest.mark.parametrize("tv, tm", [("efficientnet_b0", "timm:efficientnet_b0"), ("vit_b_16", "timm:vit_base_patch16_224")])
def test_torchvision_weights_run_in_timms_model_after_the_match(tv, tm):
    """Other names, same layout: matched by structure and module order alone (B built on meta),
    the remapped weights give timm's model torchvision's outputs."""
    pytest.importorskip("timm")
    import torch

    from surgery.adapter.arch import build, resolve_arch
    from surgery.remapping import apply_rules

    torch.manual_seed(0)
    src = build(resolve_arch(tv)).eval()
    with torch.no_grad():
        for t in src.state_dict().values():  # every BatchNorm statistic distinct, so a wrong pair shows
            if t.is_floating_point():
                t.add_(torch.rand_like(t) * 0.01)
    rep = surgery.match(src.state_dict(), tm)
    assert rep.complete
    dst = build(resolve_arch(tm)).eval()
    dst.load_state_dict(apply_rules(src.state_dict(), rep.rules.ops), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=1e-4)  # attention kernels differ in rounding


def test_a_sharded_folder_gives_no_module_order(tmp_path):
    """Its reader lists keys shard by shard, each shard's sorted: an order, but not the model's."""
    import json

    import torch
    from safetensors.torch import save_file

    save_file({"stem.w": torch.randn(4)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"body.w": torch.randn(4), "norm.w": torch.randn(4)}, tmp_path / "model-00002-of-00002.safetensors")
    shard = {"stem.w": 1, "body.w": 2, "norm.w": 2}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f"model-0000{i}-of-00002.safetensors" for k, i in shard.items()}}))
    assert list(surgery.open(tmp_path).tensors) == ["stem.w", "body.w", "norm.w"]
    rep = surgery.match(tmp_path, _meta(["x.w", "a.w", "m.w"]))
    assert rep.pairing.ambiguous == [(["x.w", "a.w", "m.w"], ["body.w", "norm.w", "stem.w"])]
