"""A wrong architecture is loud: a half load warns and names the architecture the checkpoint
fits, --strict refuses unused checkpoint tensors, and a near-zero match says what would fix it."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import typer
from typer.testing import CliRunner

import surgery
from cli import adapt_cmd
from fixtures.generate import tiny_model
from surgery.errors import AlignError

warnings.filterwarnings("ignore", category=UserWarning)

# resnet34's blocks beyond resnet18's, as the unused tensors of a resnet34 checkpoint read
RESNET34_EXTRA = r"96 checkpoint tensors unused: layer1\.2\.\*, layer2\.\{2,3\}\.\*, layer3\.\{2\.\.5\}\.\*, layer4\.2\.\*"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("arch")
    paths = {}
    for arch in ("resnet18", "resnet34"):
        paths[arch] = folder / f"{arch}.pth"
        torch.save(tiny_model(arch, 1000).state_dict(), paths[arch])
    return paths


@pytest.fixture
def run():
    app = typer.Typer(pretty_exceptions_enable=False)
    adapt_cmd.register(app)

    @app.callback()
    def _root() -> None:
        """test app"""

    runner = CliRunner(env={"NO_COLOR": "1", "COLUMNS": "300"})
    return lambda *args: runner.invoke(app, ["adapt", *map(str, args)])


def test_half_load_warns_with_coverage_and_the_architecture_it_fits(ckpts, tmp_path):
    _, report = surgery.adapt(ckpts["resnet18"], arch="resnet34", num_classes=3, out=tmp_path / "out")
    assert report.load.backbone_coverage == pytest.approx(0.525, abs=0.001)
    [w] = report.warnings
    assert "only 52.5% of resnet34's backbone parameters loaded (120 of 216 tensors)" in w
    assert w.endswith("; the keys fit resnet18 (score 1.00), not resnet34")
    assert report.to_json()["warnings"] == [w]


def test_half_load_warns_on_the_cli_and_in_json(run, ckpts, tmp_path):
    r = run(ckpts["resnet18"], "--arch", "resnet34", "--num-classes", 3, "--out", tmp_path / "a", "--json")
    assert r.exit_code == 0, r.stderr
    [w] = json.loads(r.stdout)["warnings"]
    assert "52.5%" in w and "the keys fit resnet18 (score 1.00), not resnet34" in w
    r = run(ckpts["resnet18"], "--arch", "resnet34", "--num-classes", 3, "--out", tmp_path / "b", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert "warning: only 52.5% of resnet34's backbone parameters loaded" in r.stdout


def test_unused_checkpoint_tensors_warn_and_strict_refuses_them_grouped(run, ckpts, tmp_path):
    _, report = surgery.adapt(ckpts["resnet34"], arch="resnet18", num_classes=3)
    assert report.load.backbone_coverage == 1.0 and len(report.load.unexpected) == 96
    [w] = report.warnings
    assert "96 checkpoint tensors (46.4% of its elements) unused: layer1.2.*, layer2.{2,3}.*" in w
    assert w.endswith("; the keys fit resnet34 (score 1.00), not resnet18")
    out = tmp_path / "out"
    with pytest.raises(AlignError, match=RESNET34_EXTRA + r"; the keys fit resnet34 .*try arch='resnet34'; drop strict=True"):
        surgery.adapt(ckpts["resnet34"], arch="resnet18", num_classes=3, strict=True, out=out)
    assert not out.exists()
    r = run(ckpts["resnet34"], "--arch", "resnet18", "--num-classes", 3, "--strict", "--out", out)
    assert r.exit_code == 2 and not out.exists()
    assert r.stderr.startswith("error: ") and "--strict: 96 checkpoint tensors unused: layer1.2.*" in r.stderr
    assert "try --arch 'resnet34'; drop --strict" in r.stderr


def test_a_matching_checkpoint_stays_quiet_and_passes_strict(ckpts):
    _, report = surgery.adapt(ckpts["resnet18"], arch="resnet18", num_classes=3, strict=True)
    assert report.warnings == [] and report.load.backbone_coverage == 1.0


def test_a_little_unused_is_no_warning():
    """A checkpoint with a small extra module (a neck, a counter) loads without a word."""
    sd = tiny_model("resnet18", 1000).state_dict()
    sd["neck.proj.weight"] = torch.zeros(8, 8)
    _, report = surgery.adapt(sd, arch="resnet18", num_classes=3)
    assert report.load.unexpected == ["neck.proj.weight"] and report.warnings == []
    with pytest.raises(AlignError, match=r"strict=True: 1 checkpoint tensors unused: neck\.\*"):
        surgery.adapt(sd, arch="resnet18", num_classes=3, strict=True)


def test_near_zero_match_names_the_fit_and_no_strip_prefix():
    sd = tiny_model("mobilenet_v3_small", 1000).state_dict()
    with pytest.raises(AlignError) as e:
        surgery.adapt(sd, arch="resnet18", num_classes=3)
    msg = str(e.value)
    assert "matches almost nothing of resnet18" in msg
    assert "the keys fit mobilenet_v3_small (score 1.00), not resnet18: try arch='mobilenet_v3_small'" in msg
    assert "strip-prefix" not in msg and "rename" not in msg


def test_near_zero_match_of_unknown_keys_says_so():
    sd = {f"blob.{i}.weight": torch.zeros(4, 4) for i in range(5)}
    with pytest.raises(AlignError) as e:
        surgery.adapt(sd, arch="resnet18", num_classes=3)
    msg = str(e.value)
    assert "knows no architecture these keys fit" in msg and "--rename" in msg and "strip-prefix" not in msg


def test_a_refused_match_suggests_the_prefix_that_explains_it():
    """Keys under a prefix that is no dotted component: the aligner maps net_features. onto
    features. but misses net_classifier., 61% of the backbone; stripping 'net_' explains it all."""
    sd = {f"net_{k}": v for k, v in tiny_model("mobilenet_v3_small", 1000).state_dict().items()}
    _, report = surgery.adapt(sd, arch="mobilenet_v3_small", num_classes=3)
    assert report.warnings[0].startswith("only 61.1% of mobilenet_v3_small's backbone parameters loaded")
    with pytest.raises(AlignError, match=r"without a prefix they share: try --strip-prefix 'net_'; or min_coverage=0"):
        surgery.adapt(sd, arch="mobilenet_v3_small", num_classes=3, min_coverage=0.9)
    _, report = surgery.adapt(sd, arch="mobilenet_v3_small", num_classes=3, rules={"ops": [{"strip_prefix": "net_"}]})
    assert report.load.backbone_coverage == 1.0 and report.warnings == []


def test_timm_checkpoint_into_torchvision_names_the_timm_model():
    timm = pytest.importorskip("timm")
    from surgery.metabuild import meta_build

    sd = meta_build(timm.create_model, {"model_name": "vit_tiny_patch16_224", "pretrained": False}).state_dict()
    with pytest.raises(AlignError, match=r"the keys fit timm:vit_tiny_patch16_224 \(score 1\.00\), not resnet18: "
                                         r"try arch='timm:vit_tiny_patch16_224'; or min_coverage=0"):
        surgery.adapt(sd, arch="resnet18", num_classes=3)


@pytest.mark.parametrize("arch, kwargs", [("resnet18", {"weights": "IMAGENET1K_V1"}),
                                          ("resnet18", '{"weights_backbone": "DEFAULT"}'),
                                          ("timm:resnet18", {"pretrained": True})])
def test_arch_kwargs_that_fetch_weights_are_refused_before_anything_is_built(arch, kwargs, tmp_path):
    from surgery.adapter.arch import resolve_arch
    from surgery.errors import ArchError

    with pytest.raises(ArchError, match=r"--arch-kwargs .*: surgery takes the weights from the checkpoint"):
        resolve_arch(arch, kwargs)
    assert resolve_arch("resnet18", {"weights": None}).kind == "torchvision"  # an explicit no
