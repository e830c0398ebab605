"""surgery.adapt: load into a target architecture, swap the head, freeze, manifest round trip."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from fixtures.generate import tiny_model
from surgery.adapter import arch as A
from surgery.adapter import heads as H
from surgery.adapter.core import adapt, build_from_manifest, load_adapted, param_groups
from surgery.adapter.freeze import FreezeOptions, apply_schedule, plan_freeze
from surgery.errors import AdaptError, AlignError, ArchError, ManifestError, SurgeryError

warnings.filterwarnings("ignore", category=UserWarning)


def _under(name, paths):
    return any(name == p or name.startswith(p + ".") for p in paths)


def _bn_modes(model):
    return {n: m.training for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


# ----------------------------------------------------------------------------- every torchvision model, on meta

@pytest.mark.parametrize("name", A.torchvision_models())
def test_every_torchvision_model_head_on_meta(name):
    spec = A.resolve_arch(name)
    model = A.build(spec, 7, meta=True)
    size = tuple(A.input_config(spec, model)["size"])
    plan = H.plan_head(spec, model, num_classes=7, kind="linear", took_num_classes=True, in_chans=3, size=size)
    H.apply_head(model, plan, 7)
    pr = H.probe(model, 3, size)
    assert pr.output_shape == (2, 7)
    # the forward-pass detector (used for user models) agrees with the signature table
    assert H.find_classifier(model, pr) == plan.classifier
    if name in ("googlenet", "inception_v3"):
        assert plan.aux
    fp = plan_freeze(model, plan.modules, FreezeOptions(freeze="head-only"))
    trainable = {n for n, p in fp["params"].items() if p["trainable"]}
    assert trainable and trainable == {n for n in fp["params"] if _under(n, plan.modules)}


# ----------------------------------------------------------------------------- real weights, representative set

REPRESENTATIVE = ["resnet18", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x0_5", "efficientnet_b0"]


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_round_trip_real_weights(name, tmp_path):
    src = tiny_model(name, 1000).state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save(src, path)
    out = tmp_path / "out"
    model, report = adapt(path, arch=name, num_classes=7, freeze="head-only", out=out)
    head = report.manifest.head
    heads = [head["module"], *head["aux"]]
    sd = model.state_dict()
    carried = [k for k in src if not _under(k, heads)]
    assert carried and all(torch.equal(sd[k], src[k]) for k in carried)
    assert not report.load.missing and not report.load.mismatched
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in model.named_parameters() if _under(n, heads)}
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "manifest.json", "load_report.json"}
    again = load_adapted(out)
    model.train()
    apply_schedule(model, report.manifest)
    assert again.state_dict().keys() == sd.keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in again.named_parameters()} == {n: p.requires_grad for n, p in model.named_parameters()}
    assert _bn_modes(again) == _bn_modes(model)
    if _bn_modes(again):
        assert not any(_bn_modes(again).values())  # head-only: every backbone BN held in eval


# ----------------------------------------------------------------------------- wrappers and prefixes

@pytest.mark.parametrize("fixture,wrappers", [
    ("dataparallel_pt", ["module."]),
    ("compiled_pt", ["_orig_mod."]),
    ("compiled_dataparallel_pt", ["_orig_mod.", "module."]),
    ("lightning_ckpt", []),
])
def test_wrapped_checkpoints(make, fixture, wrappers):
    model, report = adapt(make(fixture), arch="mobilenet_v3_small", num_classes=7)
    rep = report.load
    assert rep.alignment.wrappers == wrappers
    if fixture == "lightning_ckpt":
        assert (rep.alignment.ckpt_prefix, rep.alignment.model_prefix) == ("model.", "")
    assert rep.backbone_coverage == 1.0 and not rep.missing and not rep.unexpected


def test_backbone_nested_under_prefix():
    src = tiny_model("resnet18", 1000).state_dict()
    sd = {f"backbone.{k}": v for k, v in src.items()}
    sd["neck.proj.weight"] = torch.zeros(3, 3)
    model, report = adapt(sd, arch="resnet18", num_classes=4)
    assert report.load.alignment.ckpt_prefix == "backbone."
    assert report.load.unexpected == ["neck.proj.weight"]
    assert torch.equal(model.layer4[1].conv2.weight, src["layer4.1.conv2.weight"])


FACTORY = '''
import torch
from torch import nn
import torchvision


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=1000)

    def forward(self, x):
        return self.net(x)


def wrapped():
    return Wrapped()


class Odd(nn.Module):
    """No num_classes argument, and a head with an unusual name."""

    def __init__(self, width=16):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.squeeze = nn.AdaptiveAvgPool2d(1)
        self.mid = nn.Linear(width, 24)
        self.scorer_of_things = nn.Linear(24, 5)

    def forward(self, x):
        x = self.squeeze(self.trunk(x)).flatten(1)
        return self.scorer_of_things(torch.relu(self.mid(x)))


def odd(width=16):
    return Odd(width)
'''


@pytest.fixture
def factory_file(tmp_path):
    p = tmp_path / "my_models.py"
    p.write_text(FACTORY)
    return p


def test_target_wraps_the_network(factory_file):
    src = tiny_model("resnet18", 1000).state_dict()
    model, report = adapt(src, arch=f"{factory_file}:wrapped", num_classes=3)
    assert report.load.alignment.model_prefix == "net."
    assert report.manifest.head["classifier"] == "net.fc" and report.manifest.head["replace"]
    assert torch.equal(model.net.layer1[0].conv1.weight, src["layer1.0.conv1.weight"])
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_user_factory_without_num_classes(factory_file, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("mm", factory_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(1)
    src = mod.odd(width=8).state_dict()
    out = tmp_path / "out"
    model, report = adapt(src, arch=f"{factory_file}:odd", arch_kwargs='{"width": 8}', num_classes=3,
                          freeze="head-only", out=out)
    head = report.manifest.head
    assert head["classifier"] == "scorer_of_things" and head["original_classes"] == 5
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    assert torch.equal(model.mid.weight, src["mid.weight"])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["scorer_of_things.weight", "scorer_of_things.bias"]
    again = load_adapted(out, trust_code=True)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


def test_factory_path_is_stored_relative_so_the_pair_of_folders_can_move(tmp_path):
    import hashlib
    import shutil

    proj = tmp_path / "proj"
    (proj / "src" / "nets").mkdir(parents=True)
    factory = proj / "src" / "nets" / "my_models.py"
    factory.write_text(FACTORY)
    out = proj / "runs" / "exp1" / "ad"  # not beside the factory file
    out.parent.mkdir(parents=True)
    _, report = adapt(tiny_model("resnet18", 1000).state_dict(), arch=f"{factory}:wrapped", num_classes=3, out=out)
    arch = json.loads((out / "manifest.json").read_text())["arch"]
    pinned = hashlib.sha256(factory.read_bytes()).hexdigest()
    assert arch["relative"] == os.path.join("..", "..", "..", "src", "nets", "my_models.py")
    assert arch["sha256"] == pinned and arch == report.manifest["arch"]
    moved = tmp_path / "elsewhere" / "proj"
    shutil.move(str(proj), str(moved))  # the old absolute path is gone
    model = load_adapted(moved / "runs" / "exp1" / "ad", trust_code=True)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert json.loads((moved / "runs" / "exp1" / "ad" / "manifest.json").read_text())["arch"]["sha256"] == pinned


def test_other_architecture_is_refused(make, tmp_path):
    with pytest.raises(AlignError, match=r"matches almost nothing of resnet18.*mobilenet_v3_small"):
        adapt(make("plain_pt"), arch="resnet18", num_classes=7, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


VIT = "torchvision.models.vision_transformer:VisionTransformer"
VIT_KW = {"patch_size": 8, "num_layers": 1, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32}


def test_vit_other_image_size():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    src = VisionTransformer(image_size=64, **VIT_KW).state_dict()
    model, report = adapt(src, arch=VIT, arch_kwargs={"image_size": 32, **VIT_KW}, num_classes=3)
    assert report.load.resized == [("encoder.pos_embedding", (1, 65, 16), (1, 17, 16))]
    assert torch.equal(model.encoder.pos_embedding[:, :1], src["encoder.pos_embedding"][:, :1])
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    _, report = adapt(src, arch=VIT, arch_kwargs={"image_size": 32, **VIT_KW}, num_classes=3, interpolate=False)
    assert [(m, cs, ms) for _, m, cs, ms in report.load.mismatched] == [("encoder.pos_embedding", (1, 65, 16), (1, 17, 16))]
    assert "encoder.pos_embedding" in report.load.missing


def test_suffix_fallback_and_ambiguity():
    from surgery.adapter.align import align_keys

    a = align_keys({"x.a.conv.weight": (2,), "y.b.fc.weight": (3,), "z.bn.weight": (4,)},
                   {"conv.weight": (2,), "fc.weight": (3,), "bn.weight": (4,)})
    assert a.method == "suffix"
    assert a.mapping == {"x.a.conv.weight": "conv.weight", "y.b.fc.weight": "fc.weight", "z.bn.weight": "bn.weight"}
    with pytest.raises(AlignError, match="unambiguously"):
        align_keys({"x.a.conv.weight": (2,), "y.b.conv.weight": (2,), "z.fc.weight": (3,)},
                   {"conv.weight": (2,), "fc.weight": (3,), "bn.weight": (4,)})


# ----------------------------------------------------------------------------- classic recipes

def test_recipe_resnet18_four_classes_only_fc():
    model, report = adapt(tiny_model("resnet18", 1000).state_dict(), arch="resnet18", num_classes=4, freeze="head-only")
    assert model.fc.out_features == 4
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert report.load.head_dropped == ["fc.weight", "fc.bias"]


def test_recipe_alexnet_classifier6():
    src = tiny_model("alexnet", 1000).state_dict()
    model, report = adapt(src, arch="alexnet", num_classes=5, freeze="head-only")
    assert report.manifest.head["classifier"] == "classifier.6"
    assert isinstance(model.classifier[6], nn.Linear) and model.classifier[6].out_features == 5
    assert torch.equal(model.classifier[4].weight, src["classifier.4.weight"])
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_recipe_resnet50_concat_pool_mlp(tmp_path):
    src = tiny_model("resnet50", 1000).state_dict()
    out = tmp_path / "out"
    model, report = adapt(src, arch="resnet50", num_classes=6, head="mlp", hidden=32, dropout=0.4, out=out)
    assert isinstance(model.avgpool, H.AdaptiveConcatPool2d) and isinstance(model.fc, H.MLPHead)
    kinds = [type(m) for m in model.fc]
    assert kinds == [nn.Flatten, nn.BatchNorm1d, nn.Dropout, nn.Linear, nn.ReLU, nn.BatchNorm1d, nn.Dropout, nn.Linear]
    assert model.fc[1].num_features == 4096 and model.fc[3].out_features == 32 and model.fc[7].out_features == 6
    assert model.fc[2].p == pytest.approx(0.2) and model.fc[6].p == pytest.approx(0.4)
    assert report.manifest.head["classifier"] == "fc.7"
    x = torch.randn(4, 3, 64, 64)
    again = load_adapted(out).eval()
    model.eval()
    with torch.no_grad():
        y1, y2 = model(x), model(x)
        assert torch.equal(y1, y2) and torch.equal(again(x), y1)  # eval: no dropout, running statistics
    model.train()
    before = model.fc[1].running_mean.clone()
    assert model(x).shape == (4, 6)
    assert not torch.equal(before, model.fc[1].running_mean)  # train: the head's BN updates


# ----------------------------------------------------------------------------- freezing, groups, BN

def test_freeze_until_gradual_layer_decay_and_groups():
    model, report = adapt(tiny_model("resnet18", 1000).state_dict(), arch="resnet18", num_classes=4,
                          freeze_until="layer3", gradual=True, layer_decay=0.5, backbone_lr_mult=0.2)
    groups = {g["name"]: g for g in report.groups}
    assert not model.layer2[0].conv1.weight.requires_grad and model.layer3[0].conv1.weight.requires_grad
    assert [groups[n]["unfreeze_at"] for n in ("layer2", "layer1", "bn1", "conv1")] == [1, 2, 3, 4]
    assert groups["layer4"]["lr_mult"] == pytest.approx(0.2) and groups["layer3"]["lr_mult"] == pytest.approx(0.1)
    assert groups["head"]["lr_mult"] == 1.0
    pg = param_groups(model, report.manifest, lr=1e-2)
    assert {g["name"]: g["lr"] for g in pg}["layer4"] == pytest.approx(2e-3)
    assert sum(len(g["params"]) for g in pg) == len(list(model.parameters()))
    torch.optim.SGD(pg, lr=1e-2)
    apply_schedule(model, report.manifest, epoch=1)
    assert model.layer2[0].conv1.weight.requires_grad and not model.layer1[0].conv1.weight.requires_grad
    apply_schedule(model, report.manifest, epoch=4)
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_bn_survives_train(tmp_path):
    out = tmp_path / "out"
    adapt(tiny_model("resnet18", 1000).state_dict(), arch="resnet18", num_classes=4, preset="small-similar", out=out)
    model = load_adapted(out)
    model.train()
    before = model.bn1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(before, model.bn1.running_mean) and not model.bn1.training
    model = load_adapted(out, epoch=0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["bn"]["policy"] == "frozen"


@pytest.mark.parametrize("preset", ["small-similar", "small-different", "large-similar", "large-different"])
def test_presets(preset):
    model, report = adapt(tiny_model("resnet18", 1000).state_dict(), arch="resnet18", num_classes=4, preset=preset)
    trainable = {g["name"] for g in report.groups if g["trainable"]}
    expected = {"small-similar": {"head"}, "small-different": {"layer2", "layer3", "layer4", "head"}}
    assert trainable == expected.get(preset, {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "head"})
    mult = {g["name"]: g["lr_mult"] for g in report.groups}["layer4"]
    assert mult == (1.0 if preset == "large-different" else 0.1)


def test_in_chans():
    src = tiny_model("resnet18", 1000).state_dict()
    model, report = adapt(src, arch="resnet18", num_classes=2, in_chans=1)
    torch.testing.assert_close(model.conv1.weight, src["conv1.weight"].sum(1, keepdim=True))
    assert report.load.adapted == ["conv1.weight"] and report.manifest["input"]["channels"] == 1
    assert model.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 2)
    model, _ = adapt(src, arch="resnet18", num_classes=2, in_chans=5)
    assert model.conv1.weight.shape[1] == 5
    torch.testing.assert_close(model.conv1.weight[:, 3], src["conv1.weight"][:, 0] * 3 / 5)


def test_strict_and_missing():
    src = {k: v for k, v in tiny_model("resnet18", 1000).state_dict().items() if not k.startswith("layer4.1.bn2")}
    _, report = adapt(src, arch="resnet18", num_classes=4)
    assert "layer4.1.bn2.{weight,bias,running_mean,running_var}" in report.load.to_json()["missing"]["grouped"]
    assert "layer4.1.bn2.num_batches_tracked" not in report.load.missing
    with pytest.raises(AlignError, match="--strict: missing layer4.1.bn2"):
        adapt(src, arch="resnet18", num_classes=4, strict=True)
    no_counters = {k: v for k, v in tiny_model("resnet18", 1000).state_dict().items() if "num_batches" not in k}
    _, report = adapt(no_counters, arch="resnet18", num_classes=4, strict=True)
    assert not report.load.missing


def test_torchvision_weights_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    w = A.torchvision_weights("resnet18", "DEFAULT")
    cache = tmp_path / "th" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    src = tiny_model("resnet18", 1000).state_dict()
    torch.save(src, cache / Path(w.url).name)
    model, report = adapt(None, weights="DEFAULT", arch="resnet18", num_classes=3, out=tmp_path / "out")
    assert torch.equal(model.conv1.weight, src["conv1.weight"])
    assert report.manifest["source"]["weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    with pytest.raises(AdaptError, match="IMAGENET1K_V1"):
        adapt(None, weights="NOPE", arch="resnet18", num_classes=3)


def test_timm_model():
    pytest.importorskip("timm")
    import timm

    torch.manual_seed(0)
    src = timm.create_model("resnet10t", pretrained=False).state_dict()
    model, report = adapt(src, arch="timm:resnet10t", num_classes=3, freeze="head-only")
    assert report.manifest.head["classifier"] == "fc"
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_timm_vit_round_trip(tmp_path):
    """A timm ViT (head named 'head'), wrapped in DataParallel's prefix, to 4 classes and back."""
    pytest.importorskip("timm")
    import timm

    torch.manual_seed(0)
    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}
    src = {"module." + k: v for k, v in timm.create_model("vit_tiny_patch16_224", **kw).state_dict().items()}
    model, report = adapt(src, arch="timm:vit_tiny_patch16_224", arch_kwargs=kw, num_classes=4, input_size=32,
                          freeze="head-only", out=tmp_path / "vit")
    assert report.manifest.head["classifier"] == "head"
    back = load_adapted(tmp_path / "vit")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    assert [n for n, p in back.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    assert back.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 4)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,match", [
    ({"arch": "resnet19"}, r"unknown architecture 'resnet19'.*did you mean resnet18"),
    ({"num_classes": 0}, r"--num-classes must be a positive integer"),
    ({"freeze_until": "layer9"}, r"--freeze-until 'layer9' names no module.*valid: conv1, bn1, layer1, layer2"),
    ({"preset": "small-similar", "freeze": "none"}, r"--preset small-similar decides what is frozen"),
    ({"unfreeze_at": 2, "gradual": True, "freeze": "head-only"}, r"--unfreeze-at and --gradual"),
    ({"unfreeze_at": 2}, r"need something frozen"),
    ({"freeze": "head-only", "freeze_until": "layer3"}, r"conflicts"),
    ({"head": "mlp", "arch": "vit_b_16"}, r"--head mlp needs a CNN backbone"),
    ({"arch": "timm_missing:x"}, r"cannot import module 'timm_missing'"),
])
def test_bad_input(tmp_path, kwargs, match):
    args = {"arch": "resnet18", "num_classes": 4, "out": tmp_path / "out", **kwargs}
    with pytest.raises(SurgeryError, match=match):
        adapt(tiny_model("resnet18", 1000).state_dict(), **args)
    assert not (tmp_path / "out").exists()


def test_factory_that_fails_to_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import no_such_package_here\n")
    with pytest.raises(ArchError, match=r"bad.py: importing the factory file failed: ModuleNotFoundError"):
        adapt({}, arch=f"{bad}:make", num_classes=2, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_manifest_validated_on_read(tmp_path):
    out = tmp_path / "out"
    adapt(tiny_model("resnet18", 1000).state_dict(), arch="resnet18", num_classes=2, out=out)
    data = json.loads((out / "manifest.json").read_text())
    assert data["schema"] == "surgery.manifest/1"
    build_from_manifest(data, meta=True)
    data["schema"] = "surgery.manifest/9"
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="newer surgery"):
        load_adapted(out)
    data["schema"] = "surgery.manifest/1"
    del data["groups"]
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="missing 'groups'"):
        load_adapted(out)


def test_existing_out_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SurgeryError, match="already exists; pass --force"):
        adapt(tiny_model("resnet18", 1000).state_dict(), arch="resnet18", num_classes=2, out=out)


def test_top_level_api_survives_submodule_imports():
    import surgery
    import surgery.adapter.core  # noqa: F401  (a submodule import must not shadow the function)

    model, report = surgery.adapt(tiny_model("resnet18", 1000).state_dict(), arch="resnet18", num_classes=2)
    assert model.fc.out_features == 2 and report.load.coverage > 0.99
    assert callable(surgery.load_adapted) and callable(surgery.param_groups)
