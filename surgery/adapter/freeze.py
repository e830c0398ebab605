"""Freeze policies, the four data-regime presets, parameter groups and the BatchNorm policy.

Everything is decided once, by :func:`plan_freeze`, into plain data that the manifest stores;
:func:`apply_schedule` and :func:`apply_bn_policy` replay it on a model at any epoch, which is
all ``surgery train`` (or a user's own loop) needs.
"""

from __future__ import annotations

import math
import re
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import AdaptError
from ..option_table import option
from .manifest import BN_POLICIES

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

FREEZE_CHOICES = ("head-only", "none")


class _Presets(dict):
    """The four data regimes, as ``--preset NAME``.

| preset            | data                          | frozen                                    | backbone lr | BatchNorm |
|-------------------|-------------------------------|-------------------------------------------|-------------|-----------|
| `small-similar`   | little data, similar domain   | the whole backbone: only the new head trains | x0.1 (unused while frozen) | frozen (eval, statistics kept) |
| `small-different` | little data, different domain | the first half of the backbone's stages (rounded down); the later stages and the head train | x0.1 | frozen in the frozen stages |
| `large-similar`   | much data, similar domain     | nothing: everything trains from the pretrained start | x0.1 | trains |
| `large-different` | much data, different domain   | nothing: everything trains; the pretrained weights are only an initialisation | x1.0 (same lr as the head) | trains |

Stages are the backbone's top-level children, opened up (to three levels at most) while there
are fewer than four of them or one Sequential/ModuleList of three or more blocks holds over 70%
of the backbone (``features`` -> ``features.0``, ``features.1``...; ViT's ``encoder.layers`` ->
its blocks); parameters held directly by a module, such as ViT's ``class_token``, are stages of
their own; the head is never frozen by a preset. Options given
with a preset override its BatchNorm policy (``--bn``) and backbone multiplier
(``--backbone-lr-mult``), and ``--freeze-regex``/``--train-regex``, ``--layer-decay``,
``--unfreeze-at``, ``--gradual`` refine it; ``--freeze``, ``--freeze-until`` and
``--freeze-first`` conflict with a preset.
    """


PRESETS: dict[str, dict[str, Any]] = _Presets({
    "small-similar": {"freeze": "head-only", "bn": "frozen", "backbone_lr_mult": 0.1},
    "small-different": {"freeze_fraction": 0.5, "bn": "frozen", "backbone_lr_mult": 0.1},
    "large-similar": {"freeze": "none", "bn": "train", "backbone_lr_mult": 0.1},
    "large-different": {"freeze": "none", "bn": "train", "backbone_lr_mult": 1.0},
})
PRESETS_DOC = _Presets.__doc__


@dataclass(frozen=True)
class FreezeOptions:
    """How ``surgery adapt`` freezes, each option declared once with its flag (``--freeze-until``)."""

    freeze: str | None = option(None, "Base freeze policy.", metavar="head-only|none")
    freeze_until: str | None = option(None, "Freeze everything before MODULE (e.g. layer3).", metavar="MODULE")
    freeze_first: int | None = option(None, "Freeze the first N top-level children that have parameters.",
                                      metavar="N")
    freeze_regex: str | None = option(None, "Also freeze parameters matching REGEX.", metavar="REGEX")
    train_regex: str | None = option(None, "Keep parameters matching REGEX trainable (applied last).", metavar="REGEX")
    preset: str | None = option(None, "Data-regime preset.",
                                metavar="small-similar|small-different|large-similar|large-different")
    backbone_lr_mult: float | None = option(None, "LR multiplier of pretrained layers (default 0.1).")
    layer_decay: float | None = option(None, "Multiply the LR by this per stage, going down from the top.")
    unfreeze_at: int | None = option(None, "Everything trains after EPOCH epochs (from epoch EPOCH+1, as train counts "
                                     "them).", metavar="EPOCH")
    gradual: bool = option(False, "Unfreeze one stage more per epoch, from the top.")
    bn: str | None = option(None, "Frozen BatchNorm layers stay in eval mode (default frozen).", metavar="frozen|train")

    def to_json(self) -> dict:
        return dict(self.__dict__)

    def resolved(self) -> tuple["FreezeOptions", float | None]:
        """The options with the preset folded in and the defaults set, and the preset's freeze
        fraction; raises AdaptError naming every problem."""
        resolved, fraction, problems = self.check()
        if problems:
            raise AdaptError("; ".join(problems))
        return resolved, fraction

    def check(self) -> tuple["FreezeOptions", float | None, list[str]]:
        """(resolved options, freeze fraction, problems): :meth:`resolved` without the raise."""
        d, fraction, problems = self._with_preset()
        d["backbone_lr_mult"] = 0.1 if d["backbone_lr_mult"] is None else d["backbone_lr_mult"]
        d["bn"] = d["bn"] or "frozen"
        o = FreezeOptions(**d)
        return o, fraction, problems + o._problems()

    def _with_preset(self) -> tuple[dict, float | None, list[str]]:
        """The options as a dict with the preset folded in, its freeze fraction, and conflicts."""
        d = dict(self.__dict__)
        if self.preset is None:
            return d, None, []
        if self.preset not in PRESETS:
            return d, None, [f"--preset {self.preset!r}: choose one of {', '.join(PRESETS)}"]
        problems = []
        given = [f for f, v in (("--freeze", self.freeze), ("--freeze-until", self.freeze_until),
                                ("--freeze-first", self.freeze_first)) if v is not None]
        if given:
            problems.append(f"--preset {self.preset} decides what is frozen; drop {', '.join(given)} "
                            f"or drop the preset")
            d["freeze_until"] = d["freeze_first"] = None  # said once: no second complaint about them
        p = PRESETS[self.preset]
        d["freeze"] = p.get("freeze")
        d["bn"] = d["bn"] or p["bn"]
        if d["backbone_lr_mult"] is None:
            d["backbone_lr_mult"] = p["backbone_lr_mult"]
        return d, p.get("freeze_fraction"), problems

    def _problems(self) -> list[str]:
        """Conflicts and values out of range, in options whose preset is folded in."""
        problems: list[str] = []
        if self.freeze is not None and self.freeze not in FREEZE_CHOICES:
            problems.append(f"--freeze {self.freeze!r}: choose one of {', '.join(FREEZE_CHOICES)} "
                            f"(or --freeze-until MODULE, --freeze-first N, --freeze-regex)")
        if self.freeze == "head-only" and (self.freeze_until is not None or self.freeze_first is not None):
            problems.append("--freeze head-only already freezes the whole backbone; it conflicts with "
                            "--freeze-until/--freeze-first")
        if self.freeze_until is not None and self.freeze_first is not None:
            problems.append("--freeze-until and --freeze-first both say where freezing stops; give one")
        if self.freeze_first is not None and self.freeze_first < 1:
            problems.append(f"--freeze-first must be at least 1, got {self.freeze_first}")
        if self.unfreeze_at is not None and self.gradual:
            problems.append("--unfreeze-at and --gradual are two different schedules; give one")
        if self.unfreeze_at is not None and self.unfreeze_at < 1:
            problems.append(f"--unfreeze-at must be an epoch >= 1, got {self.unfreeze_at}")
        if self.backbone_lr_mult is not None and self.backbone_lr_mult < 0:
            problems.append(f"--backbone-lr-mult must be >= 0, got {self.backbone_lr_mult}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            problems.append(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        if self.bn is not None and self.bn not in BN_POLICIES:
            problems.append(f"--bn {self.bn!r}: choose one of {', '.join(BN_POLICIES)}")
        for flag, rx in (("--freeze-regex", self.freeze_regex), ("--train-regex", self.train_regex)):
            if rx is not None:
                try:
                    re.compile(rx)
                except re.error as e:
                    problems.append(f"{flag} {rx!r} is not a valid regular expression: {e}")
        return problems


@dataclass
class Stage:
    name: str
    params: list[str] = field(default_factory=list)
    numel: int = 0


def _under(name: str, path: str) -> bool:
    return name == path or name.startswith(path + ".")


def stages(model: "nn.Module", head_modules: list[str]) -> list[Stage]:
    """The backbone split into stages, input side first (see PRESETS_DOC for the rule)."""
    from torch import nn

    sizes = {n: p.numel() for n, p in model.named_parameters()}
    backbone = [n for n in sizes if not any(_under(n, h) for h in head_modules)]
    total = sum(sizes[n] for n in backbone) or 1
    mods = dict(model.named_modules())

    def items_of(path: str) -> list[str]:
        """Children (with backbone params) and direct params of module ``path`` as stage names."""
        prefix = path + "." if path else ""
        out: list[str] = []
        for n in backbone:
            if not n.startswith(prefix):
                continue
            rest = n[len(prefix):].split(".")
            item = prefix + rest[0]
            if item not in out:
                out.append(item)
        return out

    def numel(item: str) -> int:
        return sum(sizes[n] for n in backbone if _under(n, item))

    items = items_of("")
    for _ in range(12):
        expandable = [i for i in items if i in mods and sum(c in mods for c in items_of(i)) >= 2 and i.count(".") < 2]
        if not expandable:
            break
        big = max(expandable, key=numel)
        mod = mods[big]
        seq = isinstance(mod, (nn.Sequential, nn.ModuleList)) and len(items_of(big)) >= 3
        if not (len(items) < 4 or (numel(big) / total > 0.7 and seq)):
            break
        at = items.index(big)
        items[at:at + 1] = items_of(big)
    out = []
    for it in items:
        params = [n for n in backbone if _under(n, it)]
        out.append(Stage(it, params, sum(sizes[n] for n in params)))
    return out


def _with_params(model: "nn.Module") -> list[str]:
    """The model's top-level children that hold parameters, in order."""
    return [c for c, m in model.named_children() if next(m.parameters(), None) is not None]


def plan_freeze(model: "nn.Module", head_modules: list[str], opts: FreezeOptions) -> dict:
    """Groups, per-parameter assignment and BatchNorm list, as manifest-ready data."""
    o, fraction = opts.resolved()
    st = stages(model, head_modules)
    names = [n for n, _ in model.named_parameters()]
    head = [n for n in names if any(_under(n, h) for h in head_modules)]
    frozen = _frozen(model, names, set(head), st, o, fraction)
    # gradual: the frozen stages, top first, one more per epoch
    frozen_stages = [s.name for s in st if any(n in frozen for n in s.params)]
    gradual_at = {name: i + 1 for i, name in enumerate(reversed(frozen_stages))} if o.gradual else {}
    groups, params = _groups(model, head, st, frozen, o, gradual_at)
    schedule = "unfreeze_at" if o.unfreeze_at is not None else ("gradual" if o.gradual else "fixed")
    return {
        "options": o.to_json(),
        "schedule": {"kind": schedule, "unfreeze_at": o.unfreeze_at,
                     "order": [g for g in sorted(gradual_at, key=gradual_at.get)] if o.gradual else []},
        "stages": [s.name for s in st],
        "groups": list(groups.values()),
        "params": params,
        "bn": {"policy": o.bn, "modules": _bn_modules(model, head_modules, st, groups, params)},
    }


def _frozen(model: "nn.Module", names: list[str], head: set[str], st: list[Stage], o: FreezeOptions,
            fraction: float | None) -> set[str]:
    """The parameters frozen at epoch 0: the base policy, then the regexes (train last)."""
    frozen: set[str] = set()
    if o.freeze == "head-only":
        frozen = {n for n in names if n not in head}
    if fraction is not None:
        frozen = {n for s in st[:int(len(st) * fraction)] for n in s.params}
    if o.freeze_until is not None:
        frozen = _before(model, names, head, st, o.freeze_until)
    if o.freeze_first is not None:
        children = _with_params(model)  # a ReLU or a pooling layer has nothing to freeze
        if o.freeze_first > len(children):
            raise AdaptError(f"--freeze-first {o.freeze_first}: the model has only {len(children)} top-level "
                             f"children with parameters ({', '.join(children)})")
        first = children[:o.freeze_first]
        frozen = {n for n in names if n not in head and any(_under(n, c) for c in first)}
    if o.freeze_regex:
        frozen |= _matching(names, "--freeze-regex", o.freeze_regex)
    if o.train_regex:
        frozen -= _matching(names, "--train-regex", o.train_regex)
    if (o.unfreeze_at is not None or o.gradual) and not frozen:
        raise AdaptError("--unfreeze-at/--gradual need something frozen first; add --freeze head-only, "
                         "--freeze-until MODULE or a preset")
    return frozen


def _before(model: "nn.Module", names: list[str], head: set[str], st: list[Stage], until: str) -> set[str]:
    """``--freeze-until MODULE``: every backbone parameter before the module's first one."""
    target = until.strip(".")
    hit = next((i for i, n in enumerate(names) if _under(n, target)), None)
    if hit is None or target == "":
        valid = list(dict.fromkeys(_with_params(model) + [s.name for s in st]))
        raise AdaptError(f"--freeze-until {until!r} names no module with parameters; valid: {', '.join(valid)}")
    return {n for n in names[:hit] if n not in head}


def _matching(names: list[str], flag: str, regex: str) -> set[str]:
    rx = re.compile(regex)
    matched = {n for n in names if rx.search(n)}
    if not matched:
        raise AdaptError(f"{flag} {regex!r} matches no parameter (names look like {names[0]!r})")
    return matched


def _groups(model: "nn.Module", head: list[str], st: list[Stage], frozen: set[str], o: FreezeOptions,
            gradual_at: dict[str, int]) -> tuple[dict[str, dict], dict[str, dict]]:
    """The groups (a stage, split in two where only part of it is frozen) and, per parameter,
    its shape, state, group and lr multiplier."""
    stage_of = {n: s.name for s in st for n in s.params}
    stage_idx = {s.name: i for i, s in enumerate(st)}
    head_set = set(head)
    groups: dict[str, dict] = {}
    params: dict[str, dict] = {}
    for n, p in model.named_parameters():
        stage = "head" if n in head_set else stage_of[n]
        is_frozen = n in frozen
        mixed = any((m in frozen) != is_frozen for m in (head if stage == "head" else st[stage_idx[stage]].params))
        gname = f"{stage}:frozen" if (mixed and is_frozen) else stage
        if gname not in groups:
            unfreeze = None
            if is_frozen:
                unfreeze = o.unfreeze_at if o.unfreeze_at is not None else gradual_at.get(stage)
            index = len(st) if stage == "head" else stage_idx[stage]
            groups[gname] = {"name": gname, "stage": stage, "index": index, "trainable": not is_frozen,
                             "lr_mult": _lr_mult(o, index, len(st), stage == "head"), "unfreeze_at": unfreeze,
                             "params": 0, "numel": 0}
        g = groups[gname]
        g["params"] += 1
        g["numel"] += math.prod(int(d) for d in p.shape)
        params[n] = {"shape": list(p.shape), "trainable": not is_frozen, "group": gname, "lr_mult": g["lr_mult"]}
    return groups, params


def _lr_mult(o: FreezeOptions, index: int, n_stages: int, is_head: bool) -> float:
    """1 for the head; the backbone multiplier, decayed per stage below the top with --layer-decay."""
    if is_head:
        return 1.0
    mult = float(o.backbone_lr_mult)  # type: ignore[arg-type]
    if o.layer_decay is None:
        return mult
    return mult * o.layer_decay ** (n_stages - 1 - index)


def _bn_modules(model: "nn.Module", head_modules: list[str], st: list[Stage], groups: dict[str, dict],
                params: dict[str, dict]) -> dict[str, str]:
    """Backbone BatchNorm layer -> the group it follows (its weight's, else its stage's)."""
    from torch import nn

    out: dict[str, str] = {}
    for path, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and not any(_under(path, h) for h in head_modules):
            w = f"{path}.weight"
            if w in params:
                out[path] = params[w]["group"]
            else:  # no affine parameters: follows the stage that holds it
                stage = next((s.name for s in st if _under(path, s.name)), None)
                if stage is not None:
                    out[path] = next(g for g in groups.values() if g["stage"] == stage)["name"]
    return out


# ----------------------------------------------------------------------------- replaying

def _data(manifest: Any) -> Mapping[str, Any]:
    return manifest.data if hasattr(manifest, "data") else manifest


def group_trainable(group: Mapping[str, Any], epoch: int) -> bool:
    if group["trainable"]:
        return True
    at = group.get("unfreeze_at")
    return at is not None and epoch >= at


def _keep_eval(module: "nn.Module", args: Any) -> None:
    # runs before every forward: a frozen BatchNorm normalises with its running statistics and
    # never updates them, whatever model.train() set
    module.training = False


def _frozen_train(module: "nn.Module", mode: bool = True) -> "nn.Module":
    # a frozen BatchNorm's own ``train``: ``model.train()`` reaches it and leaves it in eval
    from torch import nn

    return nn.Module.train(module, False)


def apply_bn_policy(model: "nn.Module", manifest: Any, epoch: int = 0) -> list[str]:
    """Under the ``frozen`` policy, put the BatchNorm layers of the groups frozen at the start in
    eval mode for the whole run, and keep them there across later ``model.train()`` calls (their
    ``train`` is replaced, and a forward pre-hook resets the flag if it is set by hand): their
    running statistics stay the pretrained ones even after an unfreeze, while their affine
    weights train with their group. The other layers follow ``model.training``. Returns the
    frozen layers' paths. (``epoch`` is kept for callers that replay a schedule.)
    """
    data = _data(manifest)
    bn = data["bn"]
    groups = {g["name"]: g for g in data["groups"]}
    mods = dict(model.named_modules())
    frozen = []
    for path, gname in bn["modules"].items():
        mod = mods.get(path)
        if mod is None:
            continue
        # statistics kept for the whole run, also once the group's weights train: a few images per
        # batch would overwrite them (on the digits demo, a val loss 50% higher at lr ~0)
        is_frozen = bn["policy"] == "frozen" and not groups[gname]["trainable"]
        handle = mod.__dict__.get("_surgery_bn_hook")
        if is_frozen:
            if handle is None:
                mod.__dict__["_surgery_bn_hook"] = mod.register_forward_pre_hook(_keep_eval)
                mod.__dict__["train"] = types.MethodType(_frozen_train, mod)
            mod.training = False
            frozen.append(path)
        else:
            if handle is not None:
                handle.remove()
                del mod.__dict__["_surgery_bn_hook"]
                mod.__dict__.pop("train", None)
            mod.training = model.training
    return frozen


def apply_schedule(model: "nn.Module", manifest: Any, epoch: int = 0) -> None:
    """``requires_grad`` and BatchNorm modes as the manifest's schedule says for ``epoch``
    (0: before any unfreezing). Call at the start of each epoch, after ``model.train()``."""
    data = _data(manifest)
    groups = {g["name"]: g for g in data["groups"]}
    info = data["params"]
    for name, p in model.named_parameters():
        meta = info.get(name)
        if meta is not None:
            p.requires_grad_(group_trainable(groups[meta["group"]], epoch))
    apply_bn_policy(model, manifest, epoch)
