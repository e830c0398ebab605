"""The architecture guess says "no known architecture" rather than naming the least bad of
unrelated models, and knows the common timm families (ConvNeXt, ViT, EfficientNet) from a
shipped table, without importing torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import surgery
from surgery.inspection.arch_guess import (
    KNOWN_MIN_SCORE,
    TIMM_MODELS,
    TIMM_TABLE_PATH,
    guess_architecture,
    known_architectures,
    model_signature,
)
from tests import REPO

FOREIGN = {f"blob.{i}.weight": (4, 4) for i in range(5)}


def _timm_signature(name: str) -> dict[str, tuple[int, ...]]:
    timm = pytest.importorskip("timm")
    from surgery.metabuild import meta_build

    model = meta_build(timm.create_model, {"model_name": name, "pretrained": False})
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture
def junk(tmp_path):
    p = tmp_path / "junk.pth"
    torch.save({k: torch.zeros(s) for k, s in FOREIGN.items()}, p)
    return p


def test_unknown_keys_have_no_guess():
    assert known_architectures(FOREIGN) == []
    assert guess_architecture(FOREIGN)[0].score < KNOWN_MIN_SCORE  # the raw ranking still ranks


@pytest.mark.parametrize("extra", [500, 15_000])
def test_a_model_among_many_other_keys_is_judged_as_without_the_shortcut(extra):
    """A file of more keys than any model could match a tenth of skips the tables; the answer
    is the one scoring every model gives (a model's own keys among them or not)."""
    keys = {**model_signature("efficientnet_v2_l"), **{f"extra{i}.weight": (3,) for i in range(extra)}}
    scored = [g for g in guess_architecture(keys) + guess_architecture(keys, table=TIMM_TABLE_PATH)
              if g.score >= KNOWN_MIN_SCORE]
    assert [g.arch for g in known_architectures(keys)] == [g.arch for g in sorted(scored, key=lambda g: -g.score)][:3]
    assert bool(scored) == (extra == 500)


def test_torchvision_guesses_keep_their_fits_and_drop_the_noise():
    g = known_architectures({"module." + k: v for k, v in model_signature("resnet18").items()})
    assert [x.arch for x in g] == ["resnet18", "resnet34", "resnet50"] and g[0].score == 1.0
    assert all(x.score >= KNOWN_MIN_SCORE for x in g)
    g = known_architectures(model_signature("mobilenet_v3_small"))
    assert [x.arch for x in g] == ["mobilenet_v3_small"]  # mobilenet_v3_large 0.07, convnext_base 0.00: noise


@pytest.mark.parametrize("name", ["convnext_tiny", "vit_small_patch16_224", "efficientnet_b0"])
def test_timm_families_are_named_as_arch_takes_them(name):
    sig = _timm_signature(name)
    assert guess_architecture(sig, top=1)[0].score < KNOWN_MIN_SCORE  # no torchvision model fits
    best = known_architectures({"model." + k: v for k, v in sig.items()})[0]
    assert (best.arch, best.score, best.num_classes, best.prefix_stripped) == (f"timm:{name}", 1.0, 1000, "model.")


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "efficientnet_b2", "convnext_nano"])
def test_timm_table_matches_installed_timm(name):
    """Each row is the model's own signature; otherwise `python -m surgery.inspection.arch_guess --rebuild --timm`."""
    assert name in TIMM_MODELS
    best = known_architectures(_timm_signature(name), top=1)[0]
    assert (best.arch, best.matched, best.unexpected) == (f"timm:{name}", best.total, 0)


@pytest.mark.parametrize("name", ["regnety_008", "dla34", "poolformer_s12"])
def test_models_in_no_table_score_under_the_threshold(name):
    """What the threshold rests on: models no table holds score near 0 (0.012 at most), far
    below it, while a model's own signature scores 1.0 and half of it 0.5."""
    assert known_architectures(_timm_signature(name)) == []
    scored = [(k, s) for k, s in model_signature("resnet18").items() if not k.endswith("num_batches_tracked")]
    assert known_architectures(dict(scored[:len(scored) // 2]))[0].score == 0.5


def test_timm_table_is_small():
    assert TIMM_TABLE_PATH.stat().st_size < 40_000


def test_inspect_says_no_known_architecture(junk, cli):
    assert surgery.inspect(junk).guesses == []
    r = cli("inspect", junk)
    assert r.exit_code == 0, r.stderr
    assert "architecture  no known architecture" in r.stdout and "alexnet" not in r.stdout
    r = cli("inspect", junk, "--json")
    assert json.loads(r.stdout)["architecture"] == []


def test_inspect_names_the_nearest_model_when_none_fits(tmp_path, cli):
    """A third of resnet18 (score 0.33): a relative worth naming, not a fit."""
    sig = [(k, s) for k, s in model_signature("resnet18").items() if not k.endswith("num_batches_tracked")]
    p = tmp_path / "part.pth"
    torch.save({k: torch.zeros(s) for k, s in sig[:34]}, p)
    r = cli("inspect", p)
    assert r.exit_code == 0, r.stderr
    assert "architecture  no known model fits; nearest: resnet18 (34/102 keys match, score 0.33)" in r.stdout


def test_a_scan_row_has_no_guess_for_unknown_keys(junk, tmp_path, cli):
    other = tmp_path / "other.pth"
    torch.save({"a.weight": torch.zeros(3)}, other)
    r = cli("inspect", junk, other, "--json")
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["architecture"] for row in rows] == [[], []]


def test_inspect_names_a_timm_checkpoint(tmp_path, cli):
    sig = _timm_signature("vit_tiny_patch16_224")
    p = tmp_path / "vit.safetensors"
    from safetensors.torch import save_file

    save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in sig.items()}, str(p))
    r = cli("inspect", p)
    assert r.exit_code == 0, r.stderr
    assert "architecture  timm:vit_tiny_patch16_224: 152/152 keys match (score 1.00)" in r.stdout


def test_known_architectures_do_not_import_torch():
    code = ("import sys\nfrom surgery.inspection.arch_guess import known_architectures, model_signature\n"
            f"assert known_architectures({FOREIGN!r}) == []\n"
            "sig = model_signature('timm:convnext_tiny')\n"
            "assert known_architectures(sig)[0].arch == 'timm:convnext_tiny'\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'timm'))\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
