"""Group ops in remap: split, concat, stack, unstack; planned shapes, refusals, round trips, the ViT profiles."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import surgery
from surgery.errors import OutputError, RuleError
from surgery.remapping import Op, Rules, apply_rules, profile_rules

DOCS = Path(__file__).parents[2] / "docs" / "remap.md"
SPLIT_QKV = Op("split", r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", r"blocks.\1.attn.{q,k,v}.\2")
FUSE_QKV = Op("concat", r"^blocks\.(\d+)\.attn\.{q,k,v}\.(weight|bias)$", r"blocks.\1.attn.qkv.\2")
STACK = Op("stack", r"^experts\.{i}\.w1\.weight$", "experts.w1.weight")
UNSTACK = Op("unstack", r"^experts\.w1\.weight$", "experts.{i}.w1.weight")


def _sd(experts: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sd = {f"blocks.{i}.attn.qkv.weight": torch.randn(12, 4) for i in range(2)}
    sd.update({f"blocks.{i}.attn.qkv.bias": torch.randn(12) for i in range(2)})
    sd.update({f"experts.{i}.w1.weight": torch.randn(3, 4) for i in range(experts)})
    sd["cols"] = torch.randn(2, 6)
    return sd


@pytest.fixture
def src(tmp_path):
    sd = _sd()
    save_file(sd, tmp_path / "a.safetensors")
    return tmp_path / "a.safetensors", sd


FORWARD = [SPLIT_QKV, STACK, Op("split", "^cols$", "cols.{i}:1:sizes=1,2,3")]
BACKWARD = [FUSE_QKV, UNSTACK, Op("concat", r"^cols\.{i}$", "cols:1")]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ""])
def test_every_op_and_its_inverse_round_trip(src, tmp_path, suffix):
    path, sd = src
    dst = tmp_path / f"b{suffix}"
    report = surgery.remap(path, dst, FORWARD, verify=True, verify_roundtrip=True, shard_size="300B")
    assert report.roundtrip == len(sd) and report.dropped == 0 and report.kept == 12 + 1 + 3
    out = surgery.open(dst).state_dict()
    w = sd["blocks.1.attn.qkv.weight"]
    assert torch.equal(out["blocks.1.attn.q.weight"], w[:4]) and torch.equal(out["blocks.1.attn.v.weight"], w[8:])
    assert torch.equal(out["experts.w1.weight"], torch.stack([sd[f"experts.{i}.w1.weight"] for i in range(4)]))
    assert [tuple(out[f"cols.{i}"].shape) for i in range(3)] == [(2, 1), (2, 2), (2, 3)]
    assert torch.equal(out["cols.2"], sd["cols"][:, 3:])
    back = tmp_path / f"c{suffix}"
    report = surgery.remap(dst, back, BACKWARD, verify=True, verify_roundtrip=True)
    assert report.roundtrip == 16
    again = surgery.open(back).state_dict()
    assert sorted(again) == sorted(sd)
    assert all(torch.equal(again[k].view(torch.uint8), sd[k].view(torch.uint8)) for k in sd)


def test_shapes_are_planned_before_reading(src, tmp_path):
    path, _ = src
    report = surgery.remap(path, tmp_path / "x.safetensors", FORWARD, dry_run=True)
    tensors = {t["new"]: t for t in report.to_json()["tensors"] if t["new"]}
    assert tensors["experts.w1.weight"]["shape"] == [4, 3, 4] and tensors["blocks.0.attn.k.weight"]["shape"] == [4, 4]
    assert tensors["experts.w1.weight"]["group"] == {"op": "stack", "dim": 0,
                                                     "sources": [f"experts.{i}.w1.weight" for i in range(4)]}
    members = [t for t in report.to_json()["tensors"] if t.get("into") == "experts.w1.weight"]
    assert len(members) == 3 and report.dropped == 0 and not (tmp_path / "x.safetensors").exists()


def test_a_group_is_read_once_and_pieces_along_dim_0_are_byte_ranges(src, tmp_path, monkeypatch):
    """Streaming: a split's source is read once for all its pieces, a concat reads its members
    only; a piece along dim 0 of a tensor written as stored is copied as a byte range."""
    from surgery.checkpoint import Checkpoint
    from surgery.remapping import output

    path, sd = src
    reads: list[str] = []
    real = Checkpoint.tensor
    monkeypatch.setattr(Checkpoint, "tensor", lambda self, name: reads.append(name) or real(self, name))
    ranges = []
    real_source = output.source
    monkeypatch.setattr(output, "source", lambda *a, **k: ranges.append(real_source(*a, **k)) or ranges[-1])
    surgery.remap(path, tmp_path / "b.safetensors", FORWARD)
    assert sorted(reads) == ["cols"] + [f"experts.{i}.w1.weight" for i in range(4)]
    assert sum(isinstance(r, tuple) for r in ranges) == 12  # q, k, v of 2 weights and 2 biases


@pytest.mark.parametrize("ops, message", [
    ([Op("split", "^cols$", "cols.{i}:1:sizes=1,2,4")], r"sizes \[1, 2, 4\] add up to 7, but 'cols' of shape \[2, 6\] has 6 along dim 1"),
    ([Op("split", "^cols$", "cols.{a,b,c,d,e}:1")], r"'cols' of shape \[2, 6\] has 6 along dim 1, which does not split into 5 equal chunks"),
    ([Op("split", "^cols$", "cols.{a,b}:2")], r"dim 2 is out of range for 'cols' of shape \[2, 6\]"),
    ([Op("stack", r"^experts\.{i}\.w1\.weight$", "e:4")], r"dim 4 is out of range for 'experts\.0\.w1\.weight'"),
    ([Op("concat", r"^(cols|experts\.0\.w1\.weight)\.{a,b}$", "x")], None),  # matches nothing: no group, nothing refused
    ([Op("rename", r"^experts\.3\.", "experts.9."), STACK], r"'experts\.w1\.weight' lacks parts 3, 4, 5, 6, 7, 8 \(has 0, 1, 2, 9\)"),
    ([Op("rename", "^cols$", "experts.4.w1.weight"), STACK], r"'experts\.0\.w1\.weight' has shape \[3, 4\] but 'cols' \[2, 6\]; the tensors of one stack need one shape"),
    ([Op("concat", r"^blocks\.\d+\.attn\.qkv\.{weight,bias}$", "qkv")], r"two groups write 'qkv': 'blocks\.0\.attn\.qkv\.bias' and 'blocks\.1\.attn\.qkv\.bias' are both its part bias \(the name written needs the captures"),
    ([SPLIT_QKV, Op("split", r"^blocks\.0\.attn\.q\.weight$", "q.{a,b}")], r"'blocks\.0\.attn\.q\.weight' is made by an earlier split, concat, stack or unstack; a name is captured by one group op"),
    ([Op("split", "^cols$", "x.{a,b}"), Op("split", "^blocks.0.attn.qkv.bias$", "x.{a,b,c}")], r"rules map several keys to one name: 'the split of cols \(#0\)' and 'the split of blocks\.0\.attn\.qkv\.bias \(#0\)' -> 'x\.a'"),
    ([Op("transpose", r"qkv\.weight$", "0,1"), SPLIT_QKV], r"'blocks\.0\.attn\.qkv\.weight' is read by a split, concat, stack or unstack later; a tensor op applies to what a group op writes \(put it after the group op\)"),
    ([STACK, Op("transpose", r"^experts\.w1\.weight$", "0,3")], r"dim 3 is out of range for 'experts\.w1\.weight' of shape \[4, 3, 4\]"),
    ([Op("reshape", "^cols$", "999999999999999999,-1")], r"reshape to \[999999999999999999, -1\] does not fit 'cols'"),
    ([Op("unstack", r"^cols$", "c.{i}:1"), Op("split", "^x$", "y.{i}:0:chunks=3")], None),
    ([Op("unstack", r"^cols$", "c.{a,b}:1")], r"unstacking 'cols' of shape \[2, 6\] along dim 1 gives 6 tensors, not the 2 parts named"),
])
def test_hostile_rules_are_one_line_refusals_before_writing(src, tmp_path, cli, ops, message):
    path, _ = src
    dst = tmp_path / "out.safetensors"
    if message is None:  # the control: the same form, fitting rules, writes
        assert surgery.remap(path, dst, ops, verify=True).verified
        return
    with pytest.raises(RuleError, match=message) as e:
        surgery.remap(path, dst, ops)
    assert "\n" not in str(e.value) and "nothing was written" in str(e.value) and not dst.exists()
    r = cli("remap", path, dst, *[a for op in ops for a in shlex.split(str(op))])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and r.output.startswith("error: "), r.output
    assert not dst.exists()


def test_members_of_one_group_share_a_dtype(tmp_path):
    save_file({"e.0": torch.randn(2), "e.1": torch.randn(2).half()}, tmp_path / "m.safetensors")
    with pytest.raises(RuleError, match=r"'e\.0' is F32 but 'e\.1' is F16; the tensors of one group share a dtype"):
        surgery.remap(tmp_path / "m.safetensors", tmp_path / "o.safetensors", [Op("stack", r"^e\.{i}$", "e")])


def test_an_incomplete_moe_is_named(tmp_path):
    sd = {f"experts.{i}.w1.weight": torch.randn(2, 2) for i in range(8) if i != 3}
    save_file(sd, tmp_path / "moe.safetensors")
    with pytest.raises(RuleError, match=r"'experts\.w1\.weight' lacks part 3 \(has 0, 1, 2, 4, 5, 6 \.\.\.\)"):
        surgery.remap(tmp_path / "moe.safetensors", tmp_path / "o.safetensors", [STACK])
    # one expert named 99999999 is six missing ones named, not a hundred million listed
    with pytest.raises(RuleError, match=r"'e' lacks parts 1, 2, 3, 4, 5, 6 \(has 0, 99999999\)"):
        apply_rules({"e.0": torch.zeros(1), "e.99999999": torch.zeros(1)}, [Op("stack", r"^e\.{i}$", "e")])


def test_a_huge_unstack_is_refused(tmp_path):
    save_file({"w": torch.zeros(5000, 1)}, tmp_path / "w.safetensors")
    with pytest.raises(RuleError, match=r"unstacking 'w' of shape \[5000, 1\] along dim 0 gives 5000 tensors; from 1 to 4096"):
        surgery.remap(tmp_path / "w.safetensors", tmp_path / "o.safetensors", [Op("unstack", "^w$", "w.{i}")])


@pytest.mark.parametrize("args, message", [
    (("split", "x", "y"), r"split: 'y' needs one placeholder"),
    (("concat", "x", "y"), r"concat: 'x' needs one placeholder"),
    (("split", "x", "y.{q,q}"), "names a part twice"),
    (("split", "x", "y.{a,b}:0:sizes=1"), r"split into 2 parts \{a,b\} takes 2 sizes, not 1"),
    (("split", "x", "y.{i}"), r"split into \{i\} needs sizes=A,B,\.\.\. or chunks=N"),
    (("split", "x", "y.{i}:0:chunks=99999"), "at most 4096"),
    (("split", "x", "y.{a,b}:0:sizes=1,-2"), r"size must be from 1 to 2\*\*62, not '-2'"),
    (("split", "x", "y.{a,b}:0:sizes=1," + "9" * 30), r"size must be from 1 to 2\*\*62"),
    (("stack", r"x{1,2}", "y"), r"needs one placeholder, \{q,k,v\} \(the parts, in order: names, not numbers\)"),
    (("split", "x", "y.{a,b}:1e9"), "dim must be an integer"),
    (("split", "x", "y.{a,b}:999"), "dim 999 is out of range for any tensor"),
    (("stack", r"x\.{i}", "y.{i}"), r"stack takes its placeholder in the names read \(its regex\) only"),
    (("concat", r"x\.{i}", "y:0:sizes=1,2"), "only split takes sizes"),
    (("split", "(x", "y.{a,b}"), "not a valid regex"),
    (("split", "x", r"\1.{a,b}"), "invalid group reference 1"),
    (("split", "x", {"into": "y.{a,b}", "dims": 0}), r"split takes \{match: REGEX, into:"),
    (("reshape", "x", "1," * 100_000 + "-1"), "reshape takes at most 64 dims"),
    (("stack", r"(?P<surgery_index>e)\.{i}", "y"), "redefinition of group name 'surgery_index'"),
])
def test_bad_parameters_are_refused_when_the_op_is_made(args, message):
    with pytest.raises(RuleError, match=message):
        Op(*args)


def test_python_rules_file_and_command_line_forms_agree(tmp_path):
    assert Op("split", "^w$", {"into": "w.{a,b}", "dim": 1}) == Op("split", "^w$", "w.{a,b}:1")
    assert Op("stack", r"^e\.{i}$", "e") == Op("stack", r"^e\.{i}$", "e:0") == Op.from_cli("stack", r"^e\.{i}$=>e")
    assert Op("split", "^w$", "w.{i}:0:sizes=1,3").params.sizes == (1, 3)
    rules = Rules([SPLIT_QKV, FUSE_QKV, STACK, UNSTACK, Op("split", "^w$", "w.{i}:1:chunks=4")])
    assert Rules.from_json(json.loads(json.dumps(rules.to_json()))).ops == rules.ops
    text = "ops:\n  - stack: '^e\\.{i}$=>e:1'\n  - split: {match: '^w$', into: 'w.{i}', sizes: [2, 2]}\n"
    (tmp_path / "r.yaml").write_text(text)
    assert Rules.from_file(tmp_path / "r.yaml").ops == [Op("stack", r"^e\.{i}$", "e:1"), Op("split", "^w$", "w.{i}:0:sizes=2,2")]
    # '{i}' alone is the index placeholder, not a profile variable
    assert Rules.from_json({"ops": [{"unstack": {"match": "^w$", "into": "{i}"}}]}).ops == [Op("unstack", "^w$", "{i}:0")]
    with pytest.raises(RuleError, match=r"has no inverse op of its own: a concat of the names it wrote undoes it .*: write that op in the inverse rules$"):
        SPLIT_QKV.inverse()
    with pytest.raises(RuleError, match=r"op #1: stack takes \{match:"):
        Rules.from_json({"ops": [{"stack": {"match": "x", "into": "y", "sizes": [1]}}]})


def test_in_memory_apply_rules(src):
    _, sd = src
    out = apply_rules(sd, FORWARD + [Op("rename", r"^cols\.0$", "first")])
    assert torch.equal(out["first"], sd["cols"][:, :1]) and "cols" not in out
    back = apply_rules(out, [Op("rename", "^first$", "cols.0")] + BACKWARD)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_command_line(src, tmp_path, cli):
    path, sd = src
    dst = tmp_path / "b.safetensors"
    r = cli("remap", path, dst, "--split", r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$=>blocks.\1.attn.{q,k,v}.\2",
            "--stack", r"^experts\.{i}\.w1\.weight$=>experts.w1.weight", "--verify", "--verify-roundtrip")
    assert r.exit_code == 0, r.output
    assert "experts.1.w1.weight" in r.stdout and "into experts.w1.weight" in r.stdout
    assert "F32 (stack) [3, 4] -> [4, 3, 4]" in r.stdout and "round trip A -> B -> A bit-exact (9 tensors)" in r.stdout
    r = cli("remap", dst, tmp_path / "c.safetensors", "--concat", r"^blocks\.(\d+)\.attn\.{q,k,v}\.(weight|bias)$=>blocks.\1.attn.qkv.\2:0",
            "--unstack", r"^experts\.w1\.weight$=>experts.{i}.w1.weight", "--verify-roundtrip", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["roundtrip_verified"] == 14  # 12 pieces, the stacked experts and 'cols'

    back = load_file(tmp_path / "c.safetensors")
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    r = cli("remap", path, tmp_path / "x.safetensors", "--split", "no-arrow")
    assert r.exit_code == 2 and "needs the form 'REGEX=>INTO[:DIM]'" in r.output


def test_roundtrip_failure_names_the_tensors(src, tmp_path, monkeypatch):
    from surgery.remapping import roundtrip

    path, _ = src
    monkeypatch.setattr(roundtrip, "undo", lambda g, written: [w * 0 for w in written[:1]] * len(g.sources))
    with pytest.raises(OutputError, match=r"not bit-exact for 5 tensors: 'experts\.0\.w1\.weight', .*'cols'"):
        surgery.remap(path, tmp_path / "o.safetensors", [STACK, Op("split", "^cols$", "cols.{a,b}:1")],
                      verify_roundtrip=True)


def test_a_cast_with_a_group_is_verified_but_not_round_tripped(src, tmp_path):
    path, sd = src
    report = surgery.remap(path, tmp_path / "b.safetensors", [STACK, Op("dtype", "bf16")], verify=True)
    assert report.verified and load_file(tmp_path / "b.safetensors")["experts.w1.weight"].dtype == torch.bfloat16
    with pytest.raises(RuleError, match="converted one way"):
        surgery.remap(path, tmp_path / "c.safetensors", [STACK, Op("dtype", "bf16")], verify_roundtrip=True)


# ---------------------------------------------------------------- timm's ViT


@pytest.fixture(scope="module")
def vit():
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=3, num_classes=4).eval()
    assert timm.__version__
    return model


def _save_vit(model, folder: Path) -> Path:
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_custom", "num_classes": 4}))
    return folder


def test_vit_split_gives_the_rows_timm_attention_uses(vit, tmp_path):
    src = _save_vit(vit, tmp_path / "vit")  # a Hugging Face style folder: config.json and model.safetensors
    report = surgery.remap(src, tmp_path / "split.safetensors", profile_rules("vit-split-qkv", src),
                           verify=True, verify_roundtrip=True)
    assert report.roundtrip == len(vit.state_dict())
    out = load_file(tmp_path / "split.safetensors")
    x = torch.randn(2, 5, 24)
    for i, block in enumerate(vit.blocks):
        attn = block.attn
        # timm's Attention.forward: qkv(x).reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        want = attn.qkv(x).reshape(2, 5, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        for j, part in enumerate("qkv"):
            w, b = out[f"blocks.{i}.attn.{part}.weight"], out[f"blocks.{i}.attn.{part}.bias"]
            assert torch.equal(w, attn.qkv.weight.detach().reshape(3, -1, 24)[j])
            got = torch.nn.functional.linear(x, w, b).reshape(2, 5, attn.num_heads, attn.head_dim).transpose(1, 2)
            torch.testing.assert_close(got, want[j])
    assert not any(".qkv." in k for k in out)


def test_vit_fuse_of_split_is_bit_exact_and_loads_into_timm(vit, tmp_path, cli):
    src = _save_vit(vit, tmp_path / "vit")
    r = cli("remap", src, tmp_path / "split.safetensors", "--profile", "vit-split-qkv")
    assert r.exit_code == 0, r.output
    r = cli("remap", tmp_path / "split.safetensors", tmp_path / "fused.safetensors", "--profile", "vit-fuse-qkv",
            "--verify", "--verify-roundtrip")
    assert r.exit_code == 0 and "bit-exact" in r.stdout, r.output
    fused = load_file(tmp_path / "fused.safetensors")
    want = vit.state_dict()
    assert sorted(fused) == sorted(want) and all(torch.equal(fused[k], want[k]) for k in want)
    from timm.models.vision_transformer import VisionTransformer

    again = VisionTransformer(img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=3, num_classes=4).eval()
    again.load_state_dict(fused, strict=True)
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(again(x), vit(x))


def test_the_docs_vit_example_runs_as_shown(vit, tmp_path, monkeypatch, cli):
    """docs/remap.md's ViT example, replayed on a tiny timm ViT in the folder it names."""
    block = re.search(r"```text\n(\$ surgery remap vit/ .*?)```", DOCS.read_text(), re.S).group(1)
    _save_vit(vit, tmp_path / "vit")
    monkeypatch.chdir(tmp_path)
    commands = [(line[2:], []) for line in block.splitlines() if line.startswith("$ ")]
    shown = [line for line in block.splitlines() if not line.startswith("$ ")]
    printed = []
    for command, _ in commands:
        r = cli(*shlex.split(command)[1:])
        assert r.exit_code == 0, (command, r.output)
        printed += [line.rstrip() for line in r.stdout.splitlines()]
    for line in shown:
        if line.strip() and line.strip() != "...":
            assert line.rstrip() in printed, (line, printed)


# ---------------------------------------------------------------- Hugging Face folders


def test_a_sharded_hugging_face_folder_is_a_source_for_the_profiles(tmp_path):
    """config.json with model.safetensors.index.json shards: the heads come from config.json."""
    torch.manual_seed(0)
    sd = {"model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16), "model.layers.0.self_attn.k_proj.weight":
          torch.randn(8, 16), "model.embed_tokens.weight": torch.randn(10, 16)}
    save_file(sd, tmp_path / "flat.safetensors")
    hf = tmp_path / "hf"
    surgery.remap(tmp_path / "flat.safetensors", hf, [], shard_size="600B")
    assert (hf / "model.safetensors.index.json").is_file() and len(list(hf.glob("*.safetensors"))) > 1
    (hf / "config.json").write_text(json.dumps({"num_attention_heads": 4, "num_key_value_heads": 2}))
    report = surgery.remap(hf, tmp_path / "meta.safetensors", profile_rules("llama-hf-to-meta", hf), verify_roundtrip=True)
    assert report.roundtrip == 3
    assert ("--rope-permute '^model\\.layers\\.\\d+\\.self_attn\\.k_proj\\.weight$:2,hf-to-meta'", 1) in report.op_counts


@pytest.mark.parametrize("src_name", ["dcp_dir", "per_rank_dir"])
def test_group_ops_on_other_kinds_of_source(make, tmp_path, src_name):
    """DCP and ranks' chunks (assembled first) split along either dim, into every output format."""
    src = make(src_name)
    sd = surgery.open(src).state_dict()
    name = next(k for k, v in sd.items() if v.dim() == 2 and v.shape[0] % 2 == 0 and v.shape[1] % 2 == 0)
    for fmt, dim in (("safetensors", 1), ("pt", 0), ("dcp", 1)):
        op = Op("split", "^" + re.escape(name) + "$", f"{name}.{{a,b}}:{dim}")
        dst = tmp_path / f"out-{fmt}"
        report = surgery.remap(src, dst, [op], verify=True, verify_roundtrip=True, format=fmt)
        out = surgery.open(dst).state_dict()
        assert report.roundtrip == len(sd) and torch.equal(torch.cat([out[name + ".a"], out[name + ".b"]], dim), sd[name])


def test_in_place_ties_and_pieces_renamed_or_dropped(tmp_path):
    save_file({f"e.{i}": torch.randn(2, 3) for i in range(3)}, tmp_path / "ip.safetensors")
    report = surgery.remap(tmp_path / "ip.safetensors", tmp_path / "ip.safetensors", [Op("stack", r"^e\.{i}$", "e")],
                           in_place=True, verify=True, verify_roundtrip=True)
    assert report.roundtrip == 3 and list(load_file(tmp_path / "ip.safetensors")) == ["e"]
    w = torch.randn(6, 2)
    torch.save({"a": w, "b": w}, tmp_path / "tied.pt")
    report = surgery.remap(tmp_path / "tied.pt", tmp_path / "t.safetensors", [Op("split", "^a$", "a.{x,y,z}")],
                           verify=True, verify_roundtrip=True)
    assert report.roundtrip == 2 and torch.equal(load_file(tmp_path / "t.safetensors")["a.z"], w[4:])
    ops = [Op("split", "^a$", "a.{x,y,z}"), Op("drop", r"^a\.y$"), Op("rename", r"^a\.x$", "first")]
    report = surgery.remap(tmp_path / "tied.pt", tmp_path / "d.safetensors", ops, verify=True, verify_roundtrip=True)
    assert sorted(load_file(tmp_path / "d.safetensors")) == ["a.z", "b", "first"]
    assert report.roundtrip == 1 and report.dropped == 1  # 'a' lost a piece: only 'b' comes back


def test_sparse_and_scaled_fp8_tensors_are_refused(tmp_path):
    torch.save({"sp": torch.eye(4).to_sparse(), "d": torch.eye(4)}, tmp_path / "sp.pt")
    with pytest.raises(RuleError, match=r"'sp' is a sparse_coo tensor, which group ops do not split or join: write it "
                                        r"dense first \(--densify, --dequantize\)"):
        surgery.remap(tmp_path / "sp.pt", tmp_path / "o.pt", [Op("split", "^sp$", "sp.{a,b}")])
    fp8 = {"l.weight": torch.randn(4, 4).to(torch.float8_e4m3fn), "l.weight_scale_inv": torch.ones(1, 1)}
    save_file(fp8, tmp_path / "fp8.safetensors")
    with pytest.raises(RuleError, match="'l.weight' is an FP8 tensor with a scale beside it"):
        surgery.remap(tmp_path / "fp8.safetensors", tmp_path / "o.safetensors", [Op("split", r"^l\.weight$", "l.{a,b}")])
    assert not (tmp_path / "o.pt").exists() and not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.float8_e4m3fn])
def test_every_dtype_comes_back_bit_for_bit(tmp_path, dtype):
    """Pieces are cut and joined as bytes: NaN payloads, -0.0 and FP8 without a scale come back as they were."""
    torch.manual_seed(0)
    shape = (4, 6, 2)
    if dtype in (torch.float16, torch.bfloat16):  # every bit pattern: NaNs with payloads, -0.0, infinities
        t = torch.randint(-2**15, 2**15, shape, dtype=torch.int16).view(dtype)
    elif dtype == torch.float8_e4m3fn:
        t = torch.randint(0, 256, shape, dtype=torch.uint8).view(dtype)
    else:
        t = torch.randint(0, 2, shape).to(dtype)
    save_file({"t": t, "u": t.clone()}, tmp_path / "a.safetensors")
    ops = [Op("split", "^t$", "t.{i}:1:sizes=1,5"), Op("stack", "^{t,u}$", "tu:2")]
    report = surgery.remap(tmp_path / "a.safetensors", tmp_path / "b.safetensors", ops[:1], verify=True, verify_roundtrip=True)
    assert report.roundtrip == 2
    report = surgery.remap(tmp_path / "a.safetensors", tmp_path / "c.safetensors", ops[1:], verify=True, verify_roundtrip=True)
    out = load_file(tmp_path / "c.safetensors")["tu"]
    assert report.roundtrip == 2 and out.shape == (4, 6, 2, 2)
    assert torch.equal(out.select(2, 0).contiguous().view(torch.uint8), t.view(torch.uint8))


def test_the_docs_table_of_group_ops_runs(tmp_path, cli):
    """Each command line of docs/remap.md's table, on names it fits, then its inverse from the same table."""
    rows = [r for r in re.findall(r"^\| `(\w+)` \| `(--\w+ '[^']+')` \| `(\w+): (\{.*\})` \|", DOCS.read_text(), re.M)
            if r[0] in ("split", "concat", "stack", "unstack")]
    flags = {kind: shlex.split(cli_form) for kind, cli_form, _, _ in rows}
    assert sorted(flags) == ["concat", "split", "stack", "unstack"]
    for kind, _, key, yaml_form in rows:  # the rules-file column is the same op
        assert Rules.from_file(_write(tmp_path / f"{kind}.yaml", f"ops:\n  - {key}: {yaml_form}\n")).ops == \
            [Op.from_cli(kind, flags[kind][1])]
    sd = {"blocks.0.attn.qkv.weight": torch.randn(6, 2), "experts.0.w1.weight": torch.randn(2), "experts.1.w1.weight": torch.randn(2)}
    save_file(sd, tmp_path / "a.safetensors")
    assert cli("remap", tmp_path / "a.safetensors", tmp_path / "b.safetensors", *flags["split"], *flags["stack"]).exit_code == 0
    assert sorted(load_file(tmp_path / "b.safetensors")) == ["blocks.0.attn.k.weight", "blocks.0.attn.q.weight",
                                                           "blocks.0.attn.v.weight", "experts.w1.weight"]
    r = cli("remap", tmp_path / "b.safetensors", tmp_path / "c.safetensors", *flags["concat"], *flags["unstack"])
    assert r.exit_code == 0, r.output
    back = load_file(tmp_path / "c.safetensors")
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_tensor_ops_after_a_group_op_reorder_what_it_wrote(src, tmp_path):
    """Stacked experts transposed, split pieces transposed (no longer byte ranges): planned, verified, undone."""
    path, sd = src
    ops = [STACK, Op("transpose", r"^experts\.w1\.weight$", "1,2"), SPLIT_QKV, Op("transpose", r"attn\.[qk]\.weight$", "0,1")]
    for dst in (tmp_path / "b.safetensors", tmp_path / "b.pt"):
        report = surgery.remap(path, dst, ops, verify=True, verify_roundtrip=True)
        out = surgery.open(dst).state_dict()
        want = torch.stack([sd[f"experts.{i}.w1.weight"] for i in range(4)]).transpose(1, 2)
        assert report.roundtrip == len(sd) and torch.equal(out["experts.w1.weight"], want)
        assert torch.equal(out["blocks.0.attn.k.weight"], sd["blocks.0.attn.qkv.weight"][4:8].t())
        assert torch.equal(out["blocks.0.attn.v.weight"], sd["blocks.0.attn.qkv.weight"][8:])
    rows = {r.new: r for r in report.rows}
    assert rows["experts.w1.weight"].shape == (4, 4, 3) and [s.kind for s in rows["blocks.0.attn.q.weight"].steps] == ["transpose"]
    mem = apply_rules(sd, ops)
    assert torch.equal(mem["experts.w1.weight"], want) and mem["blocks.0.attn.q.weight"].is_contiguous()


def test_f4_tensors_are_cut_and_joined_by_their_bytes_and_round_trip(tmp_path):
    """safetensors' F4 shapes count values, two to a byte: [4, 32] is 4 rows of 16 bytes."""
    f4 = torch.float4_e2m1fn_x2
    w, c = torch.arange(64, dtype=torch.uint8).view(4, 16), torch.arange(100, 132, dtype=torch.uint8).view(2, 4, 4)
    e = [torch.arange(4 * i, 4 * i + 4, dtype=torch.uint8).view(2, 2) for i in range(2)]
    save_file({"w": w.view(f4), "c": c.view(f4), "e.0": e[0].view(f4), "e.1": e[1].view(f4), "t": torch.ones(2),
               "kept": w.clone().view(f4)},
              tmp_path / "a.safetensors")
    ops = [Op("split", "^w$", "w.{a,b}:0"), Op("split", "^c$", "c.{a,b}:1"), Op("stack", r"^e\.{i}$", "e:1")]
    report = surgery.remap(tmp_path / "a.safetensors", tmp_path / "b.safetensors", ops, verify=True, verify_roundtrip=True)
    assert report.roundtrip == 6
    out = {k: v.view(torch.uint8) for k, v in load_file(tmp_path / "b.safetensors").items() if k != "t"}
    assert torch.equal(out["kept"], w)
    assert torch.equal(out["w.b"], w[2:]) and torch.equal(out["c.a"], c[:, :2]) and torch.equal(out["e"], torch.stack(e, 1))
    for op in (Op("split", "^w$", "w.{a,b}:1"), Op("stack", r"^e\.{i}$", "e:-1"), Op("concat", r"^e\.{i}$", "e:1")):
        with pytest.raises(RuleError, match=r"is F4\[\d+, \d+\], two values to a byte along its last dim"):
            surgery.remap(tmp_path / "a.safetensors", tmp_path / "x.safetensors", [op])
    assert not (tmp_path / "x.safetensors").exists()
