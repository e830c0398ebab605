"""Optimizer parameter groups from a manifest: one per group, each at ``lr * lr_mult``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ManifestError
from .manifest import as_manifest

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


def param_groups(model: "nn.Module", manifest: Any, lr: float, weight_decay: float | None = None) -> list[dict]:
    """Optimizer groups, one per manifest group, ``lr * lr_mult`` each. Frozen groups are
    included (their parameters get no grad, so optimizers skip them) so that unfreezing later
    needs no new groups: adding groups mid-run breaks LR schedulers.

    >>> opt = torch.optim.AdamW(param_groups(model, "adapted/", lr=1e-3))  # doctest: +SKIP
    """
    m = as_manifest(manifest)
    by_group: dict[str, list] = {g["name"]: [] for g in m.groups}
    unknown = []
    for n, p in model.named_parameters():
        meta = m.params.get(n)
        if meta is None:
            unknown.append(n)
        else:
            by_group[meta["group"]].append(p)
    if unknown:
        raise ManifestError(f"parameters not in the manifest: {', '.join(unknown[:5])}; is this the adapted model?")
    out = []
    for g in m.groups:
        if not by_group[g["name"]]:
            continue
        d = {"params": by_group[g["name"]], "lr": lr * g["lr_mult"], "name": g["name"], "lr_mult": g["lr_mult"]}
        if weight_decay is not None:
            d["weight_decay"] = weight_decay
        out.append(d)
    return out
