"""Make the mergekit reference outputs tests/merging/test_merge_mergekit.py compares against.

Run in an environment where mergekit is installed (it is not a dependency of surgery):

    PYTHONPATH=. python tests/merging/data/make_mergekit_reference.py

It writes, under tests/merging/data/mergekit/:
- inputs/{base,a,b}.safetensors: a tiny LlamaForCausalLM (float64) and two fine-tunes of it; a's
  final norm is 1.5x the base's, so SLERP meets a colinear pair and takes its linear fallback;
- CASE.safetensors: mergekit's ``run_merge`` output of each case in ``CASES`` (float64 in, float64
  out, so mergekit computes in float64 as surgery does);
- dare_l1_fixed_mask.safetensors, dare_none_fixed_mask.safetensors: mergekit's ``dare_linear`` kernel
  run tensor by tensor with torch.bernoulli replaced by surgery's seeded mask (seed 0), the one
  way to compare DARE's arithmetic when the two draw their random masks differently;
- cases.json: the cases, with the mergekit, transformers and torch versions used.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).parent / "mergekit"
DENSITY = 0.4
# name -> (mergekit config without models, {input: parameters}); surgery's equivalent is in the test
CASES = {
    "linear": ({"merge_method": "linear"}, {"a": {"weight": 1.0}, "b": {"weight": 3.0}, "base": {"weight": 0.5}}),
    "task_arithmetic": ({"merge_method": "task_arithmetic", "base_model": "base", "parameters": {"lambda": 0.8}},
                        {"a": {"weight": 1.0}, "b": {"weight": -0.5}}),
    "task_arithmetic_normalized": ({"merge_method": "task_arithmetic", "base_model": "base",
                                    "parameters": {"normalize": True}},
                                   {"a": {"weight": 2.0}, "b": {"weight": 1.0}}),
    "ties": ({"merge_method": "ties", "base_model": "base"},
             {"a": {"weight": 1.0, "density": DENSITY}, "b": {"weight": 1.0, "density": DENSITY}}),
    "ties_weighted": ({"merge_method": "ties", "base_model": "base", "parameters": {"lambda": 1.3}},
                      {"a": {"weight": 0.7, "density": DENSITY}, "b": {"weight": 0.2, "density": DENSITY}}),
    "slerp": ({"merge_method": "slerp", "base_model": "base", "parameters": {"t": 0.3}}, {"base": {}, "a": {}}),
    "dare_linear": ({"merge_method": "dare_linear", "base_model": "base"},
                    {"a": {"weight": 1.0, "density": DENSITY}}),
}


def make_inputs(folder: Path) -> dict[str, Path]:
    """The base and two fine-tunes, as Hugging Face folders (mergekit's input) in ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg).to(torch.float64)
    for p in base.parameters():  # norms start at exactly 1: make every tensor generic
        p.data.add_(torch.randn_like(p) * 0.02)
    paths = {}
    g = torch.Generator().manual_seed(1)
    for name in ("base", "a", "b"):
        model = LlamaForCausalLM(cfg).to(torch.float64)
        sd = {k: v.clone() for k, v in base.state_dict().items()}
        if name != "base":
            for k, v in sd.items():
                v.add_(torch.randn(v.shape, generator=g, dtype=torch.float64) * 0.05)
        if name == "a":
            sd["model.norm.weight"] = base.state_dict()["model.norm.weight"] * 1.5  # colinear with the base
        model.load_state_dict(sd)
        paths[name] = folder / name
        model.save_pretrained(paths[name])
    return paths


def run_mergekit(name: str, inputs: dict[str, Path], out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    head, models = CASES[name]
    cfg = {**head, "dtype": "float64", "out_dtype": "float64",
           "models": [{"model": str(inputs[m]), "parameters": p} for m, p in models.items()]}
    if "base_model" in cfg:
        cfg["base_model"] = str(inputs[cfg["base_model"]])
    run_merge(MergeConfiguration.model_validate(cfg), str(out), MergeOptions(copy_tokenizer=False,
                                                                             write_model_card=False))


def dare_fixed_mask(inputs: dict[str, Path], rescale: bool) -> dict[str, torch.Tensor]:
    """mergekit's dare_linear kernel on every tensor with surgery's mask for model 0, seed 0."""
    import mergekit.sparsify
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods import registry

    from surgery.merging.methods import dare_generator, keep_mask

    base, a = (load_file(inputs[n] / "model.safetensors") for n in ("base", "a"))
    method = registry.get("dare_linear")
    out = {}
    real = torch.bernoulli
    for k in base:
        mask = keep_mask(base[k].shape, DENSITY, dare_generator(0, 0, k))
        mergekit.sparsify.torch.bernoulli = lambda p, mask=mask: mask.to(p.dtype)
        try:
            group = TensorGroup.from_tensors([base[k], a[k]], ids=["base", "a"], base_index=0, name=k)
            out[k] = method.merge_group(group, **{"int8_mask": False, "normalize": False, "rescale": rescale,
                                                  "lambda": 1.0, "weight": {"a": 1.0}, "density": {"a": DENSITY}})
        finally:
            mergekit.sparsify.torch.bernoulli = real
    return out


def make(folder: Path) -> dict:
    """Write the inputs and mergekit's outputs into ``folder``; the versions that made them."""
    import importlib.metadata as md

    (folder / "inputs").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = make_inputs(Path(tmp))
        for n, p in inputs.items():
            shutil.copy(p / "model.safetensors", folder / "inputs" / f"{n}.safetensors")
        for name in CASES:
            run_mergekit(name, inputs, Path(tmp) / name)
            shutil.copy(Path(tmp) / name / "model.safetensors", folder / f"{name}.safetensors")
        save_file(dare_fixed_mask(inputs, True), folder / "dare_l1_fixed_mask.safetensors")
        save_file(dare_fixed_mask(inputs, False), folder / "dare_none_fixed_mask.safetensors")
    versions = {p: md.version(p) for p in ("mergekit", "transformers", "torch")}
    (folder / "cases.json").write_text(json.dumps({"versions": versions, "density": DENSITY, "cases": CASES},
                                                  indent=1) + "\n")
    return versions


if __name__ == "__main__":
    print(make(HERE))
