"""Find the classifier of any model, replace it with N outputs, build the concat-pool MLP head,
and give the first convolution another number of input channels (its weights: ``tensors``).

Detection runs a forward pass on a meta-device copy (no memory, no compute): the logits layer
is the last Linear/Conv2d to run whose output width is the model's output width. For
torchvision models the shipped signature table (``surgery.inspection.arch_guess``) names the classifier and
the auxiliary heads (Inception, GoogLeNet) directly.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..inspection.arch_guess import classifier_key, head_keys
from ..errors import AdaptError
from .arch import ArchSpec
from .manifest import HEAD_KINDS


class AdaptiveConcatPool2d(nn.Module):
    """Adaptive max and average pooling side by side: 2C channels out (fastai's concat pool)."""

    def __init__(self, output_size: int = 1):
        super().__init__()
        self.output_size = output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([nn.functional.adaptive_max_pool2d(x, self.output_size),
                          nn.functional.adaptive_avg_pool2d(x, self.output_size)], 1)


class MLPHead(nn.Sequential):
    """flatten, BatchNorm1d, dropout(p/2), linear, ReLU, BatchNorm1d, dropout(p), linear.

    It follows an :class:`AdaptiveConcatPool2d` that replaced the model's global pool, so
    ``in_features`` is twice the backbone's channel count. Index 7 is the final classifier.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int = 512, dropout: float = 0.5):
        super().__init__(
            nn.Flatten(1),
            nn.BatchNorm1d(in_features),
            nn.Dropout(dropout / 2),
            nn.Linear(in_features, hidden),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(hidden),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )


@dataclass
class HeadPlan:
    """The structural changes to the built model: pure data, stored in the manifest."""

    kind: str  # linear | mlp
    classifier: str  # module path of the final logits layer (after the change)
    aux: list[str] = field(default_factory=list)  # auxiliary classifiers (Inception/GoogLeNet)
    replace: bool = False  # the factory could not take num_classes: linear layers are swapped
    pool: str | None = None  # mlp: the global pool replaced by concat pooling
    block: str | None = None  # mlp: the module replaced by MLPHead
    in_features: int = 0
    out_features: int = 0
    hidden: int | None = None
    dropout: float | None = None
    first_conv: str | None = None  # set when in_chans != 3
    in_chans: int = 3
    original_classes: int | None = None

    @property
    def modules(self) -> list[str]:
        """Module paths whose parameters are new: the head group."""
        return [self.block or self.classifier, *self.aux]

    def to_json(self) -> dict:
        return {"kind": self.kind, "module": self.block or self.classifier, "classifier": self.classifier,
                "aux": list(self.aux), "replace": self.replace, "pool": self.pool, "block": self.block,
                "in_features": self.in_features, "out_features": self.out_features, "hidden": self.hidden,
                "dropout": self.dropout, "first_conv": self.first_conv, "in_chans": self.in_chans,
                "original_classes": self.original_classes}

    @classmethod
    def from_json(cls, d: dict) -> "HeadPlan":
        return cls(kind=d["kind"], classifier=d["classifier"], aux=list(d.get("aux") or []),
                   replace=bool(d.get("replace")), pool=d.get("pool"), block=d.get("block"),
                   in_features=int(d["in_features"]), out_features=int(d["out_features"]),
                   hidden=d.get("hidden"), dropout=d.get("dropout"), first_conv=d.get("first_conv"),
                   in_chans=int(d.get("in_chans", 3)), original_classes=d.get("original_classes"))


# ----------------------------------------------------------------------------- probing

@dataclass
class Probe:
    output_shape: tuple[int, ...]
    order: list[str]  # leaf modules in the order they started
    out_shapes: dict[str, tuple[int, ...]]


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def probe(model: nn.Module, in_chans: int, size: int | tuple[int, int]) -> Probe:
    """Forward a (2, in_chans, H, W) meta input through a meta-device model in eval mode."""
    h, w = (size, size) if isinstance(size, int) else size
    order: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, mod in model.named_modules():
        if name and not any(True for _ in mod.children()):
            handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: order.append(n)))
            handles.append(mod.register_forward_hook(
                lambda m, a, o, n=name: shapes.__setitem__(n, tuple(o.shape)) if isinstance(o, torch.Tensor) else None))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, in_chans, h, w, device="meta"))
    except Exception as e:  # noqa: BLE001 - any model code: reported as a refusal
        raise AdaptError(f"a forward pass of the model on a {in_chans}x{h}x{w} input failed "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); pass --input-size "
                         f"with the size the model expects") from None
    finally:
        for hd in handles:
            hd.remove()
        model.train(was)
    t = _first_tensor(out)
    if t is None:
        raise AdaptError(f"the model's forward returned {type(out).__name__}, not logits")
    return Probe(tuple(t.shape), order, shapes)


def _out_dim(mod: nn.Module) -> int | None:
    if isinstance(mod, nn.Linear):
        return mod.out_features
    if isinstance(mod, nn.Conv2d):
        return mod.out_channels
    return None


def find_classifier(model: nn.Module, pr: Probe) -> str:
    """The last Linear/Conv2d to run whose output width is the logits' width."""
    if len(pr.output_shape) != 2:
        raise AdaptError(f"the model's output has shape {list(pr.output_shape)}, not (batch, classes); "
                         f"surgery adapt handles classification models")
    k = pr.output_shape[1]
    mods = dict(model.named_modules())
    for name in reversed(pr.order):
        if _out_dim(mods[name]) == k:
            return name
    raise AdaptError(f"could not find the layer that produces the {k} logits (no Linear or Conv2d with "
                     f"{k} outputs runs in forward); wrap the model so its classifier is an nn.Linear")


def find_aux(model: nn.Module, pr: Probe, classifier: str, k: int) -> list[str]:
    """Auxiliary classifiers: 'aux' modules with k outputs that eval-mode forward skips."""
    ran = set(pr.order)
    return [n for n, m in model.named_modules()
            if n != classifier and n not in ran and "aux" in n.lower() and _out_dim(m) == k]


def find_pool(model: nn.Module, pr: Probe, classifier: str) -> str:
    """The last global average pool (1x1 output) that runs before the classifier."""
    mods = dict(model.named_modules())
    idx = pr.order.index(classifier)
    for name in reversed(pr.order[:idx]):
        m = mods[name]
        if isinstance(m, nn.AdaptiveAvgPool2d) and pr.out_shapes.get(name, ())[-2:] == (1, 1):
            return name
    raise AdaptError("--head mlp needs a CNN backbone with a global average pool module (AdaptiveAvgPool2d "
                     f"to 1x1) before its classifier {classifier!r}; this model has none: use --head linear")


def head_block(classifier: str, pool: str) -> str:
    """The shallowest module that holds the classifier but not the pool: what MLPHead replaces."""
    parts = classifier.split(".")
    for i in range(1, len(parts) + 1):
        cand = ".".join(parts[:i])
        if not (pool == cand or pool.startswith(cand + ".")):
            return cand
    return classifier


def first_conv(model: nn.Module, pr: Probe | None) -> str:
    mods = dict(model.named_modules())
    names = pr.order if pr is not None else list(mods)
    for name in names:
        m = mods.get(name)
        if isinstance(m, nn.Conv2d) and m.in_channels == 3:
            return name
    raise AdaptError("--in-chans: the model has no Conv2d taking 3 input channels to adapt")


def plan_head(spec: ArchSpec, meta_model: nn.Module, *, num_classes: int, kind: str, took_num_classes: bool,
              in_chans: int, size: int | tuple[int, int], hidden: int = 512, dropout: float = 0.5) -> HeadPlan:
    """Decide what to change, from a meta-device build of the model (left unchanged)."""
    if kind not in HEAD_KINDS:
        raise AdaptError(f"--head {kind!r}: choose one of {', '.join(HEAD_KINDS)}")
    need_probe = not (spec.kind == "torchvision") or kind == "mlp" or in_chans != 3
    pr = probe(meta_model, 3, size) if need_probe else None
    mods = dict(meta_model.named_modules())
    classifier, aux = None, []
    if spec.kind == "torchvision":
        classifier = classifier_key(spec.name).rpartition(".")[0]
        aux = []
        for key in head_keys(spec.name):
            mod = key.rpartition(".")[0]
            if mod != classifier and mod in mods and mod not in aux and _out_dim(mods[mod]) is not None:
                aux.append(mod)
        if classifier not in mods:
            classifier = None
    if spec.kind == "timm" and classifier is None:
        cfg = getattr(meta_model, "pretrained_cfg", None) or {}
        name = cfg.get("classifier")
        if isinstance(name, str) and name in mods and _out_dim(mods[name]) is not None:
            classifier = name
    if classifier is None:
        pr = pr or probe(meta_model, 3, size)
        classifier = find_classifier(meta_model, pr)
        aux = find_aux(meta_model, pr, classifier, _out_dim(mods[classifier]) or 0)
    cls_mod = mods[classifier]
    k = _out_dim(cls_mod)
    in_features = cls_mod.in_features if isinstance(cls_mod, nn.Linear) else cls_mod.in_channels
    plan = HeadPlan(kind=kind, classifier=classifier, aux=aux, replace=not took_num_classes or k != num_classes,
                    in_features=in_features, out_features=num_classes, in_chans=in_chans,
                    original_classes=None if took_num_classes else k)
    if kind == "mlp":
        assert pr is not None
        pool = find_pool(meta_model, pr, classifier)
        channels = pr.out_shapes[pool][1]
        block = head_block(classifier, pool)
        start = next(i for i, n in enumerate(pr.order) if n == block or n.startswith(block + "."))
        between = [n for n in pr.order[pr.order.index(pool) + 1:start] if any(True for _ in mods[n].parameters())]
        if between:
            raise AdaptError(f"--head mlp: layers with parameters run between the pool {pool!r} and the "
                             f"classifier ({', '.join(between[:3])}); use --head linear for this model")
        plan.pool, plan.block = pool, block
        plan.in_features, plan.hidden, plan.dropout = 2 * channels, hidden, dropout
        plan.classifier = f"{plan.block}.7"
    if in_chans != 3:
        plan.first_conv = first_conv(meta_model, pr)
    return plan


# ----------------------------------------------------------------------------- applying

def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _resized(mod: nn.Module, n: int) -> nn.Module:
    w = mod.weight
    kw = {"device": w.device, "dtype": w.dtype}
    if isinstance(mod, nn.Linear):
        return nn.Linear(mod.in_features, n, bias=mod.bias is not None, **kw)
    if isinstance(mod, nn.Conv2d):
        return nn.Conv2d(mod.in_channels, n, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                         mod.groups, mod.bias is not None, mod.padding_mode, **kw)
    raise AdaptError(f"cannot resize a {type(mod).__name__} classifier; only Linear and Conv2d")


def apply_head(model: nn.Module, plan: HeadPlan, num_classes: int) -> nn.Module:
    """Make the structural changes of ``plan`` in place (deterministic: load_adapted replays it)."""
    mods = dict(model.named_modules())
    if plan.kind == "mlp":
        ref = next(iter(model.parameters()))
        _set(model, plan.pool, AdaptiveConcatPool2d(1))  # type: ignore[arg-type]
        head = MLPHead(plan.in_features, num_classes, plan.hidden or 512,
                       0.5 if plan.dropout is None else plan.dropout).to(device=ref.device, dtype=ref.dtype)
        _set(model, plan.block, head)  # type: ignore[arg-type]
        for a in plan.aux if plan.replace else ():
            if a in mods:
                _set(model, a, _resized(mods[a], num_classes))
    elif plan.replace:
        for path in [plan.classifier, *plan.aux]:
            _set(model, path, _resized(mods[path], num_classes))
    if plan.first_conv:
        conv = mods[plan.first_conv]
        new = copy.deepcopy(conv)
        new.in_channels = plan.in_chans
        w = conv.weight
        new.weight = nn.Parameter(torch.empty(w.shape[0], plan.in_chans // conv.groups, *w.shape[2:],
                                              device=w.device, dtype=w.dtype))
        if w.device.type != "meta":
            nn.init.kaiming_uniform_(new.weight, a=math.sqrt(5))
        _set(model, plan.first_conv, new)
    return model
