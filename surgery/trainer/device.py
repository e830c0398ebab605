"""Where a run computes: the device named by ``--device``, autocast on CUDA, and moving batches.

    >>> place = Placement.for_run(resolve_device("auto"), amp=True)   # doctest: +SKIP
    >>> with place.autocast():
    ...     logits = model(place.inputs(x))
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import TrainError

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> "torch.device":
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; a refusal names the choices."""
    import torch

    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise TrainError(f"--device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"--device {device}: CUDA is not available here; use --device cpu or auto")
    return torch.device(device)


@dataclass(frozen=True)
class Placement:
    """The run's device and autocast dtype (bf16, else fp16, on CUDA with ``--amp``; none on the CPU).
    Images go to CUDA channels-last, which convolutions there prefer."""

    device: "torch.device"
    amp_dtype: Any = None

    @classmethod
    def for_run(cls, device: "torch.device", amp: bool) -> "Placement":
        import torch

        if device.type != "cuda" or not amp:
            return cls(device)
        return cls(device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def reduce_on(self) -> Any:
        """Where collectives run: the GPU under nccl, the CPU under gloo."""
        return self.device if self.cuda else "cpu"

    def autocast(self) -> Any:
        import torch

        return torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype is not None else contextlib.nullcontext()

    def inputs(self, x: "torch.Tensor") -> "torch.Tensor":
        import torch

        x = x.to(self.device, non_blocking=self.cuda)
        return x.contiguous(memory_format=torch.channels_last) if self.cuda and x.ndim == 4 else x

    def labels(self, y: "torch.Tensor") -> "torch.Tensor":
        return y.to(self.device, non_blocking=self.cuda)

    def batch(self, x: "torch.Tensor", y: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        return self.inputs(x), self.labels(y)

    def place_model(self, model: Any) -> None:
        import torch

        model.to(self.device)
        if self.cuda:
            model.to(memory_format=torch.channels_last)
