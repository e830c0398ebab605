"""Training augmentation: the policies of ``--augment`` and the batch mixing of ``--mixup``/``--cutmix``.

torchvision.transforms.v2 does the work (RandAugment, TrivialAugmentWide, MixUp, CutMix); this
module names the choices, checks them once and builds them.

- ``none``: no augmentation (training images are resized and centre-cropped like validation ones).
- ``light`` (the default): a random resized crop and, unless ``--no-flip``, a horizontal flip.
- ``randaugment`` / ``trivialaugment``: ``light``, then torchvision's RandAugment (2 ops,
  magnitude 9) or TrivialAugmentWide. Their colour operations are defined for 1- and 3-channel
  images only, so other channel counts are refused.

Mixing (``--mixup A``, ``--cutmix A``; alpha of the Beta distribution, 0 = off) blends pairs of
images of a batch and their labels: the loss is taken against soft targets. With both, each batch
uses one of them at random. It needs whole images, so it cannot train on cached features.
"""

from __future__ import annotations

from typing import Any, Callable

AUGMENTS = ("none", "light", "randaugment", "trivialaugment")
DEFAULT_AUGMENT = "light"


def augment_policy(value: Any) -> Any:
    """``True`` is the default policy and ``False`` is ``none`` (the older boolean ``augment``);
    a name is kept as given (checked by :func:`check_augment`)."""
    if value is True:
        return DEFAULT_AUGMENT
    if value is False:
        return "none"
    return value


def check_augment(policy: Any, channels: int | None, mixup: float = 0.0, cutmix: float = 0.0) -> list[str]:
    """The problems of an augmentation choice (empty when it is fine); ``channels`` None: not known yet."""
    problems = []
    if policy not in AUGMENTS:
        problems.append(f"--augment must be one of {', '.join(AUGMENTS)}, got {policy!r}")
    elif policy in ("randaugment", "trivialaugment") and channels is not None and channels not in (1, 3):
        problems.append(f"--augment {policy}: its colour operations take 1- or 3-channel images; this model "
                        f"takes {channels} channels (use --augment light)")
    for flag, value in (("--mixup", mixup), ("--cutmix", cutmix)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= float(value) <= 10.0:
            problems.append(f"{flag} is the alpha of a Beta distribution, from 0 (off) to 10; got {value!r}")
    return problems


def policy_steps(policy: str, interpolation: Any) -> list[Any]:
    """The steps a policy adds after the crop and the flip (PIL image in, PIL image out)."""
    from torchvision.transforms import v2

    if policy == "randaugment":
        return [v2.RandAugment(num_ops=2, magnitude=9, interpolation=interpolation)]
    if policy == "trivialaugment":
        return [v2.TrivialAugmentWide(interpolation=interpolation)]
    return []


def batch_mixer(num_classes: int, mixup: float = 0.0, cutmix: float = 0.0) -> Callable | None:
    """``(images, labels) -> (images, soft labels)`` for ``--mixup``/``--cutmix``, or None when both are 0.

    Its random draws come from torch's global generator, which the run seeds."""
    from torchvision.transforms import v2

    mixers = []
    if mixup:
        mixers.append(v2.MixUp(alpha=float(mixup), num_classes=num_classes))
    if cutmix:
        mixers.append(v2.CutMix(alpha=float(cutmix), num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)

