"""``surgery advise CKPT --arch ARCH --data DATA``: which of the four presets, measured on the data.

The four regimes (small/large data x similar/different domain) are decided from numbers:

- **data size**: training images per class in DATA (the smallest class). ``small`` below
  :data:`LARGE_PER_CLASS` images per class, else ``large``.
- **the features**, from three quick probes on a fixed, seeded subset (at most
  :data:`PROBE_PER_CLASS` training and as many validation images per class):

  1. ``pretrained``: a linear probe (multinomial logistic regression) on the checkpoint's frozen
     features (the input of the new head);
  2. ``random``: the same probe on the same architecture's features at a random initialisation;
  3. ``scratch``: the same architecture trained from random weights, everything, for
     :data:`SCRATCH_EPOCHS` short epochs on the subset.

  A gap counts when it exceeds the noise of the probe (two standard errors of the difference on
  the probe's validation images). The preset:

  | the pretrained probe                                   | small data        | large data        |
  |--------------------------------------------------------|-------------------|-------------------|
  | beats random features and the short scratch run        | `small-similar`   | `large-similar`   |
  | beats random features, not the short scratch run       | `small-different` | `large-different` |
  | within the noise of random ones, beats the scratch run | `small-different` | `large-different` |
  | within the noise of random ones, not the scratch run   | `large-different` | `large-different` |
  | below random features                                  | `large-different` | `large-different` |

  The first two rows are the textbook's regimes, the domain ``similar`` or ``different``. In the
  third the features the head would read are no better than random ones (``features`` ``tied``,
  domain ``unclear``), but a short scratch run learns even less from the data: the data is too
  little to retrain the whole network, and the early stages, whose features the probe does not
  see, are the part most likely to carry over. On small data that is ``small-different``: the
  first half frozen, the rest retrains. Below it, when a scratch run learns as much or the
  features are worse than random (``worse``, domain ``different``), the weights are only an
  initialisation: nothing is frozen and everything trains at one lr (``large-different``, even
  on small data). So the preset is not always ``SIZE-DOMAIN``.

    >>> advice = advise("resnet18.pth", arch="resnet18", data="data/")  # doctest: +SKIP
    >>> advice.preset
    'small-similar'
"""

from __future__ import annotations

import json
import math
import os
import shlex
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .adapter.arch import ArchSpec

SCHEMA = "surgery.advice/1"
LARGE_PER_CLASS = 50
PROBE_PER_CLASS = 40
SCRATCH_EPOCHS = 4


@dataclass
class Probe:
    name: str
    val_acc: float
    seconds: float
    detail: str


@dataclass
class Advice:
    """What ``surgery advise`` decided and why. ``to_json()`` is the ``--json`` output."""

    preset: str
    size: str
    domain: str
    per_class: int
    classes: list[str]
    probes: list[Probe]
    noise: float  # the gap the pretrained probe needs against the random one
    noise_scratch: float  # ... and against the scratch run
    features: str  # "better", "tied" or "worse": the pretrained probe against the random one
    negative_transfer: bool  # features == "worse"
    reasons: list[str]
    commands: list[str]
    seconds: float
    warnings: list[str] = field(default_factory=list)
    schema: str = SCHEMA

    def to_json(self) -> dict:
        return asdict(self)


def preset_does(name: str) -> str:
    """What a preset freezes and at which lr the backbone trains, from its definition."""
    from .adapter.freeze import PRESETS

    cfg = PRESETS[name]
    if cfg.get("freeze") == "head-only":
        return "only the head trains"
    frozen = "the first half of the backbone frozen" if cfg.get("freeze_fraction") else "nothing frozen"
    mult = cfg["backbone_lr_mult"]
    rest = "the rest" if cfg.get("freeze_fraction") else "the backbone"
    return f"{frozen}, " + (f"{rest} at {mult:g}x the lr" if mult != 1 else "one lr")


def decide(per_class: int, pretrained: float, random: float, scratch: float, n_val: int) -> dict:
    """The preset from the measured numbers (pure; the table of the module docstring)."""
    def noise_of(a: float, b: float) -> float:
        return 2 * math.sqrt((a * (1 - a) + b * (1 - b)) / max(n_val, 1))

    size = "large" if per_class >= LARGE_PER_CLASS else "small"
    noise, noise_scratch = noise_of(pretrained, random), noise_of(pretrained, scratch)
    beats_scratch = pretrained - scratch > noise_scratch
    if pretrained - random > noise:
        features, domain = "better", "similar" if beats_scratch else "different"
        preset = f"{size}-{domain}"
    else:
        features = "worse" if random - pretrained > noise else "tied"
        domain = "different" if features == "worse" else "unclear"
        early_half = size == "small" and features == "tied" and beats_scratch
        preset = "small-different" if early_half else "large-different"
    return {"size": size, "domain": domain, "preset": preset, "features": features, "beats_scratch": beats_scratch,
            "negative_transfer": features == "worse", "noise": noise, "noise_scratch": noise_scratch}


def _subset(samples: Any, per_class: int, seed: int) -> tuple[list, list]:
    import random as rnd

    rng = rnd.Random(seed)
    out = []
    for items in (samples.train, samples.val):
        by: dict[int, list] = {}
        for p, y in items:
            by.setdefault(int(y), []).append((p, y))
        pick = []
        for y in sorted(by):
            rows = sorted(by[y])
            rng.shuffle(rows)
            pick += rows[:per_class]
        out.append(pick)
    return out[0], out[1]


def _features(model: Any, path: str, items: list, tf: Any, dev: Any) -> tuple[Any, Any]:
    import contextlib

    from torch.utils.data import DataLoader

    from .trainer.cache import extract
    from .trainer.data import ImageDataset

    dl = DataLoader(ImageDataset(items, tf), batch_size=64)
    return extract(model, path, dl, dev, lambda x: x.to(dev), contextlib.nullcontext)


def linear_probe(train: tuple, val: tuple, num_classes: int, seed: int = 0, steps: int = 300) -> float:
    """Validation accuracy of a multinomial logistic regression on standardised features
    (full-batch AdamW, light weight decay)."""
    import torch

    (xt, yt), (xv, yv) = train, val
    xt, xv = xt.flatten(1).float(), xv.flatten(1).float()
    mean, std = xt.mean(0), xt.std(0) + 1e-6
    xt, xv = (xt - mean) / std, (xv - mean) / std
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(xt.shape[1], num_classes)
    with torch.no_grad():
        lin.weight.normal_(0, 0.01, generator=g)
        lin.bias.zero_()
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(xt), yt).backward()
        opt.step()
    with torch.no_grad():
        return float((lin(xv).argmax(1) == yv).float().mean())


def _scratch_run(model: Any, train_items: list, val: tuple, path: str, tf_train: Any, tf_val: Any, dev: Any,
                 seed: int) -> float:
    """Train every parameter of ``model`` (random init) for a few epochs; val accuracy at the end."""
    import torch
    from torch.utils.data import DataLoader

    from .trainer.data import ImageDataset
    from .trainer.loop import plain_epochs

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    dl = DataLoader(ImageDataset(train_items, tf_train), batch_size=16, shuffle=True, generator=g,
                    drop_last=len(train_items) > 16)
    total = SCRATCH_EPOCHS * len(dl)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(total, 1))
    model.to(dev)
    plain_epochs(model, dl, opt, epochs=SCRATCH_EPOCHS, sched=sched, device=dev)
    return accuracy(model, val, dev)


def accuracy(model: Any, val: tuple, dev: Any) -> float:
    """The accuracy of ``model`` (in eval mode) on the tensors ``val = (x, y)``, in batches of 128
    through the prediction loop (:func:`surgery.trainer.predictions.score`)."""
    from .trainer.predictions import feature_batches, score

    vx, vy = val
    model.eval()
    s = score(model, feature_batches(vx, vy, 128), prepare=lambda x, y: (x.to(dev), y.to(dev)), keep=True)
    return float((s.predicted() == vy).float().mean())


def _images(items: list, tf: Any) -> tuple[Any, Any]:
    import torch
    from torch.utils.data import DataLoader

    from .trainer.data import ImageDataset

    xs, ys = zip(*DataLoader(ImageDataset(items, tf), batch_size=128))
    return torch.cat(xs), torch.cat(ys)


def advise(ckpt: str | os.PathLike, *, arch: str, data: str | os.PathLike, val_split: float | None = None,
           input_size: int | None = None, arch_kwargs: dict | str | None = None, flip: bool = True,
           seed: int = 0, device: str = "auto") -> Advice:
    """Measure the probes on ``data`` and recommend a preset (see the module docstring)."""
    from .adapter.core import adapt, build_from_manifest
    from .preprocess import input_pipeline
    from .trainer.cache import head_path
    from .trainer.data import pipeline_transforms
    from .trainer.device import resolve_device
    from .trainer.inputs import read_samples

    t0 = time.perf_counter()
    samples, _ = read_samples(data, val_split=val_split, seed=seed, need_val=True)
    classes = list(samples.classes)
    counts = samples.counts()["train"]
    per_class = min(int(counts.get(c, 0)) for c in classes)
    dev = resolve_device(device)
    model, report = adapt(ckpt, arch=arch, num_classes=len(classes), arch_kwargs=arch_kwargs, freeze="head-only",
                          input_size=input_size, seed=seed)
    m = report.manifest
    pipe, path = input_pipeline(m), head_path(m)
    tf_val = pipeline_transforms(pipe, train=False)
    tf_train = pipeline_transforms(pipe, train=True, flip=flip)
    train_items, val_items = _subset(samples, PROBE_PER_CLASS, seed)
    probes = []
    for name, net in (("pretrained", model.to(dev)), ("random", _fresh(build_from_manifest, m, seed).to(dev))):
        t = time.perf_counter()
        acc = linear_probe(_features(net, path, train_items, tf_val, dev), _features(net, path, val_items, tf_val, dev),
                           len(classes), seed)
        probes.append(Probe(name, acc, time.perf_counter() - t,
                            f"linear probe on the {'checkpoint' if name == 'pretrained' else 'random initialisation'}'s "
                            f"frozen features"))
    t = time.perf_counter()
    acc = _scratch_run(_fresh(build_from_manifest, m, seed), train_items, _images(val_items, tf_val), path,
                       tf_train, tf_val, dev, seed)
    probes.append(Probe("scratch", acc, time.perf_counter() - t,
                        f"{SCRATCH_EPOCHS} epochs from random weights, everything trains"))
    d = decide(per_class, probes[0].val_acc, probes[1].val_acc, probes[2].val_acc, len(val_items))
    return Advice(preset=d["preset"], size=d["size"], domain=d["domain"], per_class=per_class, classes=classes,
                  probes=probes, noise=d["noise"], noise_scratch=d["noise_scratch"],
                  features=d["features"], negative_transfer=d["negative_transfer"],
                  reasons=_reasons(d, per_class, probes, len(train_items), len(val_items)),
                  commands=_commands(ckpt, arch, data, len(classes), d, m,
                                     dict(input_size=input_size, val_split=val_split, flip=flip)),
                  seconds=time.perf_counter() - t0, warnings=_warnings(d, probes))


def _fresh(build: Any, manifest: Any, seed: int) -> Any:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        # the architecture is the one the user named on this command line: its factory may run
        return build(manifest, trust_code=True)


def _reasons(d: dict, per_class: int, probes: list[Probe], n_train: int, n_val: int) -> list[str]:
    p = {x.name: x.val_acc for x in probes}
    small = d["size"] == "small"
    vs_random = {"better": "beat random features", "tied": "are within the noise of random features",
                 "worse": "are worse than random features"}[d["features"]]
    vs_scratch = "beat a short scratch run" if d["beats_scratch"] else "do not beat a short scratch run"
    if d["features"] == "better" and d["beats_scratch"]:
        why = "they transfer: " + ("only the head trains" if small else "everything fine-tunes")
    elif d["features"] == "better":
        why = ("the early half stays frozen, the later stages retrain" if small else
               "with this much data everything retrains at one lr")
    elif d["preset"] == "small-different":
        why = ("too little data to retrain it all, so the early half, whose features the probe does not see, "
               "stays frozen and the later stages retrain")
    else:
        cause = ("the features are worse than random" if d["features"] == "worse" else
                 f"there is this much data ({d['size']})" if not small else "a short scratch run learns as much")
        why = f"nothing is frozen and everything trains at one lr: {cause}"
    return [f"data: {per_class} training images in the smallest class ({'>=' if not small else '<'} "
            f"{LARGE_PER_CLASS} per class: {d['size']})",
            f"probes on {n_train} training / {n_val} validation images: pretrained features {p['pretrained']:.3f}, "
            f"random features {p['random']:.3f}, short scratch run {p['scratch']:.3f} (a gap counts beyond "
            f"+-{d['noise']:.3f} against random features, +-{d['noise_scratch']:.3f} against the scratch run)",
            f"{d['preset']}: the pretrained features {vs_random} and {vs_scratch}; {why}"]


def _warnings(d: dict, probes: list[Probe]) -> list[str]:
    p = {x.name: x.val_acc for x in probes}
    if d["features"] == "better":
        return []
    how = "are worse than" if d["features"] == "worse" else "do not clearly beat"
    return [f"the checkpoint's frozen features ({p['pretrained']:.3f}) {how} random ones ({p['random']:.3f}): "
            f"check that it helps at all with a scratch run (surgery train ... --compare-scratch)"]


def _commands(ckpt: Any, arch: str, data: Any, n: int, d: dict, manifest: Any, given: dict) -> list[str]:
    """The adapt and train lines to follow the advice, each with every flag it needs to work as
    printed: the architecture's kwargs and input size, the data's split and flips, consent to run
    a factory (adapt runs it because the user names it; train needs --trust-code), and the
    comparison the warning asks for."""
    spec = ArchSpec.from_json(manifest["arch"])
    adapt = ["surgery adapt", shlex.quote(str(ckpt)), "--arch", shlex.quote(arch)]
    if spec.kwargs:
        adapt += ["--arch-kwargs", shlex.quote(json.dumps(spec.kwargs))]
    adapt += ["--num-classes", str(n), "--preset", d["preset"]]
    if given["input_size"]:
        adapt += ["--input-size", str(given["input_size"])]
    train = ["surgery train adapted/ --data", shlex.quote(str(data))]
    if given["val_split"] is not None:
        train += ["--val-split", str(given["val_split"])]
    train.append("--out run/")
    if not given["flip"]:
        train.append("--no-flip")
    if spec.is_code:
        train.append("--trust-code")
    if d["features"] != "better":
        train.append("--compare-scratch")
    return [" ".join([*adapt, "--out adapted/"]), " ".join(train)]
