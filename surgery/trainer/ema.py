"""``--ema DECAY``: an exponential moving average of the weights (``torch.optim.swa_utils``).

After each optimizer step ``ema = decay * ema + (1 - decay) * weights``, buffers (BatchNorm
statistics) included, so the average is a model that can be validated and saved as it is.
Validation scores both the raw and the averaged weights each epoch; the better one is what the
run keeps, and the manifest says which.
"""

from __future__ import annotations

from typing import Any


def check_decay(decay: Any) -> list[str]:
    if decay is None:
        return []
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < float(decay) < 1.0:
        return [f"--ema is a decay between 0 and 1 (for example 0.999), got {decay!r}"]
    return []


class WeightEma:
    """The running average of ``model``'s parameters and buffers."""

    def __init__(self, model: Any, decay: float):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.decay = float(decay)
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)
        self.averaged.requires_grad_(False)

    @property
    def module(self) -> Any:
        return self.averaged.module

    def update(self, model: Any) -> None:
        self.averaged.update_parameters(model)

    def state_dict(self) -> dict:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state)
