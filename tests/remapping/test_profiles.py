"""Shipped profiles: GPT-2 Conv1D -> Linear, Llama Hugging Face <-> Meta, against the reference formulas."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import surgery
from surgery.errors import RuleError
from surgery.remapping import Op, Rules, list_profiles, profile_rules
from surgery.remapping.profiles import PROFILE_DIR

DIM, HEADS, KV_HEADS, LAYERS, HIDDEN = 16, 4, 2, 2, 24
HEAD_DIM = DIM // HEADS
# torchtune's convert_weights maps, composed: HF -> torchtune (_FROM_HF) -> Meta (_FROM_META inverted)
HF_TO_META = {
    "model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
}


def _permute(t, n_heads, direction):
    """torchtune's convert_weights._permute, written out: hf_to_tune views (n_heads, 2, head_dim // 2,
    dim), tune_to_hf (n_heads, head_dim // 2, 2, dim); torchtune's layout is Meta's."""
    view = (n_heads, 2, HEAD_DIM // 2, DIM) if direction == "hf-to-meta" else (n_heads, HEAD_DIM // 2, 2, DIM)
    return t.view(*view).transpose(1, 2).reshape(HEAD_DIM * n_heads, DIM)


def _meta_name(hf: str) -> str:
    abstract = re.sub(r"\.\d+\.", ".{}.", hf)
    layer = re.search(r"\.(\d+)\.", hf)
    return HF_TO_META[abstract].format(layer.group(1) if layer else "")


@pytest.fixture
def hf_llama(tmp_path):
    """A tiny Llama in Hugging Face's names, with grouped-query attention, and its config.json."""
    torch.manual_seed(0)
    shapes = {"model.embed_tokens.weight": (10, DIM), "model.norm.weight": (DIM,), "lm_head.weight": (10, DIM)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, DIM), p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, DIM),
                       p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, DIM), p + "self_attn.o_proj.weight": (DIM, DIM),
                       p + "mlp.gate_proj.weight": (HIDDEN, DIM), p + "mlp.up_proj.weight": (HIDDEN, DIM),
                       p + "mlp.down_proj.weight": (DIM, HIDDEN), p + "input_layernorm.weight": (DIM,),
                       p + "post_attention_layernorm.weight": (DIM,)})
    sd = {k: torch.randn(s) for k, s in shapes.items()}
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(sd, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS}))
    return folder / "model.safetensors", sd


def test_list_profiles_one_line_each(cli):
    shipped = dict(list_profiles())
    assert {"gpt2-conv1d-to-linear", "llama-hf-to-meta", "llama-meta-to-hf"} <= set(shipped)
    assert all(d and "\n" not in d for d in shipped.values())
    r = cli("remap", "--list-profiles")
    assert r.exit_code == 0 and len(r.stdout.strip().splitlines()) == len(shipped)
    assert r.stdout.startswith("gpt2-conv1d-to-linear  GPT-2's Conv1D")


def test_profiles_are_package_data():
    text = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert '"remapping/profiles/*.yaml"' in text and PROFILE_DIR.name == "profiles"


def test_llama_hf_to_meta_matches_torchtune_formula(hf_llama, tmp_path):
    src, sd = hf_llama
    dst = tmp_path / "meta.safetensors"
    report = surgery.remap(src, dst, profile_rules("llama-hf-to-meta", src), verify=True, verify_roundtrip=True)
    assert report.roundtrip == len(sd)
    meta = load_file(dst)
    assert sorted(meta) == sorted(_meta_name(k) for k in sd)
    for hf, t in sd.items():
        want = (_permute(t, HEADS, "hf-to-meta") if "q_proj" in hf else _permute(t, KV_HEADS, "hf-to-meta")
                if "k_proj" in hf else t)
        assert torch.equal(meta[_meta_name(hf)], want), hf


def test_llama_round_trip_hf_meta_hf_bit_exact(hf_llama, tmp_path, cli):
    src, sd = hf_llama
    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()
    (meta_dir / "params.json").write_text(json.dumps({"dim": DIM, "n_heads": HEADS, "n_kv_heads": KV_HEADS}))
    r = cli("remap", src, meta_dir / "consolidated.00.safetensors", "--profile", "llama-hf-to-meta", "--verify")
    assert r.exit_code == 0, r.output
    back = tmp_path / "back.safetensors"
    r = cli("remap", meta_dir / "consolidated.00.safetensors", back, "--profile", "llama-meta-to-hf", "--verify",
            "--verify-roundtrip")
    assert r.exit_code == 0 and "round trip A -> B -> A bit-exact (21 tensors)" in r.stdout, r.output
    again = load_file(back)
    assert sorted(again) == sorted(sd)
    for k, t in sd.items():
        assert torch.equal(again[k].view(torch.uint8), t.view(torch.uint8)), k


def test_heads_from_the_command_line_and_missing_heads(hf_llama, tmp_path, cli):
    src, _ = hf_llama
    (src.parent / "config.json").unlink()
    dst = tmp_path / "meta.safetensors"
    r = cli("remap", src, dst, "--profile", "llama-hf-to-meta", "--heads", "4")
    assert r.exit_code == 2 and "needs {kv_heads}, which is not known: pass --kv-heads M" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not dst.exists()
    r = cli("remap", src, dst, "--profile", "llama-hf-to-meta", "--heads", "4", "--kv-heads", "4")
    assert r.exit_code == 2 and "'model.layers.0.self_attn.k_proj.weight' head size 2 (8 rows / 4 heads)" in r.output
    assert "head size 4 (16 rows / 4 heads)" in r.output and not dst.exists()
    r = cli("remap", src, dst, "--profile", "llama-hf-to-meta", "--heads", "4", "--kv-heads", "2", "--verify-roundtrip")
    assert r.exit_code == 0, r.output
    r = cli("remap", src, dst, "--profile", "no-such", "--force")
    assert r.exit_code == 2 and "unknown profile 'no-such'; shipped: gpt2-conv1d-to-linear" in r.output


def test_config_without_kv_heads_means_as_many_as_heads(tmp_path):
    from surgery.remapping.profiles import variables

    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 8}))
    assert variables(tmp_path / "model.safetensors") == {"heads": 8, "kv_heads": 8}
    assert variables(tmp_path / "model.safetensors", kv_heads=2) == {"heads": 8, "kv_heads": 2}
    with pytest.raises(RuleError, match="--heads must be a positive"):
        variables(tmp_path, heads=0)


def test_profile_ops_run_before_rules_and_command_line(hf_llama, tmp_path, cli):
    src, _ = hf_llama
    rules = tmp_path / "more.yaml"
    rules.write_text("ops:\n  - drop: '^output\\.'\n")
    r = cli("remap", src, tmp_path / "m.safetensors", "--profile", "llama-hf-to-meta", "--rules", rules,
            "--rename", "^tok_embeddings=>embed", "--json", "--dry-run")
    assert r.exit_code == 0, r.output
    names = {t["new"] for t in json.loads(r.stdout)["tensors"]}
    assert "embed.weight" in names and None in names and "output.weight" not in names


def test_a_copied_profile_is_a_rules_file(tmp_path):
    copy = tmp_path / "mine.yaml"
    copy.write_text((PROFILE_DIR / "llama-hf-to-meta.yaml").read_text())
    rules = Rules.from_file(copy, {"heads": 32, "kv_heads": 8})
    assert Op("rope_permute", r"^model\.layers\.\d+\.self_attn\.k_proj\.weight$", "8,hf-to-meta") in rules.ops
    with pytest.raises(RuleError, match=r"op #2 needs \{heads\}, which is not known: pass --heads N"):
        Rules.from_file(copy)


def test_gpt2_conv1d_to_linear(tmp_path):
    torch.manual_seed(0)
    sd = {"transformer.wte.weight": torch.randn(10, 8), "transformer.h.0.attn.c_attn.weight": torch.randn(8, 24),
          "transformer.h.0.attn.c_attn.bias": torch.randn(24), "transformer.h.0.attn.c_proj.weight": torch.randn(8, 8),
          "transformer.h.0.mlp.c_fc.weight": torch.randn(8, 32), "transformer.h.0.mlp.c_proj.weight": torch.randn(32, 8),
          "transformer.h.0.ln_1.weight": torch.randn(8), "lm_head.weight": torch.randn(10, 8)}
    save_file(sd, tmp_path / "gpt2.safetensors")
    report = surgery.remap(tmp_path / "gpt2.safetensors", tmp_path / "linear.safetensors",
                           profile_rules("gpt2-conv1d-to-linear"), verify=True, verify_roundtrip=True)
    out = load_file(tmp_path / "linear.safetensors")
    transposed = {k for k in sd if re.search(r"\.(c_attn|c_proj|c_fc)\.weight$", k)}
    assert len(transposed) == 4 and report.op_counts[0][1] == 4
    for k, t in sd.items():
        assert torch.equal(out[k], t.t() if k in transposed else t), k
    # nn.Linear with the transposed weight computes what Conv1D (x @ W + b) computes
    x = torch.randn(3, 8)
    lin = torch.nn.Linear(8, 24)
    lin.load_state_dict({"weight": out["transformer.h.0.attn.c_attn.weight"], "bias": out["transformer.h.0.attn.c_attn.bias"]})
    torch.testing.assert_close(lin(x), x @ sd["transformer.h.0.attn.c_attn.weight"] + sd["transformer.h.0.attn.c_attn.bias"])


def _torchtune_convert_weights():
    """torchtune's convert_weights module, loaded from its file (torchtune's package imports torchao)."""
    try:
        spec = importlib.util.find_spec("torchtune")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchtune is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "convert_weights.py"
    mod_spec = importlib.util.spec_from_file_location("_tt_convert_weights", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def test_against_torchtune_itself(hf_llama, tmp_path):
    cw = _torchtune_convert_weights()
    src, sd = hf_llama
    dst = tmp_path / "meta.safetensors"
    surgery.remap(src, dst, profile_rules("llama-hf-to-meta", src))
    meta = load_file(dst)
    tune = cw.hf_to_tune(sd, num_heads=HEADS, num_kv_heads=KV_HEADS, dim=DIM)
    want = cw.tune_to_meta(tune)
    assert sorted(meta) == sorted(want) and all(torch.equal(meta[k], want[k]) for k in want)
    back = tmp_path / "hf.safetensors"
    surgery.remap(dst, back, profile_rules("llama-meta-to-hf", heads=HEADS, kv_heads=KV_HEADS))
    hf = cw.tune_to_hf(cw.meta_to_tune(meta), num_heads=HEADS, num_kv_heads=KV_HEADS, dim=DIM)
    ours = load_file(back)
    assert sorted(ours) == sorted(hf) and all(torch.equal(ours[k], hf[k]) for k in hf)
