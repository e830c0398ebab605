"""Which architecture a checkpoint fits, judged from key names and shapes alone.

The signatures of every torchvision classification model (state-dict key -> shape, which keys
hold the classifier) live in a small gzip JSON table shipped with the package, so a guess costs
a table read and some set arithmetic: no torch, no torchvision. A second table holds a few
representative timm models per family (ConvNeXt, ViT, EfficientNet), named as ``--arch`` takes
them (``timm:convnext_tiny``). Both are rebuilt with ``python -m surgery.inspection.arch_guess --rebuild``
(torchvision's from the installed torchvision, timm's when timm is installed).
"""

from __future__ import annotations

import difflib
import functools
import gc
import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from ..keys import common_prefix, strip_wrappers
from ..errors import SurgeryError
from ..metabuild import meta_build

if TYPE_CHECKING:  # pragma: no cover
    from ..checkpoint import TensorInfo

TABLE_PATH = Path(__file__).parent.parent / "data" / "torchvision_signatures.json.gz"
TABLE_FORMAT = "surgery.torchvision_signatures/1"
TIMM_TABLE_PATH = TABLE_PATH.with_name("timm_signatures.json.gz")  # same format, names "timm:..."
# Representatives of the timm families whose key names no torchvision model shares, one per
# width (a model of another width matches no shape: convnext_large scores 0.002 against
# convnext_tiny). timm's resnet50 has torchvision's very signature: that table names it already.
TIMM_MODELS = ("convnext_nano", "convnext_tiny", "convnext_small", "convnext_base", "convnext_large",
               "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224",
               "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4")
# The score below which a guess is noise. A model's own checkpoint scores 1.0, half of it 0.5, a
# sibling of the same family mostly 0.2-0.99 (resnet18 against resnet34: 0.55); checkpoints of
# models in neither table (timm ConvNeXt/ViT/EfficientNet against torchvision; timm regnety, swin,
# dla, ghostnet, poolformer against both) stay at or under 0.012. 0.1 sits well clear of noise.
KNOWN_MIN_SCORE = 0.1
# BatchNorm's step counter: absent from many published checkpoints, says nothing about the model
_IGNORED_SUFFIX = "num_batches_tracked"
_PROBE_CLASSES = 7  # a second build with this many classes shows which keys depend on num_classes


# ----------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class _Model:
    """A model's signature, precomputed for scoring."""

    name: str
    signature: dict[str, tuple[int, ...]]  # every state-dict key, in state-dict order
    classifier: str
    head: frozenset[str]  # keys whose dim 0 is num_classes (main and auxiliary classifiers)
    optional: frozenset[str]  # keys present only with default extras (aux_logits=True)
    fixed: frozenset[tuple[str, tuple[int, ...]]]  # required (key, shape), head excluded
    fixed_optional: frozenset[tuple[str, tuple[int, ...]]]
    head_required: tuple[tuple[str, tuple[int, ...]], ...]  # (key, shape without dim 0)
    head_optional: tuple[tuple[str, tuple[int, ...]], ...]
    n_required: int


@functools.lru_cache(maxsize=4)
def _load(path: str) -> tuple[dict[str, Any], dict[str, _Model]]:
    # tens of thousands of small tuples: cyclic GC passes would cost more than the parse itself
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _parse(path)
    finally:
        if enabled:
            gc.enable()


def _parse(path: str) -> tuple[dict[str, Any], dict[str, _Model]]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise SurgeryError(f"{path}: architecture signature table is missing; regenerate it with "
                           f"`python -m surgery.inspection.arch_guess --rebuild` (needs torchvision)") from None
    except (OSError, ValueError) as e:
        raise SurgeryError(f"{path}: architecture signature table is unreadable ({e}); regenerate it "
                           f"with `python -m surgery.inspection.arch_guess --rebuild`") from None
    if data.get("format") != TABLE_FORMAT:
        raise SurgeryError(f"{path}: table format {data.get('format')!r} is not {TABLE_FORMAT!r}; "
                           f"regenerate it with `python -m surgery.inspection.arch_guess --rebuild`")
    models: dict[str, _Model] = {}
    for name, m in data["models"].items():
        sig = {k: tuple(s) for k, s in m["keys"].items()}
        head = frozenset(m["head"])
        optional = frozenset(m.get("optional", ()))
        scored = [k for k in sig if not k.endswith(_IGNORED_SUFFIX)]
        req = [k for k in scored if k not in optional]
        opt = [k for k in scored if k in optional]
        models[name] = _Model(
            name=name, signature=sig, classifier=m["classifier"], head=head, optional=optional,
            fixed=frozenset((k, sig[k]) for k in req if k not in head),
            fixed_optional=frozenset((k, sig[k]) for k in opt if k not in head),
            head_required=tuple((k, sig[k][1:]) for k in req if k in head),
            head_optional=tuple((k, sig[k][1:]) for k in opt if k in head),
            n_required=len(req),
        )
    meta = {k: v for k, v in data.items() if k != "models"}
    return meta, models


@functools.lru_cache(maxsize=4)
def _known_keys(path: str) -> frozenset[str]:
    """Every key of every model in the table at ``path``."""
    return frozenset(k for m in _load(path)[1].values() for k in m.signature)


def _table(path: str | os.PathLike | None = None) -> tuple[dict[str, Any], dict[str, _Model]]:
    return _load(str(path or TABLE_PATH))


def list_archs() -> list[str]:
    """Names of the architectures in the table (torchvision's model names)."""
    return list(_table()[1])


def table_info() -> dict[str, Any]:
    """The table's provenance: format, torchvision and torch versions it was built with, model count."""
    meta, models = _table()
    return {**meta, "models": len(models)}


def _model(arch: str) -> _Model:
    models = _table(TIMM_TABLE_PATH if arch.startswith("timm:") else None)[1]
    if arch not in models:
        close = difflib.get_close_matches(arch, list(models), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(models)}"
        raise SurgeryError(f"unknown architecture {arch!r}{hint}")
    return models[arch]


def model_signature(arch: str) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of torchvision's ``arch`` (or of ``timm:NAME`` of the timm table),
    num_classes=1000 -> shape, in order."""
    return dict(_model(arch).signature)


def classifier_key(arch: str) -> str:
    """The final classifier's weight key, e.g. 'fc.weight' (resnet), 'heads.head.weight' (vit)."""
    return _model(arch).classifier


def head_keys(arch: str) -> list[str]:
    """Keys whose shape depends on num_classes: the classifier and any auxiliary classifiers."""
    m = _model(arch)
    return [k for k in m.signature if k in m.head]


def optional_keys(arch: str) -> list[str]:
    """Keys only the default build has (inception_v3/googlenet auxiliary heads)."""
    m = _model(arch)
    return [k for k in m.signature if k in m.optional]


# ----------------------------------------------------------------------------- guessing

@dataclass(frozen=True)
class ArchGuess:
    """How well a checkpoint fits one architecture.

    ``matched`` counts checkpoint keys present in the model with the same shape (classifier keys
    need only agree outside dim 0, which is num_classes); ``total`` is the model's key count
    (auxiliary heads counted when the checkpoint has them); ``score`` is matched over the union
    of both key sets (1.0: a perfect fit, lower for missing *and* for extra keys);
    ``unexpected`` counts checkpoint keys the model does not match. ``num_classes`` is read off
    the checkpoint's classifier weight; ``prefix_stripped`` is what was removed from its keys
    first. BatchNorm ``num_batches_tracked`` counters are ignored on both sides.
    """

    arch: str
    matched: int
    total: int
    score: float
    num_classes: int | None
    prefix_stripped: str
    unexpected: int = 0

    def to_json(self) -> dict:
        return {"arch": self.arch, "matched": self.matched, "total": self.total, "score": self.score,
                "num_classes": self.num_classes, "prefix_stripped": self.prefix_stripped,
                "unexpected": self.unexpected}


def _candidates(shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, dict[str, tuple[int, ...]]]]:
    """The key set as is (wrappers removed), then with shared leading components peeled."""
    stripped, wrap = strip_wrappers(shapes)
    cur = dict(zip(stripped, shapes.values()))
    out = [(wrap, cur)]
    prefix = wrap
    for _ in range(3):  # model.backbone.body. at most
        p = common_prefix(cur)
        if p is None:
            break
        prefix += p
        cur = {k[len(p):]: v for k, v in cur.items()}
        out.append((prefix, cur))
    return out


def _score(m: _Model, keys: dict[str, tuple[int, ...]], pairs: set, prefix: str, n_keys: int) -> ArchGuess:
    """How well ``m`` fits a reading of ``n_keys`` keys; ``keys`` holds those of them some model
    in the table has (the others count only as unexpected), ``pairs`` their (key, shape) items."""
    matched = len(m.fixed & pairs) if len(pairs) < len(m.fixed) else len(pairs & m.fixed)
    total = m.n_required
    for k, tail in m.head_required:
        s = keys.get(k)
        if s is not None and len(s) == len(tail) + 1 and s[1:] == tail:
            matched += 1
    if m.fixed_optional or m.head_optional:
        present = [k for k, _ in m.fixed_optional if k in keys] + [k for k, _ in m.head_optional if k in keys]
        total += len(present)
        matched += len(m.fixed_optional & pairs)
        for k, tail in m.head_optional:
            s = keys.get(k)
            if s is not None and len(s) == len(tail) + 1 and s[1:] == tail:
                matched += 1
    union = total + n_keys - matched
    cls = keys.get(m.classifier)
    num_classes = cls[0] if cls else None
    return ArchGuess(arch=m.name, matched=matched, total=total, score=matched / union if union else 0.0,
                     num_classes=num_classes, prefix_stripped=prefix, unexpected=n_keys - matched)


def guess_architecture(infos: Mapping[str, "TensorInfo"] | Mapping[str, Iterable[int]], top: int = 3, *,
                       table: str | os.PathLike | None = None) -> list[ArchGuess]:
    """The ``top`` torchvision architectures that fit the checkpoint best, best first.

    ``infos`` maps key -> TensorInfo (or directly -> shape). Wrapper prefixes (``module.``,
    ``_orig_mod.``) are removed, and shared prefixes such as ``model.``/``backbone.`` are tried
    removed as well; each architecture keeps its best reading. Scores are low for checkpoints of
    other models: the caller picks the threshold (1.0 is an exact fit).

    >>> guess_architecture(ckpt.tensors)[0]  # doctest: +SKIP
    ArchGuess(arch='resnet18', matched=102, total=102, score=1.0, num_classes=7, prefix_stripped='module.')
    """
    _, models = _table(table)
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in infos.items() if not k.endswith(_IGNORED_SUFFIX)}
    if not shapes:
        return []
    # scoring looks only at keys some model has: the others (all 50,000 of a model the table does
    # not know) need no (key, shape) pair hashed
    known = _known_keys(str(table or TABLE_PATH))
    readings = []
    for prefix, keys in _candidates(shapes):
        mine = {k: v for k, v in keys.items() if k in known}
        readings.append((prefix, mine, set(mine.items()), len(keys)))
    best: list[ArchGuess] = []
    for m in models.values():
        cands = [_score(m, keys, pairs, prefix, n) for prefix, keys, pairs, n in readings]
        best.append(max(cands, key=lambda g: (g.score, g.matched)))
    best.sort(key=lambda g: (-g.score, -g.matched, g.arch))
    return best[:top]


def known_architectures(infos: Mapping[str, "TensorInfo"] | Mapping[str, Iterable[int]], top: int = 3,
                        min_score: float = KNOWN_MIN_SCORE) -> list[ArchGuess]:
    """The ``top`` architectures of both tables (torchvision, then timm's as ``timm:NAME``) the
    checkpoint fits with at least ``min_score``, best first; empty when none does ("no known
    architecture"), rather than the least bad of unrelated models.

    >>> known_architectures(convnext_ckpt.tensors)[0].arch  # doctest: +SKIP
    'timm:convnext_tiny'
    """
    n_keys = sum(1 for k in infos if not k.endswith(_IGNORED_SUFFIX))
    if n_keys * min_score > max(_largest_model(TABLE_PATH), _largest_model(TIMM_TABLE_PATH)):
        # a score is matched keys over a union of at least n_keys, matched at most the model's
        # keys: too many keys for any model to reach min_score (a 50,000-tensor file skips both tables)
        return []
    guesses = guess_architecture(infos, top=top) + guess_architecture(infos, top=top, table=TIMM_TABLE_PATH)
    guesses.sort(key=lambda g: (-g.score, -g.matched, g.arch))
    return [g for g in guesses if g.score >= min_score][:top]


@functools.lru_cache(maxsize=4)
def _largest_model(table: str | os.PathLike) -> int:
    """The most keys a model of ``table`` has (every key it may count in a score's ``total``)."""
    return max((len(m.signature) for m in _table(table)[1].values()), default=0)


# ----------------------------------------------------------------------------- rebuilding

def _build(builder, kwargs: dict):
    return meta_build(builder, {"weights": None, **kwargs})


def _signature_of(model) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def rebuild_table(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Regenerate the signature table from the installed torchvision; returns a summary.

    Every model of ``torchvision.models.list_models(module=torchvision.models)`` is built on the
    meta device with default arguments (num_classes=1000; googlenet/inception_v3 with
    ``init_weights=False``, keeping their default auxiliary heads). A second build with another
    num_classes shows the head keys; the classifier is the last of them that is the weight of an
    ``nn.Linear``/``nn.Conv2d`` with 1000 outputs. For models with ``aux_logits``, a build without
    them marks the auxiliary keys optional. Imports torch and torchvision.
    """
    import torchvision

    def build(name: str):
        builder = torchvision.models.get_model_builder(name)
        return lambda kwargs: _build(builder, kwargs)

    names = torchvision.models.list_models(module=torchvision.models)
    return _rebuild(Path(path or TABLE_PATH), {n: build(n) for n in names}, "torchvision", torchvision.__version__)


def rebuild_timm_table(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Regenerate the timm table (:data:`TIMM_MODELS`, keyed ``timm:NAME``) from the installed
    timm, the same way as :func:`rebuild_table`; returns a summary. Imports torch and timm."""
    import timm

    def build(name: str):
        return lambda kwargs: meta_build(timm.create_model, {"model_name": name, "pretrained": False, **kwargs})

    return _rebuild(Path(path or TIMM_TABLE_PATH), {f"timm:{n}": build(n) for n in TIMM_MODELS}, "timm",
                    timm.__version__)


def _rebuild(out_path: Path, builders: dict[str, Any], library: str, version: str) -> dict[str, Any]:
    """Build every model of ``builders`` (name -> kwargs -> meta model) and write the table."""
    import warnings

    import torch

    models: dict[str, Any] = {}
    problems: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, build in builders.items():
            entry = _table_entry(build)
            if isinstance(entry, str):
                problems.append(f"{name}: {entry}")
            else:
                models[name] = entry
    if problems:
        raise SurgeryError("could not build the signature table: " + "; ".join(problems))
    data = {"format": TABLE_FORMAT, library: version, "torch": torch.__version__, "num_classes": 1000,
            "models": models}
    _write_gzip_json(out_path, data)
    _load.cache_clear()
    _known_keys.cache_clear()
    return {"path": str(out_path), "models": len(models), "bytes": out_path.stat().st_size, library: version}


def _table_entry(build: Any) -> dict | str:
    """One model's row of the table (classifier, head keys, every key's shape, optional keys), or
    why it cannot have one. ``build``: extra kwargs -> the model on the meta device."""
    import inspect as pyinspect

    import torch

    try:
        base = build({})
        cls_params = pyinspect.signature(type(base).__init__).parameters
        extra = {"init_weights": False} if "init_weights" in cls_params else {}
        if extra:
            base = build(extra)
        sig = _signature_of(base)
        probe = _signature_of(build({**extra, "num_classes": _PROBE_CLASSES}))
        optional: list[str] = []
        if "aux_logits" in cls_params:
            lean = _signature_of(build({**extra, "aux_logits": False}))
            optional = [k for k in sig if k not in lean]
    except Exception as e:  # noqa: BLE001 - report every model that fails, then stop
        return f"{type(e).__name__}: {e}"
    if list(probe) != list(sig):
        return "num_classes changes the key set"
    head = [k for k in sig if probe[k] != sig[k]]
    mods = dict(base.named_modules())
    for k in reversed(head):
        mod_name, _, leaf = k.rpartition(".")
        mod = mods.get(mod_name)
        if leaf == "weight" and isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and sig[k][0] == 1000:
            entry: dict[str, Any] = {"classifier": k, "head": head, "keys": sig}
            if optional:
                entry["optional"] = optional
            return entry
    return f"no Linear/Conv2d with 1000 outputs among {head}"


def _write_gzip_json(out_path: Path, data: dict) -> None:
    """``data`` as gzipped JSON, atomically; mtime 0, so the same table gives the same bytes."""
    raw = json.dumps(data, separators=(",", ":")).encode()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with open(tmp, "wb") as f:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0) as gz:
            gz.write(raw)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_path)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m surgery.inspection.arch_guess", description=__doc__.splitlines()[0])
    ap.add_argument("--rebuild", action="store_true", help="regenerate the table from the installed torchvision")
    ap.add_argument("--timm", action="store_true", help="with --rebuild: the timm table, from the installed timm")
    ap.add_argument("--out", default=None, help=f"where to write it (default {TABLE_PATH} or {TIMM_TABLE_PATH})")
    args = ap.parse_args(argv)
    if not args.rebuild:
        info = table_info()
        print(json.dumps(info))
        return 0
    summary = rebuild_timm_table(args.out) if args.timm else rebuild_table(args.out)
    library = "timm" if args.timm else "torchvision"
    print(f"wrote {summary['path']}: {summary['models']} models, {summary['bytes']} bytes, "
          f"{library} {summary[library]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
