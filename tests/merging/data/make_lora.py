"""Writes the LoRA fixtures the default tests compare against, with peft itself (run by hand,
needs ``pip install peft transformers``): for each case a base checkpoint, the adapter folder
peft's ``save_pretrained`` wrote, and ``merged.safetensors``, the state dict of peft's
``merge_and_unload()`` (the tensors ``surgery merge-lora`` must reproduce within 1e-5).

    python tests/merging/data/make_lora.py   # rewrites tests/merging/data/lora_*/
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


class Net(nn.Module):
    """Every layer kind merge-lora handles: an embedding, a 3x3 and a 1x1 conv, linears, a head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.pw = nn.Conv2d(5, 4, 1)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)
        self.norm = nn.LayerNorm(8)


def randomize(model: nn.Module, seed: int) -> None:
    """peft starts lora_B (or the embedding's A) at zero: a merge would change nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # the LoRA factors, modules_to_save copies, biases bias="lora_only" trains
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def write_case(name: str, base: nn.Module, config, save_base, safe: bool = True, seed: int = 0) -> None:
    from peft import get_peft_model
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = HERE / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    save_base(base, out)
    keys = set()
    for f in out.rglob("*.safetensors"):  # the names the base file holds (GPT-2's tied lm_head is not one)
        with safe_open(f, "pt") as h:
            keys |= set(h.keys())
    model = get_peft_model(base, config)
    randomize(model, seed)
    model.save_pretrained(out / "adapter", safe_serialization=safe)
    merged = model.merge_and_unload().state_dict()
    save_file({k: v.detach().clone().contiguous() for k, v in merged.items() if k in keys}, out / "merged.safetensors")
    (out / "adapter" / "README.md").unlink(missing_ok=True)


def net_file(model: nn.Module, out: Path) -> None:
    from safetensors.torch import save_file

    save_file(model.state_dict(), out / "base.safetensors")


def main() -> int:
    from peft import LoraConfig

    torch.manual_seed(0)
    write_case("lora_net", Net(), LoraConfig(
        r=4, lora_alpha=8, target_modules=["emb", "conv", "pw", "body.0", "body.2"], modules_to_save=["head"],
        rank_pattern={"body.2": 2, "conv": 3}, alpha_pattern={"pw": 3}, bias="lora_only"), net_file)
    torch.manual_seed(1)
    write_case("lora_rslora_bin", Net(), LoraConfig(r=4, lora_alpha=6, use_rslora=True,
                                                    target_modules=["conv", "body.0", "head"]), net_file, safe=False, seed=1)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    gpt = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16))
    write_case("lora_gpt2", gpt, LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
               lambda m, out: m.save_pretrained(out / "base"), seed=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
