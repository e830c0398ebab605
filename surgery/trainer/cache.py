"""The feature cache: run the frozen backbone once per image and train the head on its output.

Eligible when every parameter outside the head is frozen for the whole run (no unfreezing
scheduled), the frozen BatchNorm layers keep their statistics (policy ``frozen``) and the head
has no auxiliary classifiers. The model is split generically: a forward hook on the manifest's
head module (``head.module``: the classifier, or the MLP block that replaced pool + classifier)
captures its *input*; training then runs that module alone on the cached inputs.
:func:`verify_split` checks on real images that ``head(features) == model(x)`` before it is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..adapter.freeze import group_trainable
from ..errors import TrainError
from .data import ImageDataset
from .samples import Samples

if TYPE_CHECKING:  # pragma: no cover
    from .device import Placement


def _under(name: str, path: str) -> bool:
    return name == path or name.startswith(path + ".")


def head_path(manifest: Any) -> str:
    head = manifest.head if hasattr(manifest, "head") else manifest["head"]
    return head.get("module") or head.get("block") or head["classifier"]


def eligibility(model: nn.Module, manifest: Any, epochs: int) -> tuple[bool, str]:
    """(eligible, why not). Checked against the schedule of every epoch of the run."""
    data = manifest.data if hasattr(manifest, "data") else manifest
    path = head_path(manifest)
    if data["head"].get("aux"):
        return False, f"the model has auxiliary classifiers ({', '.join(data['head']['aux'])}) outside {path!r}"
    mods = dict(model.named_modules())
    if path not in mods:
        return False, f"the head module {path!r} named by the manifest is not in the model"
    groups = {g["name"]: g for g in data["groups"]}
    last = max(epochs - 1, 0)
    training = []
    for n, _ in model.named_parameters():
        if _under(n, path):
            continue
        meta = data["params"].get(n)
        if meta is None:
            return False, f"parameter {n!r} is not in the manifest"
        g = groups[meta["group"]]
        if group_trainable(g, last):  # unfreezing only ever adds: the last epoch is the widest
            training.append((n, g))
    if training:
        n, g = training[0]
        when = "from the start" if g["trainable"] else f"from epoch {g['unfreeze_at'] + 1}"  # counted from 1
        return False, (f"{len(training)} parameters outside the head train ({n} in group {g['name']!r} {when}); "
                       f"the cache needs the whole backbone frozen for the whole run")
    has_bn = any(not _under(m, path) for m in data["bn"]["modules"])
    if has_bn and data["bn"]["policy"] != "frozen":
        return False, "BatchNorm policy is 'train': the frozen backbone's statistics would change"
    return True, ""


class HeadInput:
    """A forward hook that keeps the input of ``model.<path>`` from the last forward."""

    def __init__(self, model: nn.Module, path: str):
        self.module = model.get_submodule(path)
        self.value: Any = None
        self.bad: str | None = None
        self._h = self.module.register_forward_hook(self._hook)

    def _hook(self, mod: Any, args: tuple, out: Any) -> None:
        if len(args) != 1 or not isinstance(args[0], torch.Tensor):
            self.bad = f"the head module takes {len(args)} inputs, not one tensor"
            self.value = None
            return
        self.value = args[0].detach()

    def remove(self) -> None:
        self._h.remove()


def verify_split(model: nn.Module, path: str, x: torch.Tensor, atol: float = 1e-4) -> str | None:
    """None when ``head(captured input) == model(x)`` (eval mode, float tolerance), else why not."""
    was = model.training
    model.eval()
    hook = HeadInput(model, path)
    try:
        with torch.no_grad():
            out = model(x)
            if hook.bad or hook.value is None:
                return hook.bad or f"the head module {path!r} did not run in forward"
            again = hook.module(hook.value)
        if not isinstance(out, torch.Tensor) or not isinstance(again, torch.Tensor):
            return "the model or its head does not return a tensor"
        if out.shape != again.shape:
            return f"head(features) has shape {list(again.shape)} but the model's output has {list(out.shape)}"
        diff = (out.float() - again.float()).abs().max().item() if out.numel() else 0.0
        scale = max(1.0, out.float().abs().max().item() if out.numel() else 1.0)
        if diff > atol * scale:
            return f"head(features) differs from the model's output by {diff:.3g} (the model does more after its head)"
        return None
    finally:
        hook.remove()
        model.train(was)


def extract(model: nn.Module, path: str, loader: Any, device: torch.device,
            to_device: Callable[[Any], Any], autocast: Callable[[], Any],
            on_batch: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) for every image of ``loader``: the inputs of the head module, on the
    CPU, float32, in the loader's order. The model runs in eval mode without gradients."""
    was = model.training
    model.eval()
    hook = HeadInput(model, path)
    feats, labels = [], []
    try:
        with torch.no_grad():
            for x, y in loader:
                with autocast():
                    model(to_device(x))
                if hook.bad or hook.value is None:
                    raise RuntimeError(hook.bad or "head did not run")
                feats.append(hook.value.float().cpu())
                labels.append(torch.as_tensor(y).cpu())
                if on_batch is not None:
                    on_batch(len(y))
    finally:
        hook.remove()
        model.train(was)
    return torch.cat(feats), torch.cat(labels)


class IndexDataset:
    """0..n-1: batches of indices drawn exactly as a DataLoader over the images would draw them."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def decide(model: nn.Module, manifest: Any, epochs: int, request: str, *, distributed: bool,
           compiled: bool, mixing: bool = False) -> tuple[bool, str]:
    """(use the cache, why not) for ``--cache-features request`` (auto, on, off); ``on`` where
    the cache cannot be used is refused."""
    if request == "off":
        return False, ""
    ok, why = eligibility(model, manifest, epochs)
    if ok and distributed:
        ok, why = False, "the feature cache is off under DDP (several processes)"
    if ok and compiled:
        ok, why = False, "--compile trains the whole model"
    if ok and mixing:
        ok, why = False, "--mixup/--cutmix mix whole images"
    if not ok and request == "on":
        raise TrainError(f"--cache-features on: not possible here: {why}; use --cache-features auto or off")
    return ok, why


@dataclass
class Features:
    """The cache: per view, the head's inputs and labels of every training image; and those of
    the validation images (CPU, float32, in the loaders' order)."""

    train: list[tuple[torch.Tensor, torch.Tensor]]
    val: tuple[torch.Tensor, torch.Tensor]

    def train_view(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The view an epoch trains on: they take turns."""
        return self.train[epoch % len(self.train)]


def build(model: nn.Module, path: str, samples: "Samples", val_set: Any, transforms: tuple[Callable, Callable], *,
          views: int, batch_size: int, workers: int, place: "Placement", seed: int, failure_log: Any,
          on_images: Callable[[int, int], None]) -> Features:
    """Run the frozen model once over the training images (``views`` augmented passes, or one
    plain pass when 0) and the validation set, keeping the head's inputs. ``transforms``: (plain,
    augmented). ``on_images(done, total)`` follows progress."""
    kw = dict(batch_size=max(batch_size, 64), shuffle=False, num_workers=workers, pin_memory=place.cuda)
    total = len(samples.train) * max(views, 1) + len(val_set)
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        on_images(done[0], total)

    def features(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return extract(model, path, DataLoader(dataset, **kw), place.device, place.inputs, place.autocast, tick)

    train_views = []
    # the cache draws its own random numbers: training then sees the same generator states as
    # the uncached path, so both give the same result without augmentation
    with torch.random.fork_rng(devices=[]):
        for v in range(max(views, 1)):
            ds = ImageDataset(samples.train, transforms[1] if views else transforms[0], failure_log=failure_log)
            torch.manual_seed(seed * 1009 + v)
            train_views.append(features(ds))
        val_feats = features(val_set)
    return Features(train_views, val_feats)
