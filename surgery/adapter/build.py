"""From a resolved architecture to the model adapt loads into, in two steps.

:func:`blueprint` decides everything on a meta-device build (no memory): the spec (a torchvision
ViT is rebuilt for ``--input-size``), whether the factory took ``num_classes``, the input
pipeline and the head plan. :func:`build_model` then builds the real model, seeded, with the
head applied; ``load_adapted`` replays the same call from the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import AdaptError
from ..preprocess import resize_for
from .arch import ArchSpec, accepts_num_classes, build, input_config, timm_sized_for, with_normalisation

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from .heads import HeadPlan
    from .options import AdaptOptions


@dataclass(frozen=True)
class Blueprint:
    """What to build, decided before building it."""

    spec: ArchSpec
    took_num_classes: bool  # the factory takes num_classes itself (the manifest records it)
    input: dict  # the manifest's ``input`` section, before the channels are set
    head: "HeadPlan"


def blueprint(spec: ArchSpec, opts: "AdaptOptions", weights: Any = None) -> Blueprint:
    """The spec, input pipeline and head plan, from a meta-device build; ``weights``: the
    torchvision weights whose metadata gives the input pipeline."""
    from .heads import plan_head  # heads defines nn.Modules: it imports torch

    took = accepts_num_classes(spec)
    spec, meta_model = meta_model_for(spec, opts.num_classes, opts.seed, opts.input_size)
    inp = input_config(spec, meta_model, weights)
    if opts.input_size is not None:
        inp["size"], inp["resize"] = [opts.input_size, opts.input_size], resize_for(opts.input_size)
        _probe_at(meta_model, spec, opts.input_size)
    inp = with_normalisation(inp, opts.mean, opts.std)
    head = plan_head(spec, meta_model, num_classes=opts.num_classes, kind=opts.head, took_num_classes=took,
                     in_chans=opts.in_chans, size=tuple(inp["size"]), hidden=opts.hidden, dropout=opts.dropout)
    return Blueprint(spec, took, inp, head)


def _probe_at(model: "nn.Module", spec: ArchSpec, size: int) -> None:
    """A model fixed to another size is refused here, not in train; as --input-size was given,
    the refusal says how a factory that builds for one size is told the size."""
    from .heads import probe

    try:
        probe(model, 3, size)
    except AdaptError as e:
        failed = str(e).split("; pass --input-size")[0]
        raise AdaptError(f"--input-size {size}: {failed}; if {spec.display} is built for one image size, give it "
                         f"this one with --arch-kwargs (e.g. '{{\"img_size\": {size}}}'), or pass the size it "
                         f"was built for") from None


def meta_model_for(spec: ArchSpec, num_classes: int, seed: int, input_size: int | None) -> tuple[ArchSpec, "nn.Module"]:
    """The model on the meta device. A torchvision ViT built for another image size than
    ``input_size`` is rebuilt for it (``image_size``), so its position embedding is interpolated."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(spec, num_classes, meta=True)
        resized = _for_input_size(spec, model, input_size)
        if resized is not None:
            spec, model = resized, build(resized, num_classes, meta=True)
    return spec, model


def _for_input_size(spec: ArchSpec, model: "nn.Module", input_size: int | None) -> ArchSpec | None:
    """The spec of a torchvision model with a fixed ``image_size`` (or a timm one with a fixed
    ``img_size``) rebuilt for ``input_size``; None when nothing needs rebuilding."""
    if spec.kind == "timm":
        return timm_sized_for(spec, model, input_size)
    built = getattr(model, "image_size", None)
    if not (spec.kind == "torchvision" and input_size is not None and isinstance(built, int)
            and built != input_size and "image_size" not in spec.kwargs):
        return None
    patch = int(getattr(model, "patch_size", 1))
    if input_size % patch:
        raise AdaptError(f"--input-size {input_size}: {spec.name} cuts images into {patch}x{patch} "
                         f"patches; use a multiple of {patch}")
    return ArchSpec(spec.kind, spec.name, {**spec.kwargs, "image_size": input_size})


def build_model(spec: ArchSpec, num_classes: int, head: "HeadPlan", seed: int, meta: bool = False) -> "nn.Module":
    """The model with its new head, initialised from ``seed`` (the global RNG is left as it was)."""
    import torch

    from .heads import apply_head  # heads defines nn.Modules: it imports torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(spec, num_classes, meta=meta)
        return apply_head(model, head, num_classes)
