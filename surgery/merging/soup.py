"""``surgery soup RUN1 RUN2 ... --data DATA --out OUT``: a model soup of trained runs of one architecture.

The uniform soup is the float64 mean of every run (:mod:`.average`'s arithmetic); the greedy soup
(Wortsman et al. 2022, "Model soups") takes the runs best first by validation accuracy and adds one
only when the soup with it beats the soup without it by more than the noise: two standard errors
of the per-image difference in correctness between the two soups, on the same validation images.
Before any mixing, the loss along the straight line between the two best runs (alpha 0, .25, .5,
.75, 1, on a few validation batches) says whether they share a basin: a midpoint clearly above the
endpoints means averaging them lands on a ridge. BatchNorm statistics of the soup written are
either the averaged ones or recomputed on the training images, whichever validates better.
Everything is scored by the trainer's evaluation (:mod:`.soup_eval`); OUT is a trained-run folder
that ``surgery evaluate``, ``predict`` and ``export`` take.

    >>> rep = soup(["run1", "run2", "run3"], "data/", "soup/")  # doctest: +SKIP
    >>> rep.kept, rep.val_acc["greedy"], rep.val_acc["uniform"]
"""

from __future__ import annotations

import copy
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..errors import InputError

SCHEMA = "surgery.soup/1"
METHODS = ("greedy", "uniform")
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
INTERPOLATION_BATCHES = 4  # a few validation batches: enough to see a ridge, cheap before any mixing
# the midpoint's loss is "clearly" above the endpoints' mean when above it by half that mean and by 0.1
BARRIER_RELATIVE, BARRIER_ABSOLUTE = 0.5, 0.1
Observer = Callable[[str, dict], None]


@dataclass
class SoupReport:
    """What the soup found and wrote. ``steps``: the greedy rule's decision on each run after the
    best (``gain`` and ``noise`` in accuracy, the soup's accuracy with the run)."""

    out: str
    method: str
    images: int  # validation images every figure is measured on
    ingredients: list[dict]  # {"path", "val_acc", "val_loss"}, best first
    kept: list[str]
    steps: list[dict]
    val_acc: dict  # "best_run", "uniform", "greedy", "out"
    val_loss: float  # of what OUT holds
    bn: dict  # "modules", "images", "averaged", "recomputed", "kept"
    interpolation: dict  # "runs", "alphas", "losses", "barrier", "warning"
    verdict: str  # "soup": OUT beats the best run; "best-run": OUT is the best run; "no-gain": it does not beat it
    files: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = {"schema": SCHEMA, **asdict(self)}
        d["noise"] = d.pop("steps")
        return _finite(d)


def _finite(x: Any) -> Any:
    """``x`` with NaN and infinite floats (a diverged run's loss) as None: strict JSON has no NaN."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def soup(runs: Sequence[str | os.PathLike], data: str | os.PathLike, out: str | os.PathLike, *,
         method: str = "greedy", val_split: Optional[float] = None, seed: Optional[int] = None,
         batch_size: int = 64, workers: int = 0, device: str = "auto", trust_code: bool = False,
         force: bool = False, observer: Optional[Observer] = None) -> SoupReport:
    """Mix the trained ``runs`` (folders ``surgery train`` wrote, from one adapted folder) into ``out``:
    the greedy soup (``method="greedy"``) or the mean of all (``"uniform"``), both scored on
    ``data``'s validation images as ``surgery evaluate`` splits them (``val_split``/``seed`` as
    there). ``trust_code``: runs built from a factory, as in :func:`surgery.load_adapted`.
    ``observer(event, info)`` follows the work: ``ingredient``, ``interpolation`` (before any
    mixing), ``step``, ``bn``. Mismatched runs and a bad OUT are refused before anything is written."""
    from ..io import OUTPUTS, check_destination
    from .soup_eval import Scorer
    from .soup_runs import read_runs

    if method not in METHODS:
        raise InputError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if batch_size < 1 or workers < 0:
        raise InputError(f"--batch-size must be a positive integer and --workers at least 0, got {batch_size} "
                         f"and {workers}")
    tell = observer or (lambda event, info: None)
    ing = read_runs(runs, trust_code=trust_code)
    out_p = Path(out)
    check_destination(out_p, [*ing.paths, Path(data)], force=force, in_place=None, kind="folder",
                      owned=OUTPUTS["train"])
    sc = Scorer.build(ing, data, val_split=val_split, seed=seed, batch_size=batch_size, workers=workers,
                      device=device, trust_code=trust_code)
    alone = [sc.score(ing.mean([i])) for i in range(len(ing))]
    order = sorted(range(len(ing)), key=lambda i: -alone[i].accuracy)  # stable: ties keep the order given
    for i in order:
        tell("ingredient", {"path": str(ing.paths[i]), "val_acc": alone[i].accuracy, "val_loss": alone[i].loss})
    interp = _interpolation(ing, sc, order[0], order[1])
    tell("interpolation", interp)
    kept, steps, greedy = _greedy(ing, sc, order, alone, tell)
    uniform = sc.score(ing.mean(range(len(ing))))
    chosen = kept if method == "greedy" else list(range(len(ing)))
    state, final, bn = _batchnorm(ing, sc, chosen)
    tell("bn", bn)
    best = alone[order[0]]
    report = SoupReport(
        out=str(out_p), method=method, images=len(sc.val),
        ingredients=[{"path": str(ing.paths[i]), "val_acc": alone[i].accuracy, "val_loss": alone[i].loss}
                     for i in order],
        kept=[str(ing.paths[i]) for i in kept], steps=steps,
        val_acc={"best_run": best.accuracy, "uniform": uniform.accuracy, "greedy": greedy.accuracy,
                 "out": final.accuracy},
        val_loss=final.loss, bn=bn, interpolation=interp,
        verdict=_verdict(chosen == [order[0]] and bn["kept"] == "averaged", final.accuracy, best.accuracy))
    report.files = _write(out_p, ing, order[0], state, report)
    return report


def _verdict(is_best_run: bool, out_acc: float, best_acc: float) -> str:
    """"best-run": OUT is the best run unchanged; "soup": OUT beats it; "no-gain": it does not."""
    return "best-run" if is_best_run else "soup" if out_acc > best_acc else "no-gain"


def _interpolation(ing: Any, sc: Any, a: int, b: int) -> dict:
    """Loss along ``(1 - alpha) * A + alpha * B`` between the two best runs, and a warning when the
    midpoint sits clearly above the endpoints (they are not in one basin: their mean is no soup)."""
    losses = [sc.loss_on(ing.mean([a, b], [1 - alpha, alpha]), INTERPOLATION_BATCHES) for alpha in ALPHAS]
    ends = (losses[0] + losses[-1]) / 2
    barrier = losses[ALPHAS.index(0.5)] - ends
    warning = None
    if barrier > max(BARRIER_RELATIVE * ends, BARRIER_ABSOLUTE):
        warning = (f"the loss halfway between {ing.paths[a]} and {ing.paths[b]} is {barrier:.3f} above their mean "
                   f"({ends:.3f}): the runs do not share a basin, and averaging them is no soup; soup runs "
                   f"fine-tuned from one adapted folder with the same recipe")
    return {"runs": [str(ing.paths[a]), str(ing.paths[b])], "alphas": list(ALPHAS), "losses": losses,
            "barrier": barrier, "warning": warning}


def _greedy(ing: Any, sc: Any, order: list[int], alone: list, tell: Observer) -> tuple[list[int], list[dict], Any]:
    """The greedy soup: best run first; each next one kept when the soup with it beats the soup
    without it by more than two standard errors of the paired difference in correctness."""
    from .soup_eval import paired_noise

    kept, current, steps = [order[0]], alone[order[0]], []
    for i in order[1:]:
        trial = sc.score(ing.mean(kept + [i]))
        gain, noise = paired_noise(trial.correct, current.correct)
        keep = gain > noise
        step = {"path": str(ing.paths[i]), "val_acc": alone[i].accuracy, "soup_val_acc": trial.accuracy,
                "gain": gain, "noise": noise, "kept": keep}
        steps.append(step)
        tell("step", step)
        if keep:
            kept, current = kept + [i], trial
    return kept, steps, current


def _batchnorm(ing: Any, sc: Any, chosen: list[int]) -> tuple[dict, Any, dict]:
    """The soup's weights with its averaged BatchNorm statistics or with statistics recomputed on the
    training images, whichever scores higher on the validation images (a tie keeps the averaged)."""
    state = ing.mean(chosen)
    averaged = sc.score(state)
    modules = sc.recompute_bn()
    bn = {"modules": modules, "images": len(sc.train) if modules else 0, "averaged": averaged.accuracy,
          "recomputed": None, "kept": "averaged"}
    if not modules:
        return state, averaged, bn
    recomputed = sc.score()
    bn["recomputed"] = recomputed.accuracy
    if recomputed.accuracy > averaged.accuracy:
        bn["kept"] = "recomputed"
        return sc.state(), recomputed, bn
    return state, averaged, bn


def _write(out: Path, ing: Any, best: int, state: dict, report: SoupReport) -> list[str]:
    """OUT as a trained run: model.safetensors, the best run's manifest (the architecture found from
    OUT, the soup's results) and its load report, in one atomic rename."""
    from safetensors.torch import save_file

    from ..adapter.arch import ArchSpec
    from ..adapter.manifest import MANIFEST_NAME, REPORT_NAME, WEIGHTS_NAME, write_json
    from ..io import atomic_dir, sha256_file
    from ..trainer.evaluate import train_args

    m = ing.manifests[best]
    src = m.path or ing.paths[best]
    data = copy.deepcopy(m.data)
    data["arch"] = ArchSpec.from_json(data["arch"]).moved(src, out)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        data["files"] = {**data["files"], "weights": WEIGHTS_NAME, "weights_sha256": sha256_file(tmp / WEIGHTS_NAME)}
        report_src = src / str(data["files"].get("load_report") or REPORT_NAME)
        if data["files"].get("load_report") and report_src.is_file():
            shutil.copyfile(report_src, tmp / REPORT_NAME)
            data["files"]["load_report"] = REPORT_NAME
        else:
            data["files"]["load_report"] = None
        # train_args stay: evaluate reproduces the runs' split from them
        data["results"] = {"val_acc": report.val_acc["out"], "val_loss": report.val_loss, "weights": "soup",
                           "train_args": train_args(m),
                           "soup": {"method": report.method, "ingredients": report.ingredients, "kept": report.kept,
                                    "bn": report.bn["kept"]}}
        write_json(tmp / MANIFEST_NAME, data)
    names = [WEIGHTS_NAME, MANIFEST_NAME] + ([REPORT_NAME] if data["files"]["load_report"] else [])
    return [str(out / n) for n in names]
