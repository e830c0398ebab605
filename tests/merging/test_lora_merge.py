"""`surgery merge-lora` against peft's own merge_and_unload(): the adapters and merged tensors in
tests/merging/data/lora_*/ were written by peft (make_lora.py there); the kohya spelling of the
same adapter merges alike; every adapter key that does not land is refused before any write."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import surgery
from tests import REPO

DATA = REPO / "tests" / "merging" / "data"
CASES = {"lora_net": "base.safetensors", "lora_rslora_bin": "base.safetensors", "lora_gpt2": "base"}
SCALES = {"body.0": 8 / 4, "body.2": 8 / 2, "conv": 8 / 3, "pw": 3 / 4}  # lora_net's r, alpha and their patterns


def _close(got: dict, want: dict, names=None) -> None:
    assert sorted(got) == sorted(want)
    for k in names or want:
        assert got[k].dtype == want[k].dtype and torch.allclose(got[k], want[k], rtol=0, atol=1e-5), k


@pytest.mark.parametrize("case", CASES)
def test_merge_equals_peft_merge_and_unload(tmp_path, cli, case):
    """Linear, Conv2d 3x3 and 1x1, Embedding, rank/alpha patterns, modules_to_save, bias="lora_only"
    (lora_net); rsLoRA read from a pickled adapter_model.bin (lora_rslora_bin); GPT-2's Conv1D with
    fan_in_fan_out from a Hugging Face folder (lora_gpt2)."""
    out = tmp_path / "merged.safetensors"
    r = cli("merge-lora", DATA / case / CASES[case], DATA / case / "adapter", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["schema"] == "surgery.merge-lora/1"
    want = load_file(DATA / case / "merged.safetensors")
    _close(load_file(out), want)
    base = load_file(DATA / case / CASES[case]) if case != "lora_gpt2" else load_file(DATA / case / "base" / "model.safetensors")
    changed = {k for k in want if not torch.equal(base[k], want[k])}
    assert changed == {m["name"] for m in data["merged"]} | {m["name"] for m in data["replaced"]}
    assert data["copied"] == len(want) - len(changed)


def test_the_net_case_reports_scales_and_replacements(tmp_path):
    rep = surgery.merge_lora(DATA / "lora_net" / "base.safetensors", DATA / "lora_net" / "adapter", tmp_path / "m.pt")
    got = {t.module.removeprefix("base_model.model."): (t.rank, t.scale, t.layout) for t in rep.merged}
    assert got == {"body.0": (4, 2.0, "linear"), "body.2": (2, 4.0, "linear"), "conv": (3, 8 / 3, "conv"),
                   "pw": (4, 0.75, "conv"), "emb": (4, 2.0, "embedding")}
    assert rep.replaced["head.weight"] == "base_model.model.head.weight"  # modules_to_save
    assert rep.replaced["conv.bias"] == "base_model.model.conv.base_layer.bias"  # bias="lora_only"
    _close(torch.load(tmp_path / "m.pt", weights_only=True), load_file(DATA / "lora_net" / "merged.safetensors"))


def _kohya(tmp_path):
    """lora_net's adapter spelled as kohya's sd-scripts write it, under a `unet.` base."""
    ad = load_file(DATA / "lora_net" / "adapter" / "adapter_model.safetensors")
    out = {}
    for module, scale in SCALES.items():
        flat = "lora_unet_" + module.replace(".", "_")
        a, b = ad[f"base_model.model.{module}.lora_A.weight"], ad[f"base_model.model.{module}.lora_B.weight"]
        out[f"{flat}.lora_down.weight"], out[f"{flat}.lora_up.weight"] = a, b
        out[f"{flat}.alpha"] = torch.tensor(scale * a.shape[0])
    save_file(out, tmp_path / "kohya.safetensors")
    base = load_file(DATA / "lora_net" / "base.safetensors")
    save_file({"unet." + k: v for k, v in base.items()}, tmp_path / "unet.safetensors")
    return base


def test_kohya_names_merge_like_peft(tmp_path):
    base = _kohya(tmp_path)
    rep = surgery.merge_lora(tmp_path / "unet.safetensors", tmp_path / "kohya.safetensors", tmp_path / "m.safetensors")
    assert sorted(t.name for t in rep.merged) == [f"unet.{m}.weight" for m in sorted(SCALES)]
    got, want = load_file(tmp_path / "m.safetensors"), load_file(DATA / "lora_net" / "merged.safetensors")
    for k in base:
        expect = want[k] if k.removesuffix(".weight") in SCALES else base[k]
        assert torch.allclose(got["unet." + k], expect, rtol=0, atol=1e-5), k


def test_older_peft_key_names_with_the_adapter_name(tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(DATA / "lora_net" / "adapter", folder)
    sd = load_file(folder / "adapter_model.safetensors")
    renamed = {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
               .replace("head.", "head.modules_to_save.default."): v for k, v in sd.items()}
    save_file(renamed, folder / "adapter_model.safetensors")
    surgery.merge_lora(DATA / "lora_net" / "base.safetensors", folder, tmp_path / "m.safetensors")
    _close(load_file(tmp_path / "m.safetensors"), load_file(DATA / "lora_net" / "merged.safetensors"))


def _adapter(tmp_path, tensors: dict, **config):
    folder = tmp_path / "ad"
    folder.mkdir(exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, **config}))
    return folder


@pytest.mark.parametrize("tensors, config, said", [
    ({"base_model.model.nothere.lora_A.weight": torch.ones(2, 6), "base_model.model.nothere.lora_B.weight": torch.ones(8, 2)},
     {}, "'base_model.model.nothere' ('base_model.model.nothere.lora_A.weight') has no weight in the base"),
    ({"base_model.model.body.0.lora_A.weight": torch.ones(2, 5), "base_model.model.body.0.lora_B.weight": torch.ones(8, 2)},
     {}, "delta [8, 5], but 'body.0.weight' is [8, 6]"),
    ({"base_model.model.body.0.lora_A.weight": torch.ones(2, 6)}, {}, "has lora_A but no lora_B"),
    ({"base_model.model.body.0.lora_A.weight": torch.ones(2, 6), "base_model.model.body.0.lora_B.weight": torch.ones(8, 2)},
     {"use_dora": True}, "DoRA"),
    ({"base_model.model.body.0.hada_w1_a": torch.ones(2, 6)}, {"peft_type": "LOHA"}, "peft_type 'LOHA' is not LoRA"),
    ({"base_model.model.body.0.lora_A.weight": torch.ones(2, 6), "base_model.model.body.0.lora_B.weight": torch.ones(8, 2),
      "base_model.model.body.0.lora_magnitude_vector": torch.ones(8)}, {}, "adapter kind surgery does not merge"),
    ({"base_model.model.body.0.lora_A.weight": torch.ones(2, 6), "base_model.model.body.0.lora_B.weight": torch.ones(8, 2)},
     {"r": 4}, "gives r=4 but its lora_A has rank 2"),
    ({"base_model.model.head.weight": torch.ones(4, 8)}, {}, "is [4, 8] but the base's 'head.weight' is [3, 8]"),
    ({"base_model.model.other.weight": torch.ones(4, 8)}, {}, "replaces a tensor the base does not have"),
    ({}, {}, "holds no LoRA tensors"),
])
def test_an_adapter_key_that_does_not_land_is_refused_before_any_write(tmp_path, cli, tensors, config, said):
    out = tmp_path / "m.safetensors"
    r = cli("merge-lora", DATA / "lora_net" / "base.safetensors", _adapter(tmp_path, tensors, **config), "--out", out)
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and said in r.output, r.output
    assert "Nothing was written" in r.output and not out.exists()


def test_problems_are_listed_together(tmp_path, cli):
    tensors = {"base_model.model.nothere.lora_A.weight": torch.ones(2, 6), "base_model.model.nothere.lora_B.weight": torch.ones(8, 2),
               "base_model.model.body.0.lora_A.weight": torch.ones(2, 5), "base_model.model.body.0.lora_B.weight": torch.ones(8, 2)}
    r = cli("merge-lora", DATA / "lora_net" / "base.safetensors", _adapter(tmp_path, tensors), "--out", tmp_path / "m.pt")
    assert r.exit_code == 2 and "nothere" in r.output and "[8, 5]" in r.output, r.output


def test_text_output_and_an_existing_out_needs_force(tmp_path, cli):
    args = ("merge-lora", DATA / "lora_gpt2" / "base", DATA / "lora_gpt2" / "adapter", "--out", tmp_path / "m.safetensors")
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert "transformer.h.0.attn.c_attn.weight  rank 4, scale 4, transposed" in r.output
    assert "6 tensors merged, " in r.output
    r = cli(*args)
    assert r.exit_code == 2 and "--force" in r.output


def test_a_tied_tensor_changes_with_its_twin_as_in_peft(tmp_path):
    """GPT-2 saved by torch.save keeps lm_head.weight tied to transformer.wte.weight: a LoRA on the
    embedding changes both, as peft's in-place merge changes the parameter they share."""
    sd = load_file(DATA / "lora_gpt2" / "base" / "model.safetensors")
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    torch.save(sd, tmp_path / "tied.pt")
    g = torch.Generator().manual_seed(0)
    ad = {"base_model.model.transformer.wte.lora_embedding_A": torch.randn(2, 40, generator=g),
          "base_model.model.transformer.wte.lora_embedding_B": torch.randn(16, 2, generator=g)}
    rep = surgery.merge_lora(tmp_path / "tied.pt", _adapter(tmp_path, ad), tmp_path / "m.safetensors")
    assert sorted(t.name for t in rep.merged) == ["lm_head.weight", "transformer.wte.weight"]
    got = load_file(tmp_path / "m.safetensors")
    want = sd["transformer.wte.weight"] + (ad["base_model.model.transformer.wte.lora_embedding_B"]
                                           @ ad["base_model.model.transformer.wte.lora_embedding_A"]).T
    assert torch.allclose(got["transformer.wte.weight"], want, atol=1e-5)
    assert torch.equal(got["lm_head.weight"], got["transformer.wte.weight"])


def test_peft_names_without_a_config_are_refused(tmp_path, cli):
    folder = tmp_path / "noconf"
    folder.mkdir()
    shutil.copy(DATA / "lora_net" / "adapter" / "adapter_model.safetensors", folder)
    r = cli("merge-lora", DATA / "lora_net" / "base.safetensors", folder, "--out", tmp_path / "m.pt")
    assert r.exit_code == 2 and "no adapter_config.json" in r.output, r.output


def test_a_diffusers_file_without_alphas_has_scale_one(tmp_path):
    """diffusers' LoRA attention processor names (`.lora.down.weight`) under a pipeline's `unet.`,
    merged into a UNet-only base: no config and no alpha, so alpha = rank as diffusers loads it."""
    base = load_file(DATA / "lora_net" / "base.safetensors")
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 8, generator=g), torch.randn(8, 3, generator=g)
    save_file({"unet.body.2.lora.down.weight": a, "unet.body.2.lora.up.weight": b}, tmp_path / "lora.safetensors")
    rep = surgery.merge_lora(DATA / "lora_net" / "base.safetensors", tmp_path / "lora.safetensors", tmp_path / "m.safetensors")
    assert [(t.name, t.scale) for t in rep.merged] == [("body.2.weight", 1.0)]
    got = load_file(tmp_path / "m.safetensors")
    assert torch.allclose(got["body.2.weight"], base["body.2.weight"] + b @ a, atol=1e-6)


@pytest.mark.parametrize("config, said", [
    ({"r": "4"}, "r is '4', not a positive number"),
    ({"lora_alpha": None}, "lora_alpha is None"),
    ({"rank_pattern": {"(": 2}}, "rank_pattern pattern '(' is not a regular expression"),
    ({"alpha_pattern": {"body": -1}}, "alpha_pattern['body'] is -1"),
])
def test_a_malformed_config_is_one_line(tmp_path, cli, config, said):
    tensors = {"base_model.model.body.0.lora_A.weight": torch.ones(2, 6), "base_model.model.body.0.lora_B.weight": torch.ones(8, 2)}
    r = cli("merge-lora", DATA / "lora_net" / "base.safetensors", _adapter(tmp_path, tensors, **config), "--out", tmp_path / "m.pt")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and said in r.output, r.output


def _merge_kohya_with(tmp_path, cli, name: str, value: torch.Tensor):
    """merge-lora of the kohya adapter with tensor ``name`` set to ``value``."""
    _kohya(tmp_path)
    sd = load_file(tmp_path / "kohya.safetensors")
    sd[name] = value
    save_file(sd, tmp_path / "kohya.safetensors")
    return cli("merge-lora", tmp_path / "unet.safetensors", tmp_path / "kohya.safetensors", "--out", tmp_path / "m.pt")


def test_a_kohya_alpha_must_be_one_value(tmp_path, cli):
    r = _merge_kohya_with(tmp_path, cli, "lora_unet_conv.alpha", torch.ones(2))
    assert r.exit_code == 2 and "'lora_unet_conv.alpha' holds 2 values" in r.output, r.output


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
def test_a_kohya_alpha_that_is_not_finite_is_refused(tmp_path, cli, alpha):
    """A NaN or infinite alpha would turn every merged weight of its module into NaN or inf."""
    r = _merge_kohya_with(tmp_path, cli, "lora_unet_conv.alpha", torch.tensor(alpha))
    assert r.exit_code == 2 and f"'lora_unet_conv.alpha' is {alpha}" in r.output, r.output
    assert not (tmp_path / "m.pt").exists()


def test_an_alpha_with_no_factors_names_both_missing(tmp_path, cli):
    r = _merge_kohya_with(tmp_path, cli, "lora_unet_extra.alpha", torch.tensor(2.0))
    assert r.exit_code == 2 and "'lora_unet_extra' has an alpha but no lora_A and no lora_B" in r.output, r.output


def test_a_sparse_base_tensor_is_refused_with_the_remap_flag_that_densifies_it(tmp_path, cli):
    """A sparse tensor the adapter does not touch has no bytes to copy: refused before any write,
    naming the flag that fixes it, rather than a traceback halfway through the output."""
    sd = load_file(DATA / "lora_net" / "base.safetensors")
    sd["extra"] = torch.eye(3).to_sparse()
    torch.save(sd, tmp_path / "sparse.pt")
    out = tmp_path / "m.safetensors"
    r = cli("merge-lora", tmp_path / "sparse.pt", DATA / "lora_net" / "adapter", "--out", out)
    assert r.exit_code == 2 and "'extra' is a sparse coo tensor in sparse.pt; `surgery remap --densify`" in r.output, r.output
    assert not out.exists()


def test_the_weights_file_of_a_peft_folder_points_at_the_folder(tmp_path, cli):
    adapter = DATA / "lora_net" / "adapter"
    r = cli("merge-lora", DATA / "lora_net" / "base.safetensors", adapter / "adapter_model.safetensors", "--out",
            tmp_path / "m.pt")
    assert r.exit_code == 2 and f"pass the folder {adapter}, whose adapter_config.json gives it" in r.output, r.output
    r = cli("merge-lora", DATA / "lora_net" / "base.safetensors", adapter, "--out", tmp_path / "m.pt")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_a_shape_only_one_layout_fits_decides_it_whatever_fan_in_fan_out_says(tmp_path, fan_in_fan_out):
    """peft picks the layout per layer kind (a Conv1D is transposed, an nn.Linear is not) and
    rewrites the config's fan_in_fan_out as it goes, so a saved config may say either: a Conv1D
    [in, out] and a Linear [out, in] of other shapes merge as peft merges them under both."""
    g = torch.Generator().manual_seed(0)
    base = {"c_attn.weight": torch.randn(6, 12, generator=g), "score.weight": torch.randn(3, 6, generator=g)}
    save_file(base, tmp_path / "base.safetensors")
    f = {f"base_model.model.{m}.lora_{x}.weight": torch.randn(s, generator=g)
         for m, shapes in (("c_attn", {"A": (2, 6), "B": (12, 2)}), ("score", {"A": (2, 6), "B": (3, 2)}))
         for x, s in shapes.items()}
    rep = surgery.merge_lora(tmp_path / "base.safetensors", _adapter(tmp_path, f, fan_in_fan_out=fan_in_fan_out),
                             tmp_path / "m.safetensors")
    assert {t.name: t.layout for t in rep.merged} == {"c_attn.weight": "transposed", "score.weight": "linear"}
    got = load_file(tmp_path / "m.safetensors")
    ab = {m: f[f"base_model.model.{m}.lora_B.weight"] @ f[f"base_model.model.{m}.lora_A.weight"] for m in ("c_attn", "score")}
    assert torch.allclose(got["c_attn.weight"], base["c_attn.weight"] + ab["c_attn"].T, atol=1e-6)
    assert torch.allclose(got["score.weight"], base["score.weight"] + ab["score"], atol=1e-6)


@pytest.mark.parametrize("init, refused", [("pissa", True), ("pissa_niter_4", True), ("olora", True), ("corda", True),
                                           ("loftq", True), ("lora_ga", True), ("eva", False), ("gaussian", False)])
def test_an_adapter_trained_against_a_base_peft_rewrote_is_refused(tmp_path, cli, init, refused):
    """PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA subtract the adapter's start from the base weights:
    folded into the original base, the merge would be off by that start."""
    tensors = {"base_model.model.body.0.lora_A.weight": torch.ones(2, 6), "base_model.model.body.0.lora_B.weight": torch.ones(8, 2)}
    r = cli("merge-lora", DATA / "lora_net" / "base.safetensors", _adapter(tmp_path, tensors, init_lora_weights=init),
            "--out", tmp_path / "m.pt")
    if refused:
        assert r.exit_code == 2 and f"init_lora_weights {init!r}" in r.output and "path_initial_model_for_weight_conversion" in r.output, r.output
    else:
        assert r.exit_code == 0, r.output


def test_a_diffusers_file_whose_metadata_gives_another_scale_is_refused(tmp_path, cli):
    """diffusers keeps r and lora_alpha in the file's `lora_adapter_metadata`: scale 1 would be
    wrong where they differ, so such a file is refused with the folder that merges it."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 8, generator=g), torch.randn(8, 3, generator=g)
    meta = {"unet.r": 3, "unet.lora_alpha": 6, "unet.rank_pattern": {}, "unet.alpha_pattern": {}}
    tensors = {"unet.body.2.lora_A.weight": a, "unet.body.2.lora_B.weight": b}
    save_file(tensors, tmp_path / "lora.safetensors", metadata={"lora_adapter_metadata": json.dumps(meta)})
    r = cli("merge-lora", DATA / "lora_net" / "base.safetensors", tmp_path / "lora.safetensors", "--out", tmp_path / "m.pt")
    assert r.exit_code == 2 and "'unet.' r=3, lora_alpha=6" in r.output, r.output
    folder = _adapter(tmp_path, tensors, r=3, lora_alpha=6)  # the fix the message gives
    rep = surgery.merge_lora(DATA / "lora_net" / "base.safetensors", folder, tmp_path / "m.safetensors")
    assert [(t.name, t.scale) for t in rep.merged] == [("body.2.weight", 2.0)]
    meta["unet.lora_alpha"] = 3
    save_file(tensors, tmp_path / "same.safetensors", metadata={"lora_adapter_metadata": json.dumps(meta)})
    rep = surgery.merge_lora(DATA / "lora_net" / "base.safetensors", tmp_path / "same.safetensors", tmp_path / "s.pt")
    assert [(t.name, t.scale) for t in rep.merged] == [("body.2.weight", 1.0)]


def test_a_checkpoint_given_as_its_own_adapter_is_refused(tmp_path, cli):
    """Every tensor of a plain checkpoint is a 'replacement' of the same name: without one LoRA
    factor the merge would silently write the base back."""
    base = DATA / "lora_net" / "base.safetensors"
    r = cli("merge-lora", base, base, "--out", tmp_path / "m.pt")
    assert r.exit_code == 2 and "holds no LoRA tensors" in r.output, r.output
