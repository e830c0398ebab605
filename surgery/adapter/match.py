"""The match and the load: which model tensor each checkpoint tensor is meant for, how it fits
(copied, adapted to the input channels, or its position grid interpolated), how much of the
model that covers, and then the copy of the matched tensors into the model.

The match reads names and shapes only; tensor bytes are read by :func:`load_matched`, after
every refusal (too little coverage, ``--strict``) has had its chance. A load that leaves much of
the backbone or of the checkpoint unused is a wrong architecture more often than not: the
refusals and :func:`fit_warnings` then say which architecture the keys fit.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Mapping

from ..keys import collapse_keys
from ..inspection.arch_guess import known_architectures
from ..errors import AlignError
from .align import align_keys
from .arch import ArchSpec
from .reports import LoadReport
from .source import Source
from .tensors import adapt_input_conv, input_conv_fits, interpolate_pos_embed, pos_embed_fits

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from ..inspection.arch_guess import ArchGuess

    from .heads import HeadPlan

_IGNORED = "num_batches_tracked"  # BatchNorm's step counter: never reported missing
WARN_BELOW = 0.9  # a load that covers less of the backbone than this is worth a warning
WARN_UNUSED = 0.1  # ... and so is one that leaves more of the checkpoint's elements than this unused
_FITS = 0.5  # an architecture guess this good is a fit worth naming as the --arch to try


@dataclass
class Match:
    """``to_load``: model name -> (checkpoint name, how: copy | in_chans | interpolate)."""

    report: LoadReport
    model_shapes: dict[str, tuple[int, ...]]
    head_keys: list[str]
    to_load: dict[str, tuple[str, str]] = field(default_factory=dict)


def _under(name: str, paths: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in paths)


def match_keys(src: Source, model: "nn.Module", head: "HeadPlan", interpolate: bool) -> Match:
    """Align the checkpoint's names to the model's and sort every tensor into the report."""
    mshapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    head_keys = [k for k in mshapes if _under(k, head.modules)]
    align = align_keys(src.shapes, mshapes, ignore=head_keys)
    m = Match(LoadReport(alignment=align, head_new=head_keys), mshapes, head_keys)
    rep = m.report
    for ck, target in align.mapping.items():
        if ck != target:
            rep.renamed[ck] = target
        if _under(target, head.modules):
            rep.head_dropped.append(ck)
        elif target not in mshapes or target in m.to_load:
            rep.unexpected.append(ck)
        else:
            how = _fit(target, src.shapes[ck], mshapes[target], head.first_conv, interpolate)
            if how is None:
                rep.mismatched.append((ck, target, src.shapes[ck], mshapes[target]))
            else:
                m.to_load[target] = (ck, how)
    rep.missing = [k for k in mshapes if k not in m.to_load and k not in head_keys and not k.endswith(_IGNORED)]
    _measure_coverage(model, m, head.modules)
    return m


def _fit(target: str, cs: tuple[int, ...], ms: tuple[int, ...], first_conv: str | None, interpolate: bool) -> str | None:
    """How a checkpoint tensor of shape ``cs`` loads into model tensor ``target`` of shape ``ms``."""
    if cs == ms:
        return "copy"
    if first_conv and target == f"{first_conv}.weight" and input_conv_fits(cs, ms):
        return "in_chans"
    if interpolate and pos_embed_fits(target, cs, ms):
        return "interpolate"
    return None


def _measure_coverage(model: "nn.Module", m: Match, head_modules: list[str]) -> None:
    pnames = dict(model.named_parameters())
    total = sum(p.numel() for p in pnames.values()) or 1
    head_numel = sum(p.numel() for n, p in pnames.items() if _under(n, head_modules))
    got = sum(pnames[n].numel() for n in m.to_load if n in pnames)
    m.report.coverage = got / total
    m.report.backbone_coverage = got / max(total - head_numel, 1)


def check_match(m: Match, src: Source, spec: ArchSpec, min_coverage: float, strict: bool) -> None:
    """Refuse a match that covers less of the backbone than ``min_coverage``, or, with
    ``strict``, one that leaves anything besides the head missing, mismatched or unused (as
    ``load_state_dict(strict=True)`` would)."""
    rep = m.report
    where = src.info["path"] or src.info["weights"] or "checkpoint"
    if rep.backbone_coverage < min_coverage:
        guess, prefix = best_guess(src.shapes), explaining_prefix(src.shapes, m)
        fix = [arch_hint(guess, spec)]
        if prefix:
            fix.append(f"the keys meet the model's without a prefix they share: try --strip-prefix {prefix!r}")
        elif guess is None or guess.score < _FITS or guess.arch == spec.display:  # names, not the model, differ
            fix.append("rename keys with --rename if they are this model's under other names")
        mm = f", {len(rep.mismatched)} with other shapes" if rep.mismatched else ""
        raise AlignError(f"{where}: matches almost nothing of {spec.display}: {rep.backbone_coverage:.1%} of its "
                         f"backbone parameters ({len(m.to_load)} of {len(m.model_shapes) - len(m.head_keys)} "
                         f"tensors{mm}); {'; '.join(fix)}; or --min-coverage 0 to load anyway")
    if strict and (rep.missing or rep.mismatched or rep.unexpected):
        parts = []
        if rep.missing:
            parts.append(f"missing {', '.join(collapse_keys(rep.missing)[:6])}")
        if rep.mismatched:
            parts.append("shape-mismatched " + ", ".join(f"{t} {list(cs)} vs {list(ms)}"
                                                         for _, t, cs, ms in rep.mismatched[:4]))
        if rep.unexpected:
            parts.append(f"{len(rep.unexpected)} checkpoint tensors unused: {_listed(unused_groups(rep.unexpected, src.shapes))}")
            parts.append(arch_hint(best_guess(src.shapes), spec))
        raise AlignError(f"{where}: --strict: {'; '.join(parts)}; drop --strict to load the rest")


def fit_warnings(m: Match, src: Source, spec: ArchSpec) -> list[str]:
    """What a load that went through still deserves a word about: less than 90% of the backbone
    loaded, or more than a tenth of the checkpoint's elements unused; with the architecture the
    checkpoint fits when it is not ``spec``."""
    rep, out = m.report, []
    if rep.backbone_coverage < WARN_BELOW:
        out.append(f"only {rep.backbone_coverage:.1%} of {spec.display}'s backbone parameters loaded "
                   f"({len(m.to_load)} of {len(m.model_shapes) - len(m.head_keys)} tensors); the rest start "
                   f"from random values")
    total = sum(math.prod(s) for s in src.shapes.values()) or 1
    unused = sum(math.prod(src.shapes[k]) for k in rep.unexpected) / total
    if unused > WARN_UNUSED:
        out.append(f"{len(rep.unexpected)} checkpoint tensors ({unused:.1%} of its elements) unused: "
                   f"{_listed(unused_groups(rep.unexpected, src.shapes))}")
    if out:
        out[-1] += f"; {arch_hint(best_guess(src.shapes), spec, advise=False)}"
    return out


def best_guess(shapes: Mapping[str, tuple[int, ...]]) -> "ArchGuess | None":
    """`surgery inspect`'s best architecture guess; None when no known architecture fits."""
    guesses = known_architectures(shapes, top=1)
    return guesses[0] if guesses else None


def arch_hint(g: "ArchGuess | None", spec: ArchSpec, advise: bool = True) -> str:
    """What the guess ``g`` says of the checkpoint, in the words of ``--arch``; ``advise``: with
    the ``--arch`` to try (errors only: a warning cannot know whether the caller typed flags)."""
    if g is None:
        return "`surgery inspect` knows no architecture these keys fit"
    if g.arch == spec.display:
        return f"the keys fit {g.arch} (score {g.score:.2f})"
    if g.score >= _FITS:
        fit = f"the keys fit {g.arch} (score {g.score:.2f}), not {spec.display}"
        return f"{fit}: try --arch {g.arch!r}" if advise else fit
    return f"no known architecture fits the keys well; the nearest is {g.arch} (score {g.score:.2f})"


def explaining_prefix(shapes: Mapping[str, tuple[int, ...]], m: Match) -> str | None:
    """The longest prefix every checkpoint key shares (cut after a '.' or '_') whose removal makes
    more than half of the model's backbone tensors, and more than the match found, meet a
    checkpoint tensor of their shape; None when no prefix explains the mismatch."""
    wanted = {k: s for k, s in m.model_shapes.items() if k not in m.head_keys}  # as counted in m.to_load
    common = os.path.commonprefix(list(shapes))
    for end in range(len(common), 0, -1):  # longest first; the separators are few
        if common[end - 1] not in "._":
            continue
        p = common[:end]
        hits = sum(1 for k, s in shapes.items() if wanted.get(k[len(p):]) == tuple(s))
        if hits > max(len(m.to_load), len(wanted) // 2):
            return p
    return None


def unused_groups(unused: Iterable[str], keys: Iterable[str]) -> list[str]:
    """``unused`` (some of ``keys``) by the outermost module they fill alone, collapsed: resnet34's
    96 extra tensors in resnet18 read ``layer1.2.*, layer2.{2,3}.*, layer3.{2..5}.*, layer4.2.*``;
    a key whose every enclosing module holds used keys too stays itself."""
    unused = list(unused)
    spent = set(unused)
    mixed = set()  # modules holding a used key
    for k in keys:
        if k not in spent:
            parts = k.split(".")
            mixed.update(".".join(parts[:i]) for i in range(1, len(parts)))
    labels: dict[str, None] = {}
    for k in unused:
        parts = k.split(".")
        owner = next((".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) not in mixed), None)
        labels[f"{owner}.*" if owner else k] = None
    return collapse_keys(labels)


def _listed(groups: list[str], most: int = 8) -> str:
    return ", ".join(groups[:most]) + (f", ... ({len(groups) - most} more)" if len(groups) > most else "")


def load_matched(model: "nn.Module", src: Source, m: Match, in_chans: int) -> None:
    """Read each matched tensor, reshape it where the match said so, and copy it into ``model``."""
    import torch

    rep, new_sd = m.report, {}
    for target, (ck, how) in m.to_load.items():
        t = src.get(ck)
        if how == "in_chans":
            t = adapt_input_conv(t, in_chans)
            rep.adapted.append(target)
        elif how == "interpolate":
            t2 = interpolate_pos_embed(t, m.model_shapes[target])
            if t2 is None:
                rep.mismatched.append((ck, target, src.shapes[ck], m.model_shapes[target]))
                continue
            rep.resized.append((target, src.shapes[ck], m.model_shapes[target]))
            t = t2
        new_sd[target] = t
        rep.loaded.append(target)
    msd = model.state_dict()
    with torch.no_grad():
        for k, t in new_sd.items():
            msd[k].copy_(t)
