"""The match and the load: which model tensor each checkpoint tensor is meant for, how it fits
(copied, adapted to the input channels, or its position grid interpolated), how much of the
model that covers, and then the copy of the matched tensors into the model.

The match reads names and shapes only; tensor bytes are read by :func:`load_matched`, after
every refusal (too little coverage, ``--strict``) has had its chance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from ..keys import collapse_keys
from ..archsig import guess_architecture
from ..errors import AlignError
from .align import align_keys
from .arch import ArchSpec
from .reports import LoadReport
from .source import Source
from .tensors import adapt_input_conv, input_conv_fits, interpolate_pos_embed, pos_embed_fits

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from .heads import HeadPlan

_IGNORED = "num_batches_tracked"  # BatchNorm's step counter: never reported missing


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
    ``strict``, one that leaves anything besides the head missing or mismatched."""
    rep = m.report
    where = src.info["path"] or src.info["weights"] or "checkpoint"
    if rep.backbone_coverage < min_coverage:
        guess = guess_architecture(src.shapes, top=1)
        hint = ""
        if guess and guess[0].score > 0.5 and guess[0].arch != spec.name:
            hint = f"; `surgery inspect` guesses it is {guess[0].arch} (score {guess[0].score:.2f}): try --arch {guess[0].arch}"
        mm = f", {len(rep.mismatched)} with other shapes" if rep.mismatched else ""
        raise AlignError(f"{where}: matches almost nothing of {spec.display}: {rep.backbone_coverage:.1%} of its "
                         f"backbone parameters ({len(m.to_load)} of {len(m.model_shapes) - len(m.head_keys)} "
                         f"tensors{mm}){hint}; use --rename/--strip-prefix if the names differ, or --min-coverage 0 "
                         f"to load anyway")
    if strict and (rep.missing or rep.mismatched):
        parts = []
        if rep.missing:
            parts.append(f"missing {', '.join(collapse_keys(rep.missing)[:6])}")
        if rep.mismatched:
            parts.append("shape-mismatched " + ", ".join(f"{t} {list(cs)} vs {list(ms)}"
                                                         for _, t, cs, ms in rep.mismatched[:4]))
        raise AlignError(f"{where}: --strict: {'; '.join(parts)}; drop --strict to load the rest")


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
