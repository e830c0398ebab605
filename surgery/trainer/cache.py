"""The feature cache: run the frozen backbone once per image and train the head on its output.

Eligible when every parameter outside the head is frozen for the whole run (no unfreezing
scheduled), the frozen BatchNorm layers keep their statistics (policy ``frozen``) and the head
has no auxiliary classifiers. The model is split generically: a forward hook on the manifest's
head module (``head.module``: the classifier, or the MLP block that replaced pool + classifier)
captures its *input*; training then runs that module alone on the cached inputs.
:func:`verify_split` checks on real images that ``head(features) == model(x)`` before it is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


def _under(name: str, path: str) -> bool:
    return name == path or name.startswith(path + ".")


def head_path(manifest: Any) -> str:
    head = manifest.head if hasattr(manifest, "head") else manifest["head"]
    return head.get("module") or head.get("block") or head["classifier"]


def eligibility(model: "nn.Module", manifest: Any, epochs: int) -> tuple[bool, str]:
    """(eligible, why not). Checked against the schedule of every epoch of the run."""
    from ..adapter.freeze import group_trainable

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

    def __init__(self, model: "nn.Module", path: str):
        self.module = model.get_submodule(path)
        self.value: Any = None
        self.bad: str | None = None
        self._h = self.module.register_forward_hook(self._hook)

    def _hook(self, mod: Any, args: tuple, out: Any) -> None:
        import torch

        if len(args) != 1 or not isinstance(args[0], torch.Tensor):
            self.bad = f"the head module takes {len(args)} inputs, not one tensor"
            self.value = None
            return
        self.value = args[0].detach()

    def remove(self) -> None:
        self._h.remove()


def verify_split(model: "nn.Module", path: str, x: "torch.Tensor", atol: float = 1e-4) -> str | None:
    """None when ``head(captured input) == model(x)`` (eval mode, float tolerance), else why not."""
    import torch

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


def extract(model: "nn.Module", path: str, loader: Any, device: "torch.device",
            to_device: Callable[[Any], Any], autocast: Callable[[], Any],
            on_batch: Callable[[int], None] | None = None) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(features, labels) for every image of ``loader``: the inputs of the head module, on the
    CPU, float32, in the loader's order. The model runs in eval mode without gradients."""
    import torch

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
