"""Checks that need a CUDA device; skipped elsewhere. Run them with `pytest -m cuda`."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_train_on_cuda_with_amp(tmp_path):
    import surgery
    from fixtures.generate import digits_imagefolder, tiny_model

    data = digits_imagefolder(tmp_path / "data", classes=range(4), per_class=20, size=32)
    surgery.adapt(tiny_model("resnet18", 1000).state_dict(), arch="resnet18", num_classes=4, input_size=32,
                  freeze="head-only", unfreeze_at=1, out=tmp_path / "ad")
    res = surgery.train(tmp_path / "ad", data, epochs=2, lr=1e-3, out=tmp_path / "run", flip=False, device="cuda")
    assert res.epochs_run == 2
    log = (tmp_path / "run" / "run.log").read_text()
    assert "device cuda" in log and "amp " in log and "amp off" not in log
    model = surgery.load_adapted(tmp_path / "run", device="cuda")
    assert next(model.parameters()).is_cuda
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["images_per_s"] for m in metrics)


def test_cuda_saved_checkpoint_opens_on_cpu_paths(tmp_path):
    import surgery

    sd = {"w": torch.randn(4, 4, device="cuda"), "b": torch.zeros(4, device="cuda", dtype=torch.bfloat16)}
    torch.save(sd, tmp_path / "gpu.pt")
    ckpt = surgery.open(tmp_path / "gpu.pt")
    assert {t.device for t in ckpt.tensors.values()} == {"cuda:0"}
    out = ckpt.state_dict()
    assert all(v.device.type == "cpu" for v in out.values())
    assert torch.equal(out["w"], sd["w"].cpu())
