"""What a run writes into OUT besides checkpoints: run.log, metrics.jsonl, the plots, and the
fine-tuned model with its updated manifest. Every file is written atomically, by rank 0 only."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..adapter.arch import ArchSpec
from ..adapter.manifest import MANIFEST_NAME, REPORT_NAME, WEIGHTS_NAME, write_json
from ..io import atomic_file, sha256_file
from ..preprocess import input_pipeline
from .plots import plot_curves

Observer = Callable[[str, dict], None]
SCHEMA = "surgery.train/1"  # of TrainResult.to_json, what `surgery train --json` prints


@dataclass
class TrainResult:
    """What a run produced. ``metrics``: one dict per epoch, as in metrics.jsonl."""

    out: str
    best_epoch: int
    best_val_acc: float
    best_val_loss: float
    epochs_run: int
    stopped_early: bool
    class_names: list[str]
    metrics: list[dict]
    cache_used: bool = False
    cache_reason: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    device: str = "cpu"
    world_size: int = 1
    resumed_from: str | None = None
    best_weights: str = "raw"  # "ema": the averaged weights (--ema) scored higher and are the ones kept
    per_class_val_acc: dict[str, float] | None = None  # when the classes are skewed
    unfreeze: list[dict] = field(default_factory=list)  # each unfreeze: epoch, groups, lrs, how the lr was found
    guard: list[dict] = field(default_factory=list)  # each guard event: epoch, val loss, restored epoch, new lrs
    head_phase_best: dict | None = None  # best val acc/loss before the first unfreeze, and after it
    after_unfreeze_best: dict | None = None

    def to_json(self) -> dict:
        d = {"schema": SCHEMA, **asdict(self)}
        d["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        return d


class RunFiles:
    """OUT's text outputs, kept in memory and rewritten atomically (rank 0 only)."""

    def __init__(self, out: Path, enabled: bool, observer: Observer):
        self.out, self.enabled, self.observer = out, enabled, observer
        self.lines: list[str] = []

    def load_existing(self) -> None:
        p = self.out / "run.log"
        if p.is_file():
            self.lines = p.read_text(encoding="utf-8").splitlines()

    def log(self, msg: str, write: bool = True) -> None:
        if not self.enabled:
            return
        self.lines.append(msg)
        self.observer("log", {"message": msg})
        if write:
            self.flush_log()

    def flush_log(self) -> None:
        if self.enabled:
            self.write_text("run.log", "\n".join(self.lines) + "\n")

    def write_text(self, name: str, text: str) -> None:
        if not self.enabled:
            return
        with atomic_file(self.out / name) as tmp:
            tmp.write_text(text, encoding="utf-8")

    def metrics(self, history: list[dict]) -> None:
        self.write_text("metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history))


def unfreeze_epochs(manifest: Any, epochs: int) -> list[int]:
    """1-based epoch numbers where a group starts training (for the curves)."""
    at = sorted({int(g["unfreeze_at"]) for g in manifest.groups if not g["trainable"] and g["unfreeze_at"] is not None})
    return [a + 1 for a in at if 0 < a < epochs]


def plot_run_curves(history: list[dict], out_p: Path, manifest: Any, epochs: int, best_epoch: int | None = None,
                    stopped_early: bool = False) -> None:
    plot_curves(history, out_p / "curves.png", unfreeze_epochs=unfreeze_epochs(manifest, epochs),
                best_epoch=best_epoch, stopped_at=history[-1]["epoch"] if stopped_early and history else None)


def write_model(out_p: Path, adapted_p: Path, manifest: Any, state: dict, classes: list[str], result: TrainResult,
                train_args: dict, cm: list, per_class: list) -> None:
    """model.safetensors (best weights, clean keys) and the updated manifest, each atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    with atomic_file(out_p / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    data = copy.deepcopy(manifest.data)
    data["arch"] = {**data["arch"], **ArchSpec.from_json(data["arch"]).moved(adapted_p, out_p)}  # found from OUT too
    data["class_names"] = list(classes)
    data["head"]["class_names"] = list(classes)
    if train_args.get("image_size") is not None:
        # the model now expects the size it was fine-tuned at: evaluate/predict/load_adapted read it here
        size = int(train_args["image_size"])
        pipe = input_pipeline(manifest, size)
        data["input"].update(size=list(pipe.size), resize=pipe.resize, source=f"surgery train --image-size {size}")
    data["files"]["weights"] = WEIGHTS_NAME
    data["files"]["weights_sha256"] = sha256_file(out_p / WEIGHTS_NAME)
    data["trained_from"] = {"path": str(adapted_p.resolve()),
                            "weights_sha256": manifest["files"].get("weights_sha256")}
    data["results"] = {"best_epoch": result.best_epoch, "val_acc": result.best_val_acc,
                       "val_loss": result.best_val_loss, "epochs_run": result.epochs_run,
                       "stopped_early": result.stopped_early, "weights": result.best_weights,
                       "per_class_val_acc": dict(zip(classes, per_class)),
                       "confusion": cm, "train_args": train_args}
    src_report = adapted_p / REPORT_NAME
    if src_report.is_file():
        with atomic_file(out_p / REPORT_NAME) as tmp:
            shutil.copyfile(src_report, tmp)
    else:
        data["files"]["load_report"] = None
    with atomic_file(out_p / MANIFEST_NAME) as tmp:
        write_json(tmp, data)
