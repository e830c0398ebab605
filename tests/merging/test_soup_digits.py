"""`surgery soup` on real runs: three fine-tunes of one adapted folder on scikit-learn's digits (5-9,
as `surgery demo` draws them) that differ by seed, and one trained on the same images with their
labels shuffled. The greedy rule refuses the shuffled run; the soup it keeps validates at least as
well as the best run, and OUT scores the same under `surgery evaluate`."""

from __future__ import annotations

import random
import shutil
import warnings
from pathlib import Path

import pytest

import surgery
from fixtures.factory import SIZE, factory_and_digits, make_adapted

warnings.filterwarnings("ignore", category=UserWarning)
RUN = dict(trust_code=True, batch_size=16, epochs=6, lr=3e-3, image_size=SIZE, flip=False, augment=False)


def shuffled_labels(data: Path, dst: Path, seed: int = 0) -> Path:
    """``data`` with every training image moved to a random class folder; val/ as it is."""
    shutil.copytree(data / "val", dst / "val")
    images = sorted((data / "train").glob("*/*.png"))
    classes = sorted(p.name for p in (data / "train").iterdir())
    rng = random.Random(seed)
    for i, p in enumerate(images):
        target = dst / "train" / rng.choice(classes)
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, target / f"{i}.png")
    return dst


@pytest.mark.slow  # four training runs on 300 digits
def test_the_greedy_soup_refuses_a_run_trained_on_shuffled_labels(tmp_path):
    arch, data, weights = factory_and_digits(tmp_path, 60, "digits")
    make_adapted(weights, arch, tmp_path / "ad", freeze="none")
    runs = [surgery.train(tmp_path / "ad", data, seed=s, out=tmp_path / f"seed{s}", **RUN).out for s in range(3)]
    noisy = shuffled_labels(data, tmp_path / "shuffled")
    bad = surgery.train(tmp_path / "ad", noisy, seed=0, out=tmp_path / "shuffled-run", **RUN).out

    rep = surgery.soup([bad, *runs], data, tmp_path / "soup", trust_code=True)
    by_path = {i["path"]: i["val_acc"] for i in rep.ingredients}
    assert by_path[str(bad)] < 0.5 < min(by_path[str(r)] for r in runs)
    assert rep.ingredients[-1]["path"] == str(bad)
    (last,) = [s for s in rep.steps if s["path"] == str(bad)]
    assert not last["kept"] and last["gain"] <= last["noise"]
    assert str(bad) not in rep.kept
    assert rep.val_acc["greedy"] >= rep.val_acc["best_run"]
    assert rep.interpolation["warning"] is None  # fine-tunes of one folder share a basin
    assert surgery.evaluate(tmp_path / "soup", data, trust_code=True).accuracy == pytest.approx(rep.val_acc["out"])
