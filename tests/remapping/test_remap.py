"""remap: rules over names, every output format, round trips bit for bit, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import surgery
from surgery.errors import OutputError, RuleError
from surgery.formats import FORMATS, OUTPUT_NAMES
from surgery.remapping import OP_KINDS, Op, Rules, plan_names

# every writable format of the registry, each named as --format names it
OUTPUTS = {name: short for short, name in OUTPUT_NAMES.items()}
assert sorted(OUTPUTS) == sorted(f.name for f in FORMATS.values() if f.writer)


def test_plan_applies_ops_in_order():
    names = ["module._orig_mod.fc.weight", "module._orig_mod.fc.bias", "module._orig_mod.bn.num_batches_tracked"]
    plan = plan_names(names, [Op("auto"), Op("rename", r"^fc\.", "head."), Op("drop", "num_batches_tracked$")])
    assert plan.mapping == {names[0]: "head.weight", names[1]: "head.bias", names[2]: None}
    assert [n for _, n in plan.op_counts] == [3, 2, 1]
    # the same rules in another order give another result: order matters
    plan2 = plan_names(names, [Op("rename", r"^fc\.", "head."), Op("auto")])
    assert plan2.mapping[names[0]] == "fc.weight"


def test_auto_only_strips_prefixes_every_key_has():
    assert plan_names(["module.a", "b"], [Op("auto")]).mapping == {"module.a": "module.a", "b": "b"}
    both = plan_names(["_orig_mod.module.a", "_orig_mod.module.b"], [Op("auto")]).mapping
    assert both == {"_orig_mod.module.a": "a", "_orig_mod.module.b": "b"}


def test_collisions_list_every_pair():
    with pytest.raises(RuleError, match=r"'a\.x' and 'b\.x' -> 'x'"):
        plan_names(["a.x", "b.x", "c"], [Op("rename", r"^\w+\.", "")])


def test_bad_regex_and_bad_rename_form():
    with pytest.raises(RuleError, match="not a valid regular expression"):
        Op("drop", "(")
    with pytest.raises(RuleError, match="REGEX=>REPLACEMENT"):
        from surgery.remapping import parse_rename

        parse_rename("no-arrow")


def test_pure_state_dict_functions():
    sd = {"module.fc.weight": torch.ones(2, 2), "module.fc.bias": torch.zeros(2)}
    assert list(surgery.strip_prefix(sd, "module.")) == ["fc.weight", "fc.bias"]
    assert list(surgery.add_prefix(sd, "x.")) == ["x.module.fc.weight", "x.module.fc.bias"]
    assert list(surgery.rename(sd, r"\.fc\.", ".head.")) == ["module.head.weight", "module.head.bias"]
    assert list(surgery.drop(sd, "bias$")) == ["module.fc.weight"]
    assert list(surgery.keep(sd, "bias$")) == ["module.fc.bias"]
    assert list(surgery.auto_strip(sd)) == ["fc.weight", "fc.bias"]
    half = surgery.cast({"w": torch.ones(2), "n": torch.tensor(3)}, "fp16")
    assert half["w"].dtype == torch.float16 and half["n"].dtype == torch.int64


@pytest.mark.parametrize("src_name", ["dataparallel_pt", "legacy_pt", "plain_safetensors", "sharded_bin", "dcp_dir", "lightning_ckpt"])
@pytest.mark.parametrize("fmt", sorted(OUTPUTS))
def test_every_format_round_trips_bit_for_bit(make, tmp_path, src_name, fmt):
    src = make(src_name)
    ref = surgery.open(src).state_dict()
    dst = tmp_path / "out"
    report = surgery.remap(src, dst, [], verify=True, shard_size="1MB", format=OUTPUTS[fmt])
    assert report.verified and report.dst_format == fmt == surgery.open(dst).format
    back = tmp_path / "back.pt"
    surgery.remap(dst, back, [], verify=True)
    again = torch.load(back, weights_only=True)
    assert list(again) == list(ref)
    for k, v in ref.items():
        assert again[k].dtype == v.dtype
        assert torch.equal(again[k].view(-1).view(torch.uint8), v.contiguous().view(-1).view(torch.uint8)), k


def test_strip_and_provenance_in_safetensors(make, tmp_path):
    src = make("dataparallel_pt")
    dst = tmp_path / "clean.safetensors"
    surgery.remap(src, dst, Rules([Op("auto"), Op("drop", "num_batches_tracked$")]), verify=True)
    sd = load_file(dst)
    assert sd and not any(k.startswith("module.") or k.endswith("num_batches_tracked") for k in sd)
    meta = surgery.open(dst).metadata
    from surgery.io import sha256_file

    assert meta["surgery.source_sha256"] == sha256_file(src)
    assert json.loads(meta["surgery.rules"])["ops"][0] == {"auto": True}
    assert meta["format"] == "pt"


def test_dtype_cast_only_touches_floats(make, tmp_path):
    dst = tmp_path / "half.safetensors"
    surgery.remap(make("plain_pt"), dst, [Op("dtype", "bf16")], verify=True)
    out = surgery.open(dst)
    dtypes = {t.dtype for t in out.tensors.values()}
    assert "BF16" in dtypes and "F32" not in dtypes
    assert all(t.dtype == "I64" for n, t in out.tensors.items() if n.endswith("num_batches_tracked"))


def test_tied_tensors_stored_once_and_restored(make, tmp_path):
    src = make("tied_pt")
    st = tmp_path / "tied.safetensors"
    report = surgery.remap(src, st, [], verify=True)
    aliases = [r for r in report.rows if r.alias_of]
    assert aliases
    raw = load_file(st)  # the plain safetensors reader sees each tensor once
    assert len(raw) == len(report.rows) - len(aliases)
    back = tmp_path / "tied_back.pt"
    surgery.remap(st, back, [])
    sd = torch.load(back, weights_only=True)
    a = aliases[0]
    assert sd[a.new].data_ptr() == sd[a.alias_of].data_ptr()


def test_copy_tied_writes_every_tied_name_for_plain_loaders(make, tmp_path, cli):
    """safetensors.torch.load_file ignores surgery's record of ties: --copy-tied writes each name."""
    src = make("tied_pt")
    ref = torch.load(src, weights_only=True)
    st = tmp_path / "copies.safetensors"
    r = cli("remap", src, st, "--copy-tied", "--verify")
    assert r.exit_code == 0, r.output
    raw = load_file(st)
    assert sorted(raw) == sorted(ref)
    for k, v in ref.items():
        assert torch.equal(raw[k], v), k
    with safe_open(st, "pt") as f:
        assert "surgery.aliases" not in (f.metadata() or {})


def test_non_contiguous_views_survive(make, tmp_path):
    src = make("tied_view_pt")
    ref = torch.load(src, weights_only=True)
    dst = tmp_path / "v.safetensors"
    surgery.remap(src, dst, [], verify=True)
    out = load_file(dst)
    for k, v in ref.items():
        assert torch.equal(out[k], v)


def test_sharded_output_has_a_valid_index(make, tmp_path):
    dst = tmp_path / "sharded"
    report = surgery.remap(make("plain_pt"), dst, [], shard_size="1MB", verify=True)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((dst / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] > 0
    assert report.files[-1].endswith("index.json")


def test_rules_file_yaml_and_json(make, tmp_path):
    y = tmp_path / "rules.yaml"
    y.write_text("ops:\n  - auto: true\n  - rename: '^features\\.=>body.'\n  - dtype: fp16\n")
    j = tmp_path / "rules.json"
    j.write_text(json.dumps({"ops": [{"auto": True}, {"rename": ["^features\\.", "body."]}, {"dtype": "fp16"}]}))
    a = Rules.from_file(y)
    b = Rules.from_file(j)
    assert a.ops == b.ops
    # the API takes a rules file path or a dict in the same schema
    by_path = surgery.remap(make("dataparallel_pt"), tmp_path / "p.safetensors", y, dry_run=True)
    by_dict = surgery.remap(make("dataparallel_pt"), tmp_path / "p.safetensors", json.loads(j.read_text()), dry_run=True)
    assert [r.new for r in by_path.rows] == [r.new for r in by_dict.rows]
    report = surgery.remap(make("dataparallel_pt"), tmp_path / "x.safetensors", a, dry_run=True)
    assert report.rows[0].new.startswith("body.") and report.rows[0].new_dtype == "F16"
    assert not (tmp_path / "x.safetensors").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("ops:\n  - explode: 1\n")
    with pytest.raises(RuleError, match="unknown rule 'explode'"):
        Rules.from_file(bad)


def test_refusals_leave_nothing(make, tmp_path):
    src = make("plain_safetensors")
    with pytest.raises(OutputError, match="is the source.*in_place=True"):
        surgery.remap(src, src, [])
    dst = tmp_path / "exists.safetensors"
    dst.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists.*force=True"):
        surgery.remap(src, dst, [])
    assert dst.read_bytes() == b"keep me"
    surgery.remap(src, dst, [], force=True, verify=True)
    assert dst.stat().st_size > 100


def test_in_place_rewrites_atomically(make, tmp_path):
    import shutil

    src = tmp_path / "dp.safetensors"
    surgery.remap(make("dataparallel_pt"), src, [])
    before = surgery.open(src).state_dict()
    surgery.remap(src, src, [Op("auto")], in_place=True)
    after = surgery.open(src).state_dict()
    assert [k.removeprefix("module.") for k in before] == list(after)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    shutil.rmtree(tmp_path)


def test_bf16_strided_view_is_gathered(tmp_path):
    w = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    src = tmp_path / "bfv.pt"
    torch.save({"w": w, "t": w.t()}, src)
    dst = tmp_path / "bfv.safetensors"
    surgery.remap(src, dst, [], verify=True)
    out = load_file(dst)
    assert torch.equal(out["t"], w.t()) and torch.equal(out["w"], w)


def test_outputs_get_the_usual_file_mode(make, tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    try:
        f = tmp_path / "m.safetensors"
        surgery.remap(make("plain_pt"), f, [])
        d = tmp_path / "sharded"
        surgery.remap(make("plain_pt"), d, [], shard_size="2MB")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(f.stat().st_mode) == 0o644
    assert stat.S_IMODE(d.stat().st_mode) == 0o755


def test_every_op_kind_reads_and_writes_its_own_forms():
    """Each row of the op table: the rules file's JSON form and the command line's text come back
    as the same op, and the plan reports it under that text."""
    args = {"": "", "P": "m.", "REGEX": "^a", "'REGEX=>REPL'": "^a=>b", "fp16|bf16|fp32": "bf16",
            "'REGEX:D0,D1'": "^a:0,1", "'REGEX:ORDER'": "^a:1,0", "'REGEX:SIZES'": "^a:-1",
            "'REGEX:HEADS,DIRECTION'": "^a:2,meta-to-hf", "'REGEX=>NAME{a,b}[:DIM]'": "^m.a$=>m.{x,y}",
            "'REGEX{a,b}=>NAME[:DIM]'": "^m.{a,b}$=>m.ab:0"}
    for kind in OP_KINDS.values():
        op = Op.from_cli(kind.name, args[kind.form.metavar or ""])
        assert Rules.from_json([op.to_json()]).ops == [op]
        assert str(op).split(" ")[0] == kind.flag
        counts = plan_names(["m.a", "m.b"], [op]).op_counts
        assert counts[0][0] == op


def test_rules_coerce_copies_and_refuses_other_types():
    mine = Rules([Op("auto")], select="state_dict")
    copy = Rules.coerce(mine)
    copy.ops.append(Op("drop", "x"))
    copy.select = None
    assert mine.ops == [Op("auto")] and mine.select == "state_dict"
    assert Rules.coerce({"ops": [{"auto": True}]}).ops == [Op("auto")]
    with pytest.raises(RuleError, match="rules must be"):
        Rules.coerce(42)
