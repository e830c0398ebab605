"""FP8 weights with scales beside them (DeepSeek / Hugging Face fine-grained FP8): --dtype refuses
to cast them without their scales, --dequantize applies the scales bit for bit as transformers
does, inspect says which tensors are scaled."""

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

F8 = torch.float8_e4m3fn
ROWS, COLS = 300, 200  # 128x128 blocks are ragged both ways: scales [3, 2]


def fp8_weight(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 50).to(F8)


def scales(*shape: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) * 0.01 + 1e-4


def reference(w: torch.Tensor, s: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """transformers' fine-grained FP8 dequantization, written out: the block scales expanded with
    repeat_interleave and cropped to the weight's shape, then multiplied in float32."""
    w32, s32 = w.to(torch.float32), s.to(torch.float32)
    if s.numel() == 1:
        return w32 * s32.reshape(())
    if s.shape in ((w.shape[0],), (w.shape[0], 1)) and w.dim() == 2:
        return w32 * s32.reshape(-1, 1)
    rows, cols = w.shape[-2:]
    expanded = s32.repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)[..., :cols]
    return w32 * expanded


def checkpoint(path, scale: torch.Tensor | None = None, suffix: str = "_scale_inv", **extra: torch.Tensor):
    """Two FP8 linear layers, their scales, an unquantized norm and bias: a DeepSeek-style file."""
    tensors = {"layers.0.weight": fp8_weight(ROWS, COLS), "layers.1.weight": fp8_weight(ROWS, COLS, seed=2),
               "norm.weight": torch.ones(COLS, dtype=torch.bfloat16), "layers.0.bias": torch.zeros(ROWS)}
    tensors["layers.0.weight" + suffix] = scales(3, 2) if scale is None else scale
    tensors["layers.1.weight" + suffix] = scales(3, 2, seed=3) if scale is None else scale * 2
    tensors.update(extra)
    save_file(tensors, str(path))
    return tensors


def test_dtype_refuses_scaled_fp8_in_one_line_and_writes_nothing(cli, tmp_path):
    src, dst = tmp_path / "fp8.safetensors", tmp_path / "out.safetensors"
    checkpoint(src)
    for extra in ((), ("--dry-run",)):
        r = cli("remap", src, dst, "--dtype", "bf16", *extra)
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        err = r.stderr.strip()
        assert len(err.splitlines()) == 1
        assert "'layers.0.weight' (F8_E4M3, scale 'layers.0.weight_scale_inv')" in err
        assert "--dequantize" in err and "Nothing was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp8.safetensors"]


def test_dtype_refusal_from_a_rules_file_and_the_python_api(cli, tmp_path):
    src, dst = tmp_path / "fp8.safetensors", tmp_path / "out.pt"
    tensors = checkpoint(src, suffix="_scale")  # vLLM / compressed-tensors name it weight_scale
    rules = tmp_path / "rules.yaml"
    rules.write_text("ops:\n  - dtype: bf16\n")
    r = cli("remap", src, dst, "--rules", rules)
    assert r.exit_code == 2 and "'layers.1.weight_scale'" in r.stderr, r.output
    with pytest.raises(RuleError, match=r"--dtype F16 would cast 2 scaled FP8 tensors"):
        surgery.remap(src, dst, [Op("dtype", "fp16")])
    with pytest.raises(RuleError, match="add --dequantize"):
        cast(tensors, "bf16")
    assert not dst.exists()


def test_dropping_the_scaled_weights_lets_the_cast_through(tmp_path):
    src, dst = tmp_path / "fp8.safetensors", tmp_path / "out.safetensors"
    checkpoint(src)
    surgery.remap(src, dst, [Op("drop", r"^layers\.\d\.weight$"), Op("dtype", "bf16")])
    assert set(load_file(str(dst))) == {"norm.weight", "layers.0.bias", "layers.0.weight_scale_inv",
                                        "layers.1.weight_scale_inv"}


def test_unscaled_fp8_is_still_cast(cli, tmp_path):
    src, dst = tmp_path / "plain.safetensors", tmp_path / "out.safetensors"
    w = fp8_weight(ROWS, COLS)
    save_file({"w": w, "w_amax": torch.ones(1)}, str(src))  # no scale beside it
    r = cli("remap", src, dst, "--dtype", "bf16", "--verify")
    assert r.exit_code == 0, r.output
    assert torch.equal(load_file(str(dst))["w"], w.to(torch.bfloat16))


@pytest.mark.parametrize("out", ["out.safetensors", "out.pt", "sharded"])
def test_dequantize_applies_block_scales_bit_for_bit(cli, tmp_path, out):
    src, dst = tmp_path / "fp8.safetensors", tmp_path / out
    t = checkpoint(src)
    r = cli("remap", src, dst, "--dequantize", "--verify", "--shard-size", "100KB", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["dropped"] == 2 and {"op": "--dequantize", "matched": 2} in report["ops"]
    got = surgery.open(dst).state_dict()
    assert set(got) == {"layers.0.weight", "layers.1.weight", "norm.weight", "layers.0.bias"}  # scales dropped
    for i in (0, 1):
        w = got[f"layers.{i}.weight"]
        assert w.dtype == torch.bfloat16
        want = reference(t[f"layers.{i}.weight"], t[f"layers.{i}.weight_scale_inv"]).to(torch.bfloat16)
        assert torch.equal(w.view(torch.int16), want.view(torch.int16))
    assert torch.equal(got["norm.weight"], t["norm.weight"]) and got["layers.0.bias"].dtype == torch.float32


@pytest.mark.parametrize("scale", [torch.tensor(0.02), torch.tensor([0.02]), scales(ROWS), scales(ROWS, 1)],
                         ids=["scalar", "one", "rows", "rows-1"])
def test_dequantize_per_tensor_and_per_channel_scales(tmp_path, scale):
    src, dst = tmp_path / "fp8.safetensors", tmp_path / "out.safetensors"
    t = checkpoint(src, scale=scale)
    surgery.remap(src, dst, [Op("dequantize"), Op("dtype", "fp32")], verify=True)
    got = load_file(str(dst))
    assert "layers.0.weight_scale_inv" not in got
    want = reference(t["layers.0.weight"], t["layers.0.weight_scale_inv"])
    assert got["layers.0.weight"].dtype == torch.float32 and torch.equal(got["layers.0.weight"], want)


def test_a_block_size_from_config_json_is_honoured(cli, tmp_path):
    src, dst = tmp_path / "fp8.safetensors", tmp_path / "out.safetensors"
    t = checkpoint(src, scale=scales(5, 4))  # 64x64 blocks of 300x200
    r = cli("remap", src, dst, "--dequantize")
    assert r.exit_code == 2 and "[3, 2] (128x128 blocks)" in r.stderr and not dst.exists(), r.output
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "fp8", "weight_block_size": [64, 64]}}))
    r = cli("remap", src, dst, "--dequantize")
    assert r.exit_code == 0, r.output
    want = reference(t["layers.0.weight"], t["layers.0.weight_scale_inv"], (64, 64)).to(torch.bfloat16)
    assert torch.equal(load_file(str(dst))["layers.0.weight"], want)
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"weight_block_size": [64]}}))
    r = cli("remap", src, dst, "--dequantize", "--force")
    assert r.exit_code == 2 and "weight_block_size is [64], not two positive integers" in r.stderr, r.output


def test_scales_that_do_not_fit_their_weight_are_refused(cli, tmp_path):
    src, dst = tmp_path / "fp8.safetensors", tmp_path / "out.safetensors"
    checkpoint(src, scale=scales(3, 3))
    r = cli("remap", src, dst, "--dequantize")
    assert r.exit_code == 2 and "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 1, r.output
    err = r.stderr
    assert "'layers.0.weight' F8_E4M3[300, 200] with 'layers.0.weight_scale_inv' [3, 3]" in err
    assert "[3, 2] (128x128 blocks), one value (per tensor), [300] or [300, 1] (per row)" in err
    assert "Nothing was written" in err and not dst.exists()
    save_file({"w": fp8_weight(4, 4), "w_scale": torch.ones(2, dtype=torch.int32)}, str(src))  # not a float scale
    assert cli("remap", src, dst, "--dequantize", "--force").exit_code == 2


def test_a_moe_stack_of_experts_is_dequantized_per_expert(tmp_path):
    src, dst = tmp_path / "moe.safetensors", tmp_path / "out.safetensors"
    w, s = fp8_weight(3, 260, 130), scales(3, 3, 2)
    save_file({"experts.weight": w, "experts.weight_scale_inv": s}, str(src))
    surgery.remap(src, dst, [Op("dequantize")])
    assert torch.equal(load_file(str(dst))["experts.weight"], reference(w, s).to(torch.bfloat16))


def test_a_scaled_weight_streams_from_its_own_bytes_and_its_scale_only(tmp_path):
    src = tmp_path / "fp8.safetensors"
    checkpoint(src)
    ckpt = open_checkpoint(src)
    rows, _ = build_plan(ckpt, Rules([Op("dequantize")]))
    row = next(r for r in rows if r.old == "layers.1.weight")
    read: list[str] = []
    real = ckpt.tensor
    ckpt.tensor = lambda name: read.append(name) or real(name)  # type: ignore[method-assign]
    fn = source(ckpt, row)
    assert callable(fn) and not read  # nothing read until the writer asks
    assert len(bytes(fn())) == ROWS * COLS * 2
    assert read == ["layers.1.weight", "layers.1.weight_scale_inv"]
    plain = next(r for r in rows if r.old == "layers.0.bias")
    assert isinstance(source(ckpt, plain), tuple)  # unconverted tensors still copy their byte range


def test_in_memory_state_dicts(tmp_path):
    t = checkpoint(tmp_path / "fp8.safetensors")
    out = dequantize(t)
    assert set(out) == {"layers.0.weight", "layers.1.weight", "norm.weight", "layers.0.bias"}
    assert torch.equal(out["layers.0.weight"], reference(t["layers.0.weight"], t["layers.0.weight_scale_inv"])
                       .to(torch.bfloat16))
    f32 = apply_rules(t, [Op("dequantize"), Op("dtype", "fp32")])
    assert torch.equal(f32["layers.1.weight"], reference(t["layers.1.weight"], t["layers.1.weight_scale_inv"]))


def test_matches_transformers_own_dequantization(tmp_path):
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    t = checkpoint(tmp_path / "fp8.safetensors")
    w, s = t["layers.0.weight"], t["layers.0.weight_scale_inv"]
    ours = dequantize(t, "fp32")["layers.0.weight"]
    theirs = fp8._dequantize_fp8_weight(w, s, [128, 128], torch.float32)
    assert torch.equal(ours, theirs) and torch.equal(ours, reference(w, s))
    even_w, even_s = fp8_weight(256, 384), scales(2, 3)  # its loader's path needs whole blocks
    loaded = fp8.Fp8Dequantize(None)._dequantize_one(even_w, even_s, output_dtype=torch.bfloat16)
    assert torch.equal(dequantize({"x.weight": even_w, "x.weight_scale_inv": even_s})["x.weight"], loaded)


def test_inspect_names_the_scaled_tensors(cli, tmp_path):
    src = tmp_path / "fp8.safetensors"
    checkpoint(src)
    r = cli("inspect", src, "--depth", "0")
    assert r.exit_code == 0, r.output
    assert ("fp8 2 tensors F8_E4M3 with block scales 128x128 (layers.0.weight_scale_inv, layers.1.weight_scale_inv); "
            "--dequantize applies them") in " ".join(r.stdout.split())
    data = json.loads(cli("inspect", src, "--json").stdout)
    assert data["scaled_fp8"] == [
        {"tensor": "layers.0.weight", "dtype": "F8_E4M3", "scale": "layers.0.weight_scale_inv", "scale_shape": [3, 2],
         "layout": "block", "block": [128, 128]},
        {"tensor": "layers.1.weight", "dtype": "F8_E4M3", "scale": "layers.1.weight_scale_inv", "scale_shape": [3, 2],
         "layout": "block", "block": [128, 128]}]
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(plain))
    assert json.loads(cli("inspect", plain, "--json").stdout)["scaled_fp8"] == []
    assert not any(ln.startswith("fp8") for ln in cli("inspect", plain).stdout.splitlines())


def test_inspect_finds_them_without_importing_torch(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    src = tmp_path / "fp8.safetensors"
    checkpoint(src)
    code = ("import sys, surgery; r = surgery.inspect(sys.argv[1]); assert len(r.scaled_fp8[0]) == 2; "
            "assert 'torch' not in sys.modules, 'inspect imported torch'")
    subprocess.run([sys.executable, "-c", code, str(src)], check=True, cwd=Path(__file__).parents[2])
