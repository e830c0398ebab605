"""The runs a soup mixes: trained-run folders of one architecture, read and checked once, and the
float64 mean of any of them computed as ``surgery average`` computes it (:mod:`.average`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..adapter.arch import ArchSpec, check_trust
from ..adapter.manifest import Manifest, inside, read_manifest
from ..checkpoint import Checkpoint
from ..errors import InputError, ManifestError
from ..formats.writing import Entry
from ..io import check_source, same_path, sha256_file
from .average import mean_source
from .inputs import MERGED, copy_source, open_inputs

if TYPE_CHECKING:  # pragma: no cover
    import torch

# what must agree between runs beyond their tensors: the model they rebuild, the classes its head
# predicts, and the input pipeline evaluate derives from the manifest
_INPUT_KEYS = ("size", "resize", "channels", "mean", "std", "interpolation")


@dataclass
class Ingredients:
    """The runs, their manifests, their weights files opened (tensor bytes stay on disk), and
    each one's clean name -> stored name."""

    paths: list[Path]
    manifests: list[Manifest]
    ckpts: list[Checkpoint]
    names: list[dict[str, str]]

    def __len__(self) -> int:
        return len(self.paths)

    def mean(self, which: Sequence[int], weights: Sequence[float] | None = None) -> dict[str, "torch.Tensor"]:
        """The (weighted) mean of the runs ``which``: floating tensors accumulated in float64 and cast
        back, integer buffers from ``which[0]``; exactly :func:`surgery.average`'s arithmetic."""
        ckpts = [self.ckpts[i] for i in which]
        names = [self.names[i] for i in which]
        w = [float(x) for x in weights] if weights is not None else [1.0] * len(ckpts)
        out = {}
        for clean, orig in names[0].items():
            info = ckpts[0].tensors[orig]
            src = (mean_source(ckpts, [n[clean] for n in names], w, info.dtype) if info.dtype in MERGED
                   else copy_source(ckpts[0], orig))
            out[clean] = Entry(clean, info.dtype, tuple(info.shape), src).tensor()
        return out


def read_runs(runs: Sequence[str | os.PathLike], *, trust_code: bool) -> Ingredients:
    """Every run's manifest and weights, refused (one error naming every disagreement, nothing
    written) unless they rebuild one architecture for the same classes and inputs with tensors of the
    same names and shapes. A run built from a factory needs ``trust_code``, as for ``load_adapted``."""
    paths = [Path(r) for r in runs]
    if len(paths) < 2:
        raise InputError(f"a soup needs two trained runs or more; got {len(paths)}")
    for i, p in enumerate(paths):
        if any(same_path(p, q) for q in paths[:i]):
            raise InputError(f"{p}: given twice; name each run once")
    manifests = [read_manifest(p) for p in paths]
    for p, m in zip(paths, manifests):
        check_trust(ArchSpec.from_json(m["arch"]), m.path or p, trust_code)
    _refuse_other_models(paths, manifests)
    opened = open_inputs([_weights_file(m) for m in manifests], "mix these runs")
    return Ingredients(paths, manifests, opened.ckpts, opened.names)


def _weights_file(m: Manifest) -> Path:
    """The weights file the manifest names, with the sha256 it pins (as ``load_adapted`` checks it)."""
    path = inside(m.path, m["files"]["weights"], "files.weights")  # type: ignore[arg-type]
    if not path.is_file():
        raise ManifestError(f"{path}: weights file named by the manifest is missing")
    check_source(path)
    want = m["files"].get("weights_sha256")
    if want and sha256_file(path) != want:
        raise ManifestError(f"{path}: sha256 differs from the manifest's; the weights were changed after the run")
    return path


def _model_of(m: Manifest) -> dict[str, Any]:
    """What a manifest rebuilds, compared between runs: a file factory by its pinned bytes and
    function (the same file may sit at another path), anything else by name."""
    arch = m["arch"]
    name = arch["name"]
    if arch["kind"] == "file":
        name = f"sha256 {arch.get('sha256')}:{name.rpartition(':')[2]}"
    return {"architecture": f"{arch['kind']} {name} {arch['kwargs']}", "classes": m.num_classes,
            "class names": m["class_names"] or m.head.get("class_names"),
            "input": {k: m["input"].get(k) for k in _INPUT_KEYS}}


def _refuse_other_models(paths: list[Path], manifests: list[Manifest]) -> None:
    first = _model_of(manifests[0])
    problems = []
    for p, m in zip(paths[1:], manifests[1:]):
        other = _model_of(m)
        problems += [f"{p} has {what} {other[what]} where {paths[0]} has {first[what]}"
                     for what in first if other[what] != first[what]
                     and (what != "class names" or None not in (other[what], first[what]))]  # unnamed: any
    if problems:
        shown = "; ".join(problems[:4]) + (f"; ... {len(problems) - 4} more" if len(problems) > 4 else "")
        raise InputError(f"cannot make a soup: the runs are not one model: {shown}. Nothing was written; "
                         f"soup runs fine-tuned from one adapted folder")
