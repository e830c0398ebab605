"""Tensor ops in remap: transpose, permute, reshape, rope_permute; shapes planned, inverses, round trips."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import surgery
from surgery.errors import OutputError, RuleError
from surgery.remapping import Op, Rules, apply_rules
from surgery.remapping.tensor_ops import Step, apply_steps, undo_steps


def _rope_reference(t, heads, direction):
    """torchtune's convert_weights._permute, written out: hf_to_tune (HF -> Meta's layout) views
    (heads, 2, head_dim // 2, dim), tune_to_hf (Meta -> HF) views (heads, head_dim // 2, 2, dim)."""
    rows, dim = t.shape
    head_dim = rows // heads
    pair = (2, head_dim // 2) if direction == "hf-to-meta" else (head_dim // 2, 2)
    return t.view(heads, *pair, dim).transpose(1, 2).reshape(head_dim * heads, dim)


@pytest.fixture
def src(tmp_path):
    torch.manual_seed(0)
    sd = {"h.0.attn.c_attn.weight": torch.randn(4, 12), "h.0.attn.c_attn.bias": torch.randn(12),
          "cube": torch.randn(2, 3, 4), "pos": torch.randn(6, 4), "q": torch.randn(16, 8), "k": torch.randn(8, 8)}
    path = tmp_path / "src.safetensors"
    save_file(sd, path)
    return path, sd


OPS = [Op("transpose", r"c_attn\.weight$", "0,1"), Op("permute", "^cube$", (2, 0, 1)), Op("reshape", "^pos$", "1,-1,4"),
       Op("rope_permute", "^q$", "4,hf-to-meta"), Op("rope_permute", "^k$", "2,hf-to-meta")]


def _expected(sd):
    return {"h.0.attn.c_attn.weight": sd["h.0.attn.c_attn.weight"].t(), "h.0.attn.c_attn.bias": sd["h.0.attn.c_attn.bias"],
            "cube": sd["cube"].permute(2, 0, 1), "pos": sd["pos"].reshape(1, 6, 4),
            "q": _rope_reference(sd["q"], 4, "hf-to-meta"), "k": _rope_reference(sd["k"], 2, "hf-to-meta")}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ""])
def test_ops_are_applied_verified_and_round_tripped(src, tmp_path, suffix):
    path, sd = src
    dst = tmp_path / f"out{suffix}"
    report = surgery.remap(path, dst, OPS, verify=True, verify_roundtrip=True, shard_size="1KB")
    assert report.verified and report.roundtrip == len(sd)
    out = surgery.open(dst).state_dict()
    for name, want in _expected(sd).items():
        assert out[name].shape == want.shape and torch.equal(out[name], want), name
    rows = {r.new: r for r in report.rows}
    assert rows["pos"].src_shape == (6, 4) and rows["pos"].shape == (1, 6, 4) and rows["q"].src_shape is None
    assert [o for o, n in report.op_counts] == [str(o) for o in OPS] and all(n == 1 for _, n in report.op_counts)


def test_shapes_are_planned_without_data(src, tmp_path):
    path, _ = src
    report = surgery.remap(path, tmp_path / "x.safetensors", OPS, dry_run=True)
    shapes = {t["new"]: (t["shape"], t.get("from_shape")) for t in report.to_json()["tensors"]}
    assert shapes["cube"] == ([4, 2, 3], [2, 3, 4]) and shapes["h.0.attn.c_attn.weight"] == ([12, 4], [4, 12])
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("op, message", [
    (Op("transpose", "^cube$", "0,3"), r"dim 3 is out of range for 'cube' of shape \[2, 3, 4\]"),
    (Op("permute", "^cube$", "1,0"), r"permute order 1,0 has 2 dims, 'cube' of shape \[2, 3, 4\] 3"),
    (Op("reshape", "^pos$", "5,-1"), r"reshape to \[5, -1\] does not fit 'pos' of shape \[6, 4\] \(24 elements\)"),
    (Op("reshape", "^pos$", "2,2"), r"does not fit 'pos'"),
    (Op("rope_permute", "^q$", "3,hf-to-meta"), r"3 heads needs rows divisible .* 'q' of shape \[16, 8\] has 16 rows"),
    (Op("rope_permute", "^k$", "8,meta-to-hf"), r"even head size"),
])
def test_shape_refusals_are_one_line_and_write_nothing(src, tmp_path, op, message):
    path, _ = src
    dst = tmp_path / "out.safetensors"
    with pytest.raises(RuleError, match=message) as e:
        surgery.remap(path, dst, [op])
    assert "\n" not in str(e.value) and "nothing was written" in str(e.value) and not dst.exists()


@pytest.mark.parametrize("args", [("transpose", "x", "0"), ("transpose", "x", "a,b"), ("permute", "x", "0,0"),
                                  ("reshape", "x", "-1,-1"), ("reshape", "x", "-2"), ("rope_permute", "x", "4"),
                                  ("rope_permute", "x", "0,hf-to-meta"), ("rope_permute", "x", "4,sideways"),
                                  ("transpose", "(", "0,1"), ("reshape", "x", "0,1000000000000000000,1000000000000000000"),
                                  ("reshape", "x", "0,-1,99999999999999999999")])
def test_bad_parameters_are_refused_when_the_op_is_made(args):
    with pytest.raises(RuleError):
        Op(*args)


def test_inverses_undo_each_op():
    torch.manual_seed(1)
    t = torch.randn(8, 6)
    assert Op("transpose", "w", "1,0").inverse() == Op("transpose", "w", "1,0")
    assert Op("permute", "w", "2,0,1").inverse() == Op("permute", "w", "1,2,0")
    assert Op("rope_permute", "w", "2,hf-to-meta").inverse() == Op("rope_permute", "w", "2,meta-to-hf")
    assert Op("reshape", "w", "-1").inverse((8, 6)) == Op("reshape", "w", "8,6")
    with pytest.raises(RuleError, match="needs the shape"):
        Op("reshape", "w", "-1").inverse()
    with pytest.raises(RuleError, match="no inverse op: a rename is undone by a rename back"):
        Op("drop", "w").inverse()
    steps = (Step("rope_permute", (2, "hf-to-meta"), (8, 6), (8, 6)), Step("transpose", (0, 1), (8, 6), (6, 8)),
             Step("reshape", (48,), (6, 8), (48,)))
    assert torch.equal(undo_steps(apply_steps(t, steps).contiguous(), steps), t)
    x = torch.randn(2, 3, 4)
    assert torch.equal(x.permute(2, 0, 1).permute(*Op("permute", "w", "2,0,1").inverse().params), x)


def test_roundtrip_failure_names_the_tensors(src, tmp_path, monkeypatch):
    from surgery.remapping import roundtrip

    path, _ = src
    monkeypatch.setattr(roundtrip, "undo_steps", lambda t, steps: t)  # an inverse that undoes nothing
    with pytest.raises(OutputError, match=r"not bit-exact for 3 tensors: 'cube', 'h\.0\.attn\.c_attn\.weight', 'pos'"):
        surgery.remap(path, tmp_path / "o.safetensors", OPS[:3], verify_roundtrip=True)


def test_roundtrip_refuses_one_way_conversions_before_writing(src, tmp_path):
    path, _ = src
    dst = tmp_path / "o.safetensors"
    with pytest.raises(RuleError, match=r"6 tensors are converted one way: 'cube' \(F32 -> BF16\); .* \(and 2 more\)\. Nothing was written"):
        surgery.remap(path, dst, [Op("dtype", "bf16")], verify_roundtrip=True)
    assert not dst.exists()


def test_roundtrip_in_place(src, tmp_path):
    path, sd = src
    report = surgery.remap(path, path, OPS, in_place=True, verify=True, verify_roundtrip=True)
    assert report.roundtrip == len(sd) and torch.equal(load_file(path)["cube"], sd["cube"].permute(2, 0, 1))


def test_tied_names_with_different_ops_are_two_tensors(tmp_path):
    w = torch.arange(6.0).reshape(2, 3)
    torch.save({"a": w, "b": w, "c": w}, tmp_path / "tied.pt")
    for dst in (tmp_path / "t.safetensors", tmp_path / "t.pt"):
        report = surgery.remap(tmp_path / "tied.pt", dst, [Op("transpose", "^a$", "0,1")], verify=True, verify_roundtrip=True)
        out = surgery.open(dst).state_dict()
        assert torch.equal(out["a"], w.t()) and torch.equal(out["b"], w) and torch.equal(out["c"], w)
        assert {r.new: r.alias_of for r in report.rows} == {"a": None, "b": None, "c": "b"}


def test_sparse_and_scaled_fp8_tensors_are_refused(tmp_path):
    torch.save({"sp": torch.eye(3).to_sparse()}, tmp_path / "sp.pt")
    with pytest.raises(RuleError, match="'sp' is a sparse_coo tensor, which tensor ops do not reorder; add --densify"):
        surgery.remap(tmp_path / "sp.pt", tmp_path / "o.pt", [Op("transpose", "sp", "0,1")])
    out = surgery.remap(tmp_path / "sp.pt", tmp_path / "o.safetensors", [Op("densify"), Op("transpose", "sp", "0,1")],
                        verify=True)
    assert out.verified
    fp8 = {"l.weight": torch.randn(4, 4).to(torch.float8_e4m3fn), "l.weight_scale_inv": torch.ones(1, 1)}
    save_file(fp8, tmp_path / "fp8.safetensors")
    with pytest.raises(RuleError, match="an FP8 tensor with a scale beside it.*--dequantize"):
        surgery.remap(tmp_path / "fp8.safetensors", tmp_path / "o2.safetensors", [Op("transpose", "weight$", "0,1")])


def test_in_memory_apply_rules_keeps_ties():
    w = torch.randn(4, 6)
    sd = {"a": w, "b": w, "c": torch.randn(3)}
    out = apply_rules(sd, [Op("rename", "^a$", "x"), Op("transpose", "^(x|b)$", "0,1")])
    assert torch.equal(out["x"], w.t()) and out["x"] is out["b"] and out["c"] is sd["c"]
    with pytest.raises(RuleError, match="dim 2 is out of range for 'c'"):
        apply_rules(sd, [Op("transpose", "^c$", "0,2")])


def test_rules_file_forms_and_command_line(src, tmp_path, cli):
    path, sd = src
    rules = tmp_path / "r.yaml"
    rules.write_text("ops:\n  - transpose: {match: 'c_attn\\.weight$', dims: [0, 1]}\n  - reshape: '^pos$:24'\n")
    assert Rules.from_file(rules).ops == [Op("transpose", r"c_attn\.weight$", "0,1"), Op("reshape", "^pos$", "24")]
    dst = tmp_path / "o.safetensors"
    r = cli("remap", path, dst, "--rules", rules, "--rope-permute", "^q$:4,hf-to-meta", "--permute=^cube$:1,0,2",
            "--verify", "--verify-roundtrip", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["roundtrip_verified"] == len(sd) and report["verified"]
    assert [o["op"] for o in report["ops"]] == ["--transpose 'c_attn\\.weight$:0,1'", "--reshape '^pos$:24'",
                                                "--rope-permute '^q$:4,hf-to-meta'", "--permute '^cube$:1,0,2'"]
    out = load_file(dst)
    assert torch.equal(out["q"], _rope_reference(sd["q"], 4, "hf-to-meta")) and out["pos"].shape == (24,)


@pytest.mark.parametrize("args, message", [
    (["--transpose", "no-colon"], "needs the form 'REGEX:ARGS'"),
    (["--reshape", "^pos$:7"], "reshape to [7] does not fit 'pos'"),
    (["--rope-permute", "^q$:4,up"], "rope_permute takes HEADS,DIRECTION"),
])
def test_command_line_refusals(src, tmp_path, cli, args, message):
    path, _ = src
    r = cli("remap", path, tmp_path / "o.safetensors", *args)
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "o.safetensors").exists()


def test_rules_file_refuses_a_wrong_form(tmp_path):
    with pytest.raises(RuleError, match=r"op #1: rope_permute takes \{match: REGEX, heads: N"):
        Rules.from_json({"ops": [{"rope_permute": {"match": "q", "heads": "4"}}]})


@pytest.mark.parametrize("src_name", ["dcp_dir", "per_rank_dir", "lightning_ckpt"])
def test_ops_on_every_kind_of_source(make, tmp_path, src_name):
    """Sharded, DCP and ranks' chunks (assembled, then reordered) all stream through the ops."""
    src = make(src_name)
    sd = surgery.open(src).state_dict()
    name = next(k for k, v in sd.items() if v.dim() == 2)
    op = Op("transpose", "^" + name.replace(".", r"\.") + "$", "0,1")
    for fmt in ("safetensors", "pt", "dcp"):
        dst = tmp_path / f"out-{fmt}"
        report = surgery.remap(src, dst, [op], verify=True, verify_roundtrip=True, format=fmt)
        assert report.roundtrip == len(sd) and torch.equal(surgery.open(dst).state_dict()[name], sd[name].t())


def test_head_sizes_are_compared_within_one_attention_module(tmp_path):
    """Two towers with other head sizes are fine; q and k of one module with two sizes are refused."""
    sd = {f"{tower}.attn.{p}.weight": torch.randn(rows, 4) for tower, rows in (("text", 16), ("vision", 12))
          for p in ("q_proj", "k_proj")}
    save_file(sd, tmp_path / "two.safetensors")
    ok = [Op("rope_permute", r"^text\.attn\.[qk]_proj", "4,hf-to-meta"),
          Op("rope_permute", r"^vision\.attn\.[qk]_proj", "2,hf-to-meta")]
    assert surgery.remap(tmp_path / "two.safetensors", tmp_path / "o.safetensors", ok, verify_roundtrip=True).roundtrip == 4
    wrong = [Op("rope_permute", r"^text\.attn\.q_proj", "4,hf-to-meta"), Op("rope_permute", r"^text\.attn\.k_proj", "2,hf-to-meta")]
    with pytest.raises(RuleError, match=r"'text\.attn\.k_proj\.weight' head size 8 \(16 rows / 2 heads\) but "
                                        r"'text\.attn\.q_proj\.weight' head size 4"):
        surgery.remap(tmp_path / "two.safetensors", tmp_path / "o2.safetensors", wrong)
