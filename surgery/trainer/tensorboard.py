"""``--tensorboard``: the run's scalars as TensorBoard event files in ``OUT/tensorboard/``.

An observer of the run (see :func:`surgery.train`'s ``observer``): per step ``train/loss`` and the
learning rate of each parameter group (``lr/GROUP``); per epoch train and validation loss and
accuracy (``epoch/...``), images per second and, with ``--ema``, the averaged weights' scores.
Open it with ``tensorboard --logdir OUT/tensorboard``. Writing uses
``torch.utils.tensorboard``, which needs the ``tensorboard`` package (the ``tensorboard`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..errors import LoggerError

LOG_DIR = "tensorboard"

Observer = Callable[[str, dict], None]


def require_tensorboard() -> None:
    """Refuse in one line, before the run starts, when the package is missing."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise LoggerError("--tensorboard needs the tensorboard package: pip install 'surgery[tensorboard]'") from None


class TensorBoardObserver:
    """Writes the events of a run to ``out/tensorboard``; passes every event on to ``inner``."""

    def __init__(self, out: str | Path, inner: Observer | None = None):
        require_tensorboard()
        self.dir = Path(out) / LOG_DIR
        self.inner = inner
        self.writer: Any = None
        self.global_step = 0
        self.groups: list[str] = []

    def __call__(self, event: str, info: dict) -> None:
        handler = getattr(self, "_on_" + event, None)
        if handler is not None:
            handler(info)
        if self.inner is not None:
            self.inner(event, info)

    def _open(self) -> Any:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.dir))
        return self.writer

    def _on_start(self, info: dict) -> None:
        self.global_step = int(info.get("start_epoch", 0)) * int(info.get("steps_per_epoch", 0))
        self.groups = [str(g) for g in info.get("groups") or []]
        self._open()

    def _on_step(self, info: dict) -> None:
        w = self._open()
        self.global_step += 1
        w.add_scalar("train/loss", info["loss"], self.global_step)
        seen = set()
        for name, lr in zip(self.groups, info.get("lrs") or []):
            if name not in seen:  # a group's decay and no-decay halves share its lr
                seen.add(name)
                w.add_scalar(f"lr/{name}", lr, self.global_step)

    def _on_epoch_end(self, m: dict) -> None:
        w, epoch = self._open(), int(m["epoch"])
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "ema_val_loss", "ema_val_acc", "images_per_s"):
            if m.get(key) is not None:
                w.add_scalar(f"epoch/{key}", m[key], epoch)
        w.flush()

    def _on_end(self, info: dict) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
