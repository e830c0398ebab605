"""Scoring weights for a soup with the trainer's evaluation: the model ``surgery evaluate`` loads
(:func:`surgery.trainer.evaluate`), DATA split as the runs split it, and the one prediction loop
(:func:`surgery.trainer.predictions.score`). Weights are swapped into one model, so scoring a
candidate soup costs one pass over the validation images and no rebuild."""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..adapter.folder import load_weights
from ..errors import DataError
from ..trainer.data import ImageDataset
from ..trainer.evaluate import _load, _Loaded, _samples, train_args
from ..trainer.predictions import Scores, score
from .soup_runs import Ingredients


@dataclass
class Scored:
    """Accuracy and mean loss of some weights, and which validation images they got right."""

    accuracy: float
    loss: float
    correct: torch.Tensor  # bool, one per validation image, in order


def paired_noise(new: torch.Tensor, old: torch.Tensor) -> tuple[float, float]:
    """(gain, noise): the mean of the per-image difference in correctness, and two standard errors
    of that paired difference (zero when every image moved alike)."""
    d = new.double() - old.double()
    n = len(d)
    sd = float(d.std(unbiased=True)) if n > 1 else 0.0
    return float(d.mean()), 2 * sd / math.sqrt(n)


class Scorer:
    """One model (the first run's, as ``surgery evaluate`` loads it) and the validation and training
    images of DATA, split as every run split it."""

    def __init__(self, loaded: _Loaded, val: list, train: list, batch_size: int, workers: int):
        self.ld, self.val, self.train = loaded, val, train
        self.batch_size, self.workers = batch_size, workers

    @classmethod
    def build(cls, runs: Ingredients, data: str | os.PathLike, *, val_split: float | None, seed: int | None,
              batch_size: int, workers: int, device: str, trust_code: bool) -> "Scorer":
        loaded = _load(runs.paths[0], device, None, trust_code)
        samples = _same_split(runs, data, val_split, seed)
        if not samples.val:
            raise DataError(f"{samples.root}: no images in the val split; the soup is chosen on validation images")
        return cls(loaded, samples.val, samples.train, batch_size, workers)

    def _loader(self, items: list) -> DataLoader:
        return DataLoader(ImageDataset(items, self.ld.transform), batch_size=self.batch_size, shuffle=False,
                          num_workers=self.workers)

    def _scores(self, batches: Any) -> Scores:
        dev = self.ld.device
        return score(self.ld.model, batches, prepare=lambda x, y: (x.to(dev), y.to(dev)), keep=True)

    def use(self, state: dict[str, torch.Tensor]) -> None:
        load_weights(self.ld.model, state, strict=True)

    def score(self, state: dict[str, torch.Tensor] | None = None) -> Scored:
        """Accuracy, loss and per-image correctness on the validation images, of ``state`` (or of
        the weights the model holds)."""
        if state is not None:
            self.use(state)
        s = self._scores(self._loader(self.val))
        correct = s.predicted() == s.targets()
        return Scored(float(correct.double().mean()), s.loss_sum / s.n, correct)

    def loss_on(self, state: dict[str, torch.Tensor], batches: int) -> float:
        """Mean loss of ``state`` on the first ``batches`` validation batches."""
        self.use(state)
        s = self._scores(itertools.islice(iter(self._loader(self.val)), batches))
        return s.loss_sum / s.n

    def recompute_bn(self) -> int:
        """BatchNorm statistics of the weights the model holds, recomputed on the training images (one
        pass in train mode, momentum None: a plain mean; torch's ``swa_utils.update_bn``); returns
        how many BatchNorm modules there are (0: nothing to recompute)."""
        model = self.ld.model
        count = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
        if count and self.train:
            torch.optim.swa_utils.update_bn(self._loader(self.train), model, device=self.ld.device)
        return count if self.train else 0

    def state(self) -> dict[str, torch.Tensor]:
        """The weights the model holds, on the CPU."""
        return {k: v.detach().cpu().clone() for k, v in self.ld.model.state_dict().items()}


class SplitMismatch(DataError):
    """Two runs split DATA differently."""


def _same_split(runs: Ingredients, data: str | os.PathLike, val_split: float | None, seed: int | None) -> Any:
    """DATA's samples as ``surgery evaluate`` splits them for each run (its recorded --val-split and
    --seed unless given), refused when two runs split it differently: one run's validation images
    would be another's training images, and the greedy rule would reward memory. The runs' own
    splits are compared even when a split is given, as each trained on its own."""
    if val_split is not None or seed is not None:
        try:
            _same_split(runs, data, None, None)
        except DataError as e:  # unless the runs split apart, the recorded split does not apply to this
            if isinstance(e, SplitMismatch):  # DATA (no val folder, no saved fraction): nothing to compare
                raise
    seen: dict[tuple, Any] = {}
    first = None
    for path, m in zip(runs.paths, runs.manifests):
        targs = train_args(m)
        key = (repr(targs.get("seed")), repr(targs.get("val_split")))
        if key not in seen:
            seen[key] = _samples(data, m, "val", val_split, seed)[0]
        samples = seen[key]
        if first is None:
            first = (path, samples)
        elif (samples.train, samples.val) != (first[1].train, first[1].val):
            raise SplitMismatch(f"{data}: {path} and {first[0]} split it differently (their --seed or --val-split), so "
                            f"one's validation images trained the other; soup runs trained on one split, or data "
                            f"with train/ and val/ folders. Nothing was written")
    return first[1]  # type: ignore[index]
