"""Packed FP4 weights with scales beside them (gpt-oss MXFP4, ModelOpt and compressed-tensors
NVFP4, safetensors' F4): --dtype refuses to leave them packed, --dequantize unpacks them and
applies the scales bit for bit as the formats define them, inspect says which tensors they are."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import surgery
from surgery.errors import RuleError
from surgery.formats import open_checkpoint
from surgery.remapping import Op, Rules, apply_rules, build_plan, cast, dequantize
from surgery.remapping.output import source

E, ROWS, GROUPS = 2, 6, 3  # gpt-oss style: [experts, rows, blocks of 32 values, 16 bytes]
NV_ROWS, NV_COLS = 5, 72  # 72 values: four whole 16-value blocks and a ragged fifth


def codes(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)


def exponents(*shape: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(110, 140, shape, dtype=torch.uint8, generator=g)


def block_scales(*shape: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) * 400 + 1).to(torch.float8_e4m3fn)


def e2m1(code: torch.Tensor) -> torch.Tensor:
    """An e2m1 code's value from its bits (sign, two exponent bits, one mantissa bit), in float64."""
    code = code.to(torch.int64)
    sign = torch.where(code & 8 != 0, -1.0, 1.0).to(torch.float64)
    exp, man = (code >> 1) & 3, (code & 1).to(torch.float64)
    magnitude = torch.where(exp == 0, man * 0.5, 2.0 ** (exp - 1).to(torch.float64) * (1 + man / 2))
    return sign * magnitude


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Bytes [..., n] -> values [..., 2n], the low nibble first."""
    return torch.stack([e2m1(packed & 0x0F), e2m1(packed >> 4)], dim=-1).flatten(-2)


def mx_reference(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """value * 2**(e - 127), [..., G*32], dims 1 and 2 swapped when there are three or more."""
    values = unpack(blocks) * 2.0 ** (scales.to(torch.float64) - 127).unsqueeze(-1)
    out = values.flatten(-2)
    return out.transpose(1, 2) if out.dim() >= 3 else out


def nv_reference(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor, divide: bool) -> torch.Tensor:
    """value * (block_scale * global) (ModelOpt) or value * (block_scale / global) (compressed-tensors),
    the block scale taken in float32 first, as both do."""
    s32, g32 = scale.to(torch.float32), global_scale.to(torch.float32).reshape(())
    factor = (s32 / g32 if divide else s32 * g32).to(torch.float64)
    values = unpack(packed)
    return values * factor.repeat_interleave(16, dim=-1)[..., : values.shape[-1]]


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def gpt_oss(path, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    """MXFP4 experts beside a bf16 attention weight, as gpt-oss stores them."""
    tensors = {"mlp.experts.gate_up_proj_blocks": codes(E, ROWS, GROUPS, 16),
               "mlp.experts.gate_up_proj_scales": exponents(E, ROWS, GROUPS),
               "mlp.experts.gate_up_proj_bias": torch.zeros(E, ROWS, dtype=torch.bfloat16),
               "attn.q_proj.weight": torch.ones(4, 4, dtype=torch.bfloat16), **extra}
    save_file(tensors, str(path))
    return tensors


def nvfp4(path, style: str = "modelopt", **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    """Two NVFP4 linear layers: ModelOpt's weight / weight_scale / weight_scale_2, or
    compressed-tensors' weight_packed / weight_scale / weight_global_scale."""
    packed, glob = ("weight", "weight_scale_2") if style == "modelopt" else ("weight_packed", "weight_global_scale")
    tensors = {}
    for i in (0, 1):
        tensors[f"layers.{i}.{packed}"] = codes(NV_ROWS, NV_COLS // 2, seed=i)
        tensors[f"layers.{i}.weight_scale"] = block_scales(NV_ROWS, 5, seed=i)
        tensors[f"layers.{i}.{glob}"] = torch.tensor([0.003 if style == "modelopt" else 2688.0 / (i + 1)])
        tensors[f"layers.{i}.input_scale"] = torch.tensor(1.0)
    tensors.update(extra)
    save_file(tensors, str(path))
    return tensors


def test_dtype_refuses_packed_fp4_in_one_line_and_writes_nothing(cli, tmp_path):
    src, dst = tmp_path / "fp4.safetensors", tmp_path / "out.safetensors"
    gpt_oss(src)
    for extra in ((), ("--dry-run",)):
        r = cli("remap", src, dst, "--dtype", "bf16", *extra)
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        err = r.stderr.strip()
        assert len(err.splitlines()) == 1
        assert "'mlp.experts.gate_up_proj_blocks' (MXFP4 U8, scale 'mlp.experts.gate_up_proj_scales')" in err
        assert "add --dequantize" in err and "Nothing was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp4.safetensors"]
    nvfp4(src)
    with pytest.raises(RuleError, match=r"--dtype F16 would leave 2 packed FP4 tensors .*'layers\.0\.weight' "
                                        r"\(NVFP4 U8, scale 'layers\.0\.weight_scale'\)"):
        surgery.remap(src, dst, [Op("dtype", "fp16")])
    assert not dst.exists()


@pytest.mark.parametrize("out", ["out.safetensors", "out.pt", "sharded"])
def test_dequantize_mxfp4_as_transformers_names_and_lays_it_out(cli, tmp_path, out):
    src, dst = tmp_path / "fp4.safetensors", tmp_path / out
    t = gpt_oss(src)
    r = cli("remap", src, dst, "--dequantize", "--verify", "--json", "--shard-size", "1KB")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["dropped"] == 1
    got = surgery.open(dst).state_dict()
    assert set(got) == {"mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj_bias", "attn.q_proj.weight"}
    want = mx_reference(t["mlp.experts.gate_up_proj_blocks"], t["mlp.experts.gate_up_proj_scales"])
    assert want.shape == (E, GROUPS * 32, ROWS)
    assert bits_equal(got["mlp.experts.gate_up_proj"], want.to(torch.bfloat16))
    assert torch.equal(got["attn.q_proj.weight"], t["attn.q_proj.weight"])


@pytest.mark.slow  # importing the reference library takes seconds
def test_matches_transformers_convert_moe_packed_tensors(tmp_path):
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    src, dst = tmp_path / "fp4.safetensors", tmp_path / "out.safetensors"
    t = gpt_oss(src)
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        surgery.remap(src, dst, [Op("dequantize"), Op("dtype", name)], force=True)
        theirs = mxfp4.convert_moe_packed_tensors(t["mlp.experts.gate_up_proj_blocks"],
                                                  t["mlp.experts.gate_up_proj_scales"], dtype=dtype)
        ours = load_file(str(dst))["mlp.experts.gate_up_proj"]
        assert ours.dtype == dtype and ours.shape == theirs.shape and torch.equal(ours, theirs)


def test_mxfp4_blocks_of_one_row_stack_are_not_transposed(tmp_path):
    src, dst = tmp_path / "fp4.safetensors", tmp_path / "out.safetensors"
    blocks, scales = codes(ROWS, GROUPS, 16), exponents(ROWS, GROUPS)
    save_file({"w_blocks": blocks, "w_scales": scales}, str(src))
    surgery.remap(src, dst, [Op("dequantize"), Op("dtype", "fp32")])
    got = load_file(str(dst))
    assert set(got) == {"w"} and torch.equal(got["w"], mx_reference(blocks, scales).to(torch.float32))


@pytest.mark.parametrize("style", ["modelopt", "compressed-tensors"])
def test_dequantize_nvfp4_applies_block_and_global_scales(tmp_path, style):
    src, dst = tmp_path / "fp4.safetensors", tmp_path / "out.safetensors"
    t = nvfp4(src, style)
    packed, glob = ("weight", "weight_scale_2") if style == "modelopt" else ("weight_packed", "weight_global_scale")
    surgery.remap(src, dst, [Op("dequantize"), Op("dtype", "fp32")], verify=True)
    got = load_file(str(dst))
    assert set(got) == {"layers.0.weight", "layers.1.weight", "layers.0.input_scale", "layers.1.input_scale"}
    for i in (0, 1):
        want = nv_reference(t[f"layers.{i}.{packed}"], t[f"layers.{i}.weight_scale"], t[f"layers.{i}.{glob}"],
                            divide=style != "modelopt")
        assert got[f"layers.{i}.weight"].shape == (NV_ROWS, NV_COLS)
        assert torch.equal(got[f"layers.{i}.weight"], want.to(torch.float32))


@pytest.mark.slow  # importing the reference library takes seconds
def test_matches_compressed_tensors_decompression(tmp_path):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    src, dst = tmp_path / "fp4.safetensors", tmp_path / "out.safetensors"
    nv = {"weight_packed": codes(NV_ROWS, 32), "weight_scale": block_scales(NV_ROWS, 4),
          "weight_global_scale": torch.tensor([1234.5])}
    mx = {"weight_packed": codes(NV_ROWS, 32, seed=5), "weight_scale": exponents(NV_ROWS, 2)}
    save_file({**{f"nv.{k}": v for k, v in nv.items()}, **{f"mx.{k}": v for k, v in mx.items()}}, str(src))
    surgery.remap(src, dst, [Op("dequantize")])
    got = load_file(str(dst))
    for prefix, compressor, scheme, sd in (("nv", NVFP4PackedCompressor, "NVFP4A16", nv),
                                           ("mx", MXFP4PackedCompressor, "MXFP4A16", mx)):
        theirs = compressor.decompress(dict(sd), QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES[scheme]))
        assert bits_equal(got[f"{prefix}.weight"], theirs["weight"]), prefix


def test_safetensors_f4_weights_read_pass_through_and_dequantize(cli, tmp_path):
    """safetensors' F4 counts 4-bit values in its shapes: a [5, 72] F4 tensor is 180 bytes."""
    src = tmp_path / "f4.safetensors"
    packed = codes(NV_ROWS, NV_COLS // 2)
    scale = block_scales(NV_ROWS, 5)
    save_file({"x.weight": packed.view(torch.float4_e2m1fn_x2), "x.weight_scale": scale}, str(src))
    ckpt = open_checkpoint(src)
    info = ckpt.tensors["x.weight"]
    assert (info.dtype, info.shape, info.nbytes) == ("F4", (NV_ROWS, NV_COLS), NV_ROWS * NV_COLS // 2)
    assert torch.equal(ckpt.tensor("x.weight").view(torch.uint8), packed)
    dtypes = json.loads(cli("inspect", src, "--json").stdout)["dtypes"]
    assert dtypes["F4"] == {"tensors": 1, "params": NV_ROWS * NV_COLS, "bytes": NV_ROWS * NV_COLS // 2}

    renamed = tmp_path / "renamed.safetensors"
    surgery.remap(src, renamed, [Op("strip_prefix", "x.")], verify=True)
    back = load_file(str(renamed))
    assert back["weight"].dtype == torch.float4_e2m1fn_x2 and torch.equal(back["weight"].view(torch.uint8), packed)

    dst = tmp_path / "out.safetensors"
    surgery.remap(src, dst, [Op("dequantize"), Op("dtype", "fp32")])
    want = nv_reference(packed, scale, torch.tensor(1.0), divide=False)
    assert torch.equal(load_file(str(dst))["x.weight"], want.to(torch.float32))


def test_a_packed_weight_streams_from_its_own_bytes_and_its_scales_only(tmp_path):
    src = tmp_path / "fp4.safetensors"
    nvfp4(src)
    ckpt = open_checkpoint(src)
    rows, _ = build_plan(ckpt, Rules([Op("dequantize")]))
    row = next(r for r in rows if r.old == "layers.1.weight")
    read: list[str] = []
    real = ckpt.tensor
    ckpt.tensor = lambda name: read.append(name) or real(name)  # type: ignore[method-assign]
    fn = source(ckpt, row)
    assert callable(fn) and not read  # nothing read until the writer asks
    assert len(bytes(fn())) == NV_ROWS * NV_COLS * 2
    assert read == ["layers.1.weight", "layers.1.weight_scale", "layers.1.weight_scale_2"]


def test_in_memory_state_dicts(tmp_path):
    t = gpt_oss(tmp_path / "fp4.safetensors")
    out = dequantize(t)
    assert set(out) == {"mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj_bias", "attn.q_proj.weight"}
    want = mx_reference(t["mlp.experts.gate_up_proj_blocks"], t["mlp.experts.gate_up_proj_scales"])
    assert bits_equal(out["mlp.experts.gate_up_proj"], want.to(torch.bfloat16))
    with pytest.raises(RuleError, match="add --dequantize"):
        cast(t, "bf16")
    packed, scale = codes(NV_ROWS, NV_COLS // 2), block_scales(NV_ROWS, 5)
    f4 = {"x.weight": packed.view(torch.float4_e2m1fn_x2), "x.weight_scale": scale, "x.weight_scale_2": torch.tensor(0.5)}
    got = apply_rules(f4, [Op("dequantize"), Op("dtype", "fp32")])
    assert set(got) == {"x.weight"}
    assert torch.equal(got["x.weight"], nv_reference(packed, scale, torch.tensor(0.5), divide=False).to(torch.float32))


def test_tensor_ops_apply_to_the_unpacked_weight(tmp_path):
    src, dst = tmp_path / "fp4.safetensors", tmp_path / "out.safetensors"
    t = nvfp4(src)
    transpose = Op("transpose", r"^layers\.0\.weight$", "0,1")
    with pytest.raises(RuleError, match="'layers.0.weight' is a packed FP4 tensor with scales beside it.*--dequantize"):
        surgery.remap(src, dst, [transpose])
    surgery.remap(src, dst, [Op("dequantize"), Op("dtype", "fp32"), transpose])
    want = nv_reference(t["layers.0.weight"], t["layers.0.weight_scale"], t["layers.0.weight_scale_2"], divide=False)
    assert torch.equal(load_file(str(dst))["layers.0.weight"], want.to(torch.float32).T.contiguous())


def test_a_per_tensor_scale_beside_mxfp4_exponents_applies_too():
    packed, exps = codes(NV_ROWS, 32), exponents(NV_ROWS, 2)
    sd = {"x.weight_packed": packed, "x.weight_scale": exps, "x.weight_global_scale": torch.tensor([4.0])}
    got = dequantize(sd, "fp32")
    want = unpack(packed) * 2.0 ** (exps.to(torch.float64) - 127).repeat_interleave(32, dim=1) / 4
    assert set(got) == {"x.weight"} and torch.equal(got["x.weight"], want.to(torch.float32))


def test_renames_apply_before_the_blocks_suffix_is_dropped(tmp_path):
    src, dst = tmp_path / "fp4.safetensors", tmp_path / "out.safetensors"
    gpt_oss(src)
    surgery.remap(src, dst, [Op("rename", r"^mlp\.", "model.layers.0.mlp."), Op("dequantize")])
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(str(dst))


@pytest.mark.parametrize("tensors, why", [
    ({"w_blocks": codes(ROWS, GROUPS, 16), "w_scales": exponents(ROWS, GROUPS + 1)},
     "'w_blocks' U8[6, 3, 16] with 'w_scales' U8[6, 4]: its scale is [6, 4], not [6, 3] (one per 32 values)"),
    ({"w_blocks": codes(ROWS, GROUPS, 8), "w_scales": exponents(ROWS, GROUPS)},
     "MXFP4 blocks are [..., blocks, 16] (32 values in 16 bytes), not [6, 3, 8]"),
    ({"l.weight": codes(NV_ROWS, 36), "l.weight_scale": block_scales(NV_ROWS, 4)},
     "its scale is [5, 4], not [5, 5] (one per 16 values)"),
    ({"l.weight": codes(NV_ROWS, 36), "l.weight_scale": block_scales(NV_ROWS, 5), "l.weight_scale_2": torch.ones(2)},
     "the per-tensor scale 'l.weight_scale_2' is F32[2], not one float"),
    ({"l.weight": codes(3, 4).view(torch.float4_e2m1fn_x2), "l.weight_scale": torch.ones(3, 1, dtype=torch.int16)},
     "its scale is I16, not F8_E4M3 (NVFP4) or U8 / F8_E8M0 exponents (MXFP4)"),
], ids=["mx-scale-shape", "mx-block-bytes", "nv-scale-shape", "nv-global", "scale-dtype"])
def test_malformed_groups_are_refused_in_one_line_before_writing(cli, tmp_path, tensors, why):
    src, dst = tmp_path / "fp4.safetensors", tmp_path / "out.safetensors"
    save_file(tensors, str(src))
    r = cli("remap", src, dst, "--dequantize")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and why in err and "Nothing was written" in err, err
    assert f"--drop '^({next(iter(tensors)).replace('.', chr(92) + '.')})$'" in err, err
    assert not dst.exists()


def test_an_unpacked_name_taken_by_another_tensor_is_refused(tmp_path):
    src, dst = tmp_path / "fp4.safetensors", tmp_path / "out.safetensors"
    gpt_oss(src, **{"mlp.experts.gate_up_proj": torch.zeros(2)})
    with pytest.raises(RuleError, match=r"'mlp\.experts\.gate_up_proj_blocks' -> 'mlp\.experts\.gate_up_proj'"):
        surgery.remap(src, dst, [Op("dequantize")])
    assert not dst.exists()


def test_inspect_names_the_packed_tensors(cli, tmp_path):
    src = tmp_path / "fp4.safetensors"
    gpt_oss(src)
    r = cli("inspect", src, "--depth", "0")
    assert r.exit_code == 0, r.output
    assert ("fp4 1 tensor MXFP4 (U8, 32-value blocks) with scales (mlp.experts.gate_up_proj_scales); "
            "--dequantize unpacks it") in " ".join(r.stdout.split())
    assert json.loads(cli("inspect", src, "--json").stdout)["scaled_fp4"] == [
        {"tensor": "mlp.experts.gate_up_proj_blocks", "dtype": "U8", "format": "mxfp4",
         "scale": "mlp.experts.gate_up_proj_scales", "scale_shape": [E, ROWS, GROUPS], "global_scale": None,
         "block": 32, "output": "mlp.experts.gate_up_proj", "output_shape": [E, GROUPS * 32, ROWS], "problem": None}]
    nvfp4(src)
    text = " ".join(cli("inspect", src).stdout.split())
    assert "fp4 2 tensors NVFP4 (U8, 16-value blocks) with scales (layers.0.weight_scale + layers.0.weight_scale_2; " \
           "layers.1.weight_scale + layers.1.weight_scale_2); --dequantize unpacks them" in text
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2), "q": codes(2, 2), "q_scale": torch.ones(2, 1)}, str(plain))  # U8 + F32: not FP4
    assert json.loads(cli("inspect", plain, "--json").stdout)["scaled_fp4"] == []
    assert not any(ln.startswith("fp4") for ln in cli("inspect", plain).stdout.splitlines())


def test_inspect_finds_them_without_importing_torch(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    src = tmp_path / "fp4.safetensors"
    gpt_oss(src)
    code = ("import sys, surgery; r = surgery.inspect(sys.argv[1]); assert len(r.scaled_fp4) == 1; "
            "assert 'torch' not in sys.modules, 'inspect imported torch'")
    subprocess.run([sys.executable, "-c", code, str(src)], check=True, cwd=Path(__file__).parents[2])


@pytest.mark.parametrize("tensors", [
    {"l.weight": torch.empty(4, 0, dtype=torch.uint8), "l.weight_scale": torch.empty(4, 0, dtype=torch.float8_e4m3fn)},
    {"w_blocks": torch.empty(2, 0, 16, dtype=torch.uint8), "w_scales": torch.empty(2, 0, dtype=torch.uint8)},
], ids=["rows-of-no-values", "no-blocks"])
def test_an_empty_packed_weight_dequantizes_to_an_empty_one(tmp_path, tensors):
    src, dst = tmp_path / "fp4.safetensors", tmp_path / "out.safetensors"
    save_file(tensors, str(src))
    surgery.remap(src, dst, [Op("dequantize")], verify=True)
    (name, t), = load_file(str(dst)).items()
    assert name in ("l.weight", "w") and t.numel() == 0 and t.dtype == torch.bfloat16 and t.shape[0] in (4, 2)
