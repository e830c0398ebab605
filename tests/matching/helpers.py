"""Checkpoints for the match tests: resnet18's keys renamed, keeping its structure; GPT-2 blocks
in Conv1D ([in, out]) and nn.Linear ([out, in]) layouts."""

from __future__ import annotations

import re

import torch


def scramble(key: str) -> str:
    """``layer1.0.conv1.weight`` -> ``stage_1.block0.c1.weight``: every name changes, numbers and leaves stay."""
    key = re.sub(r"^layer(\d)\.(\d)\.", r"stage_\1.block\2.", key)
    key = re.sub(r"\bconv(\d)", r"c\1", key)
    key = re.sub(r"\bbn(\d)", r"n\1", key)
    return key.replace("downsample", "skip").replace("fc.", "head.")


def resnet18_state(meta: bool) -> dict[str, torch.Tensor]:
    import torchvision

    if meta:
        with torch.device("meta"):
            return torchvision.models.resnet18().state_dict()
    torch.manual_seed(0)
    return torchvision.models.resnet18().state_dict()


def gpt2_conv1d(layers: int = 2, dim: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 names and Conv1D layouts, tiny and random (every tensor distinct)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"wte.weight": torch.randn(40, dim, generator=g), "wpe.weight": torch.randn(16, dim, generator=g)}
    for i in range(layers):
        h = f"h.{i}."
        for name, shape in (("ln_1.weight", (dim,)), ("ln_1.bias", (dim,)),
                            ("attn.c_attn.weight", (dim, 3 * dim)), ("attn.c_attn.bias", (3 * dim,)),
                            ("attn.c_proj.weight", (dim, dim)), ("attn.c_proj.bias", (dim,)),
                            ("ln_2.weight", (dim,)), ("ln_2.bias", (dim,)),
                            ("mlp.c_fc.weight", (dim, 4 * dim)), ("mlp.c_fc.bias", (4 * dim,)),
                            ("mlp.c_proj.weight", (4 * dim, dim)), ("mlp.c_proj.bias", (dim,))):
            sd[h + name] = torch.randn(*shape, generator=g)
    sd["ln_f.weight"], sd["ln_f.bias"] = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    return sd


CONV1D = re.compile(r"(c_attn|c_proj|c_fc)\.weight$")


def gpt2_linear(conv1d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """nanoGPT's layout of the same weights: ``transformer.`` in front, nn.Linear weights transposed."""
    return {f"transformer.{k}": (v.t().contiguous() if CONV1D.search(k) else v.clone()) for k, v in conv1d.items()}
