"""adapt -> train -> evaluate -> predict -> load_adapted across torchvision's models.

Every model: the weights load path (what load_adapted, train's best epoch and resume use) takes a
state dict without ``_metadata``, as a safetensors file gives it, on the meta device. A few
representative models: the whole pipeline with real forward passes on tiny images.
"""

from __future__ import annotations

import json
from pathlib import Path
import warnings

import pytest
import torch
import torchvision

from fixtures.generate import digits_imagefolder
from surgery.adapter.core import adapt, load_adapted, load_weights
from surgery import train
from surgery.errors import TrainError

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

MODELS = torchvision.models.list_models(module=torchvision.models)


@pytest.mark.parametrize("name", MODELS)
def test_weights_load_without_state_dict_metadata(name):
    from surgery.metabuild import meta_build

    model = meta_build(torchvision.models.get_model, {"name": name, "num_classes": 3})
    plain = {k: v for k, v in model.state_dict().items()}  # what safetensors' load_file returns
    assert not hasattr(plain, "_metadata")
    missing, unexpected = load_weights(model, plain, strict=True)
    assert not missing and not unexpected


def test_the_list_covers_the_versioned_loaders():
    assert {"mnasnet0_5", "mnasnet1_0", "vit_b_16", "resnet18", "googlenet"} <= set(MODELS)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return digits_imagefolder(tmp_path_factory.mktemp("pipe") / "digits", classes=range(5, 10), per_class=5, size=32)


# a versioned _load_from_state_dict (mnasnet), a conv classifier (squeezenet), channel shuffles,
# and 1, 4 and 5 input channels
PIPELINE = [("mnasnet0_5", 3), ("mnasnet0_5", 4), ("squeezenet1_1", 1), ("shufflenet_v2_x0_5", 5)]


@pytest.mark.parametrize("name,chans", PIPELINE)
def test_adapt_train_evaluate_predict_load(cli, digits, tmp_path, name, chans):
    torch.manual_seed(0)
    sd = torchvision.models.get_model(name, num_classes=10).state_dict()
    ad = tmp_path / "ad"
    adapt(dict(sd), arch=name, num_classes=5, input_size=32, in_chans=chans, out=ad, freeze="head-only",
          unfreeze_at=1)
    run = tmp_path / "run"
    r = cli("train", ad, "--data", digits, "--epochs", 2, "--lr", "1e-3", "--batch-size", 8, "--out", run, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["epochs_run"] == 2
    r = cli("evaluate", run, "--data", digits, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["images"] == 5
    img = sorted((digits / "val" / "7").glob("*.png"))[0]
    r = cli("predict", run, img, "--json")
    assert r.exit_code == 0, r.output
    model = load_adapted(run)
    assert json.loads((run / "manifest.json").read_text())["input"]["channels"] == chans
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(1, chans, 32, 32)).shape == (1, 5)


def test_frozen_batchnorm_stays_in_eval_after_model_train(tmp_path):
    torch.manual_seed(0)
    adapt(dict(torchvision.models.resnet18().state_dict()), arch="resnet18", num_classes=3, input_size=32,
          out=tmp_path / "ad", freeze="head-only")
    model = load_adapted(tmp_path / "ad")
    model.train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert model.training and model.fc.training
    before = model.bn1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(model.bn1.running_mean, before)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """ViT-B/32 adapted at 64 px (its pretrained position embedding is for 224 px)."""
    root = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    sd = torchvision.models.vit_b_32().state_dict()
    _, report = adapt(dict(sd), arch="vit_b_32", num_classes=5, input_size=64, out=root / "ad", freeze="head-only")
    return root / "ad", report


def test_vit_at_another_image_size_is_rebuilt_and_interpolated(vit):
    ad, report = vit
    manifest = json.loads((ad / "manifest.json").read_text())
    assert manifest["arch"]["kwargs"] == {"image_size": 64}
    assert [r[0] for r in report.load.resized] == ["encoder.pos_embedding"]
    model = load_adapted(ad).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 5)


def test_vit_at_a_size_it_cannot_take_is_refused_before_training(vit, digits, tmp_path):
    ad, _ = vit
    with pytest.raises(TrainError, match=r"image_size=96: the model does not take 96x96 images .* adapted for "
                                         r"64x64: drop image_size, or re-run surgery adapt with --input-size 96"):
        train(ad, digits, epochs=1, lr=1e-3, out=tmp_path / "run", image_size=96)
    assert not (tmp_path / "run").exists()


def test_evaluate_and_predict_refuse_that_size_in_one_line(vit, digits, cli):
    ad, _ = vit
    image = next(p for p in Path(digits).rglob("*.png"))
    for args in (("evaluate", ad, "--data", digits), ("predict", ad, image)):
        r = cli(*args, "--image-size", "96")
        assert r.exit_code == 2, r.output
        assert "the model does not take 96x96 images" in r.output and "Traceback" not in r.output


def test_vit_input_size_must_be_a_multiple_of_the_patch():
    from surgery.errors import AdaptError

    with pytest.raises(AdaptError, match=r"--input-size 50: vit_b_32 cuts images into 32x32 patches"):
        adapt({"x": torch.zeros(1)}, arch="vit_b_32", num_classes=3, input_size=50)
