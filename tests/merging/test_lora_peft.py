"""Live comparisons with peft (skipped where it is not installed; CI's `.[test]` does not install it,
the committed fixtures of test_lora_merge.py stand in): adapters peft builds now, merged by surgery and
by merge_and_unload(); adapters surgery extracts, loaded by PeftModel.from_pretrained."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import load_file, save_file

import surgery
from tests import REPO

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.slow  # importing peft (and transformers) takes seconds

_spec = importlib.util.spec_from_file_location("make_lora", REPO / "tests" / "merging" / "data" / "make_lora.py")
make_lora = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_lora)  # type: ignore[union-attr]


def _peft_merge(tmp_path, model, config, seed):
    base = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(base, tmp_path / "base.safetensors")
    pm = peft.get_peft_model(model, config)
    make_lora.randomize(pm, seed)
    pm.save_pretrained(tmp_path / "adapter")
    return {k: v for k, v in pm.merge_and_unload().state_dict().items() if k in base}


@pytest.mark.parametrize("config", [
    dict(r=8, lora_alpha=16, target_modules=["conv", "pw", "body.0", "body.2", "emb"], modules_to_save=["head"]),
    dict(r=4, lora_alpha=4, use_rslora=True, target_modules=["conv", "head"], bias="all"),
    dict(r=6, lora_alpha=2, target_modules=["conv", "pw", "body.2"], rank_pattern={"pw": 1}, alpha_pattern={"conv": 7}),
])
def test_surgery_merge_is_peft_merge(tmp_path, config):
    torch.manual_seed(3)
    want = _peft_merge(tmp_path, make_lora.Net(), peft.LoraConfig(**config), seed=3)
    surgery.merge_lora(tmp_path / "base.safetensors", tmp_path / "adapter", tmp_path / "m.safetensors")
    got = load_file(tmp_path / "m.safetensors")
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert torch.allclose(got[k], v, rtol=0, atol=1e-5), k


def test_peft_loads_an_extracted_adapter_and_merges_it_as_surgery_does(tmp_path):
    torch.manual_seed(4)
    net = make_lora.Net()
    base = {k: v.clone() for k, v in net.state_dict().items()}
    tuned = {k: v + 0.1 * torch.randn_like(v) if v.dim() >= 2 else v for k, v in base.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    surgery.extract_lora(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "lora", rank=3,
                         embeddings=["emb.weight"])
    surgery.merge_lora(tmp_path / "base.safetensors", tmp_path / "lora", tmp_path / "m.safetensors")
    ours = load_file(tmp_path / "m.safetensors")
    pm = peft.PeftModel.from_pretrained(net, tmp_path / "lora")
    theirs = pm.merge_and_unload().state_dict()
    for k, v in ours.items():
        assert torch.allclose(theirs[k], v, rtol=0, atol=1e-5), k
    assert not torch.equal(ours["conv.weight"], base["conv.weight"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_base_rounds_once_as_peft_does(tmp_path, dtype):
    """peft keeps the factors in float32 and adds the float32 delta into the half-precision weight:
    one rounding, which surgery's float32 sum cast back reproduces bit for bit."""
    torch.manual_seed(5)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["conv", "pw", "body.0", "emb"])
    want = _peft_merge(tmp_path, make_lora.Net().to(dtype), config, seed=5)
    surgery.merge_lora(tmp_path / "base.safetensors", tmp_path / "adapter", tmp_path / "m.safetensors")
    got = load_file(tmp_path / "m.safetensors")
    for k, v in want.items():
        assert got[k].dtype == dtype and torch.equal(got[k], v), k


def test_a_conv1d_beside_linears_merges_as_peft_merges_it(tmp_path):
    """peft rewrites fan_in_fan_out per layer kind while it wraps them (the saved config says what
    the last one set): GPT-2's Conv1D beside a non-square and a square nn.Linear."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn, self.score, self.sq = Conv1D(12, 6), nn.Linear(6, 3), nn.Linear(6, 6)

    torch.manual_seed(5)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "score", "sq"], fan_in_fan_out=True)
    want = _peft_merge(tmp_path, Mixed(), config, seed=5)
    surgery.merge_lora(tmp_path / "base.safetensors", tmp_path / "adapter", tmp_path / "m.safetensors")
    got = load_file(tmp_path / "m.safetensors")
    for k, v in want.items():
        assert torch.allclose(got[k], v, rtol=0, atol=1e-5), k
