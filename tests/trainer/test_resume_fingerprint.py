"""A checkpoint's fingerprint: a re-pinned factory keeps its run resumable; a fingerprint that is
not a record is refused in one line."""

from __future__ import annotations

import warnings

import pytest
import torch

from surgery import train
from surgery.errors import ResumeError, TrainInterrupted
from surgery.trust import repin_factory
from fixtures.factory import SIZE, adapted_factory_folder

warnings.filterwarnings("ignore", category=UserWarning)
RUN = dict(trust_code=True, epochs=2, lr=1e-2, batch_size=8, seed=1, image_size=SIZE, flip=False)


def _stop_after_first(event, info):
    if event == "epoch_end" and info["epoch"] == 1:
        raise KeyboardInterrupt


def test_a_repinned_factory_resumes_its_run(tmp_path):
    data = adapted_factory_folder(tmp_path, 6)
    with pytest.raises(TrainInterrupted):
        train(tmp_path / "ad", data, out=tmp_path / "run", observer=_stop_after_first, **RUN)
    models = tmp_path / "models.py"
    models.write_text(models.read_text() + "\n# reviewed\n")
    repin_factory(tmp_path / "ad")
    r = train(tmp_path / "ad", data, out=tmp_path / "run", resume=True, trust_code=True)
    assert [m["epoch"] for m in r.metrics] == [1, 2]


def test_a_fingerprint_that_is_not_a_record_is_refused(tmp_path):
    data = adapted_factory_folder(tmp_path, 6)
    with pytest.raises(TrainInterrupted):
        train(tmp_path / "ad", data, out=tmp_path / "run", observer=_stop_after_first, **RUN)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["fingerprint"] = ["not", "a", "record"]
    torch.save(ckpt, last)
    with pytest.raises(ResumeError, match=r"its fingerprint is not a record \(list\)"):
        train(tmp_path / "ad", data, out=tmp_path / "run", resume=True, trust_code=True)
