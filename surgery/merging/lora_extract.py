"""``surgery extract-lora BASE TUNED --rank R --out ADAPTER_DIR``: the difference between a
fine-tuned checkpoint and its base, as a peft LoRA adapter folder.

Each floating ``*.weight`` whose delta is not zero is factored by a truncated SVD: a 2-D delta
``U S V^T`` keeps its R largest singular values as ``lora_B = U S`` and ``lora_A = V^T``; a conv
delta is flattened to ``[out, in * kernel]`` first and ``lora_A`` gets the kernel back (lora_B is
1x1, as peft's conv LoRA). ``lora_alpha = r``, so peft's scale is 1; a tensor smaller than R keeps
its full rank through ``rank_pattern`` / ``alpha_pattern``. The relative Frobenius residual
``|delta - B A| / |delta|`` is reported per tensor. What a LoRA cannot carry (a changed bias,
norm, integer buffer, or a weight not named ``*.weight``) is listed, not saved: merging the
adapter back gives TUNED within each residual everywhere else, and BASE's values there.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..checkpoint import Checkpoint, tensor_bytes
from ..errors import RuleError
from ..formats import FORMATS, open_checkpoint
from ..formats.writing import Entry, Payload
from ..io import atomic_dir, check_destination, check_source
from .inputs import MERGED as FLOATING, clean_names, disagreements, listed
from .lora_adapter import CONFIG

SCHEMA = "surgery.extract-lora/1"
WRITTEN = (r"adapter_config\.json", r"adapter_model\.safetensors")  # what --force may replace in ADAPTER_DIR
PREFIX = "base_model.model."


@dataclass
class Factored:
    name: str
    module: str
    layout: str  # "linear", "transposed" (fan_in_fan_out), "embedding" or "conv"
    rank: int
    residual: float  # |delta - B A|_F / |delta|_F


@dataclass
class ExtractLoraReport:
    base: str
    tuned: str
    out: str
    rank: int
    factored: list[Factored] = field(default_factory=list)
    unchanged: int = 0  # tensors whose delta is zero, skipped
    not_representable: dict[str, str] = field(default_factory=dict)  # name -> why
    files: list[str] = field(default_factory=list)
    bytes_written: int = 0

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "base": self.base, "tuned": self.tuned, "out": self.out, "rank": self.rank,
                "factored": [{"name": f.name, "module": f.module, "layout": f.layout, "rank": f.rank,
                              "residual": f.residual} for f in self.factored],
                "max_residual": max((f.residual for f in self.factored), default=0.0), "unchanged": self.unchanged,
                "not_representable": [{"name": k, "why": v} for k, v in self.not_representable.items()],
                "files": self.files, "bytes_written": self.bytes_written}


def extract_lora(base: str | os.PathLike, tuned: str | os.PathLike, out: str | os.PathLike, rank: int, *,
                 fan_in_fan_out: bool = False, embeddings: Sequence[str] = (), force: bool = False,
                 allow_globals: Sequence[str] = ()) -> ExtractLoraReport:
    """Write the LoRA of rank ``rank`` closest to ``tuned - base`` (per tensor) as a peft adapter folder.

    ``fan_in_fan_out``: the model's linears are GPT-2's Conv1D (weight ``[in, out]``);
    ``embeddings``: names of nn.Embedding weights (peft factors them as ``lora_embedding_A/B``).

    >>> extract_lora("base.safetensors", "tuned.safetensors", "lora/", rank=16)  # doctest: +SKIP
    """
    if rank < 1:
        raise RuleError(f"--rank {rank}: give a rank of 1 or more")
    paths, out = [Path(base), Path(tuned)], Path(out)
    for p in paths:
        check_source(p)
    a, b = (open_checkpoint(p, allow_globals=tuple(allow_globals)) for p in paths)
    (na, _), (nb, _) = clean_names(a), clean_names(b)
    _refuse_disagreements(paths, a, b, na, nb, embeddings)
    check_destination(out, [*paths, *(Path(f) for c in (a, b) for f in c.files)], force=force, in_place=None,
                      kind="folder", owned=WRITTEN)
    report = ExtractLoraReport(str(paths[0]), str(paths[1]), str(out), rank)
    tensors: dict[str, Any] = {}
    for name, orig in na.items():
        layout = _layout(name, a.tensors[orig], fan_in_fan_out, set(embeddings))
        d = _delta(a, orig, b, nb[name])
        if d is None:
            report.unchanged += 1
        elif layout.startswith("not:"):
            report.not_representable[name] = layout[4:]
        elif not bool(d.isfinite().all()):
            report.not_representable[name] = "its delta holds NaN or inf"
        else:
            f, factors = _factor(name, layout, d, rank)
            report.factored.append(f)
            tensors.update(factors)
    if not report.factored:
        raise RuleError(f"{paths[1]} differs from {paths[0]} in no tensor a LoRA can carry"
                        + (f" (only in {', '.join(list(report.not_representable)[:4])})" if report.not_representable else "")
                        + "; nothing was written")
    report.files = _write(out, tensors, _config(report, fan_in_fan_out))
    report.bytes_written = sum(os.path.getsize(f) for f in report.files)
    return report


def _refuse_disagreements(paths: list[Path], a: Checkpoint, b: Checkpoint, na: dict[str, str], nb: dict[str, str],
                          embeddings: Sequence[str]) -> None:
    problems = disagreements(paths, [a, b], [na, nb])
    problems += [f"--embedding {k!r} is not a tensor of {paths[0].name}" for k in embeddings if k not in na]
    if problems:
        raise RuleError(f"cannot extract a LoRA: {listed(problems)}. Nothing was written; TUNED must be BASE "
                        f"fine-tuned, same names, shapes and dtypes")


def _layout(name: str, info: Any, fan_in_fan_out: bool, embeddings: set[str]) -> str:
    """How peft would factor this tensor, or ``not:why`` when a LoRA cannot carry it."""
    if info.dtype not in FLOATING or info.kind != "dense":
        return f"not:{info.dtype} {info.kind.replace('_', ' ')}"
    if len(info.shape) < 2 or len(info.shape) > 5:
        return f"not:{len(info.shape)}-D" + (" (a bias or a norm)" if len(info.shape) == 1 else "")
    if not name.endswith(".weight"):
        return "not:not a module's weight"
    if name in embeddings:
        return "embedding" if len(info.shape) == 2 else f"not:--embedding names a {len(info.shape)}-D tensor"
    if len(info.shape) == 2 and fan_in_fan_out:
        return "transposed"
    return "linear" if len(info.shape) == 2 else "conv"


def _delta(a: Checkpoint, na: str, b: Checkpoint, nb: str) -> Any:
    """tuned - base in float32 (float64 for float64 weights); None where they are equal."""
    import torch

    x, y = a.tensor(na), b.tensor(nb)
    if torch.equal(x, y):
        return None
    if not x.is_floating_point():
        return y  # any non-None: the caller lists it as not representable
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    return y.to(work) - x.to(work)


def _factor(name: str, layout: str, d: Any, rank: int) -> tuple[Factored, dict[str, Any]]:
    """The truncated SVD of one delta, as peft's keys -> float32 factors."""
    import torch

    m = d.flatten(1) if layout in ("linear", "conv") else d.T  # the matrix B @ A stands for
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    r = min(rank, s.numel())
    bm, am = u[:, :r] * s[:r], vh[:r]
    norm = float(m.norm())
    residual = float((m - bm @ am).norm()) / norm if norm > 0 else 0.0
    if layout == "conv":  # lora_A carries the kernel; lora_B is a 1x1 conv
        am, bm = am.reshape(r, *d.shape[1:]), bm.reshape(*bm.shape, *([1] * (d.dim() - 2)))
    module = name[: -len(".weight")]
    names = ("lora_embedding_A", "lora_embedding_B") if layout == "embedding" else ("lora_A.weight", "lora_B.weight")
    factors = {f"{PREFIX}{module}.{names[0]}": am.to(torch.float32).contiguous(),
               f"{PREFIX}{module}.{names[1]}": bm.to(torch.float32).contiguous()}
    return Factored(name, module, layout, r, residual), factors


def _write(out: Path, tensors: dict[str, Any], config: dict[str, Any]) -> list[str]:
    entries = [Entry(k, "F32", tuple(t.shape), (lambda t=t: tensor_bytes(t))) for k, t in tensors.items()]
    payload = Payload(entries=entries, names=list(tensors), aliases={}, metadata={"format": "pt"},
                      state_dict=lambda: dict(tensors))
    with atomic_dir(out) as tmp:
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        FORMATS["safetensors"].writer(tmp / "adapter_model.safetensors", payload)  # type: ignore[misc]
    return [str(out / CONFIG), str(out / "adapter_model.safetensors")]


def _config(report: ExtractLoraReport, fan_in_fan_out: bool) -> dict[str, Any]:
    # anchored: peft matches a pattern against the end of a module path, and `fc` would reach `body.fc`
    small = {"^" + re.escape(f.module): f.rank for f in report.factored if f.rank != report.rank}
    return {"peft_type": "LORA", "r": report.rank, "lora_alpha": report.rank, "target_modules": [f.module for f in report.factored],
            "rank_pattern": small, "alpha_pattern": dict(small), "fan_in_fan_out": fan_in_fan_out, "use_rslora": False,
            "bias": "none", "lora_dropout": 0.0, "modules_to_save": None, "init_lora_weights": True,
            "inference_mode": True, "task_type": None, "base_model_name_or_path": None}
