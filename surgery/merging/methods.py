"""The merge methods as tensor math on one tensor of every input, in float64.

Each input is a ``Read``: a callable that returns a fresh float64 copy of that input's tensor, so a
method holds one input at a time beside its accumulators and never the whole stack of them.
Definitions follow the papers (cited per function) and mergekit's choices where the papers leave
one open (which elements TIES keeps on ties, the majority sign of a zero sum, SLERP's fallback).
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    import torch

Read = Callable[[], "torch.Tensor"]
DOT_THRESHOLD = 0.9995  # SLERP interpolates linearly above this |cosine|, as mergekit does
NORM_EPS = 1e-8  # a norm below this counts as 1 in SLERP (mergekit's eps)
L1_EPS = 1e-7  # DARE's l1 rescale leaves a delta alone when either norm is below this (mergekit's eps)


def linear(models: Sequence[Read], weights: Sequence[float], normalize: bool) -> "torch.Tensor":
    """``sum(w_i * theta_i)``, divided by ``sum(w_i)`` when ``normalize`` (Wortsman et al. 2022)."""
    acc = None
    for read, w in zip(models, weights):
        t = read().mul_(w)
        acc = t if acc is None else acc.add_(t)
        del t
    return acc.div_(sum(weights)) if normalize else acc


def task_arithmetic(base: Read, models: Sequence[Read], weights: Sequence[float], lam: float, normalize: bool,
                    sparsify: Callable[[int, "torch.Tensor"], "torch.Tensor"] | None = None) -> "torch.Tensor":
    """``base + lam * sum(w_i * tau_i)`` with ``tau_i = theta_i - base`` (Ilharco et al. 2023), the sum divided
    by ``sum(w_i)`` when ``normalize``; ``sparsify(i, tau_i)`` first drops elements of each (DARE)."""
    import torch

    b = base()
    acc = torch.zeros_like(b)
    for i, (read, w) in enumerate(zip(models, weights)):
        tau = read().sub_(b)
        if sparsify is not None:
            tau = sparsify(i, tau)
        acc.add_(tau, alpha=w)
        del tau
    total = sum(weights)
    if normalize and abs(total) >= 1e-8:  # mergekit leaves a (near) zero divisor at 1
        acc.div_(total)
    return b.add_(acc, alpha=lam)


def ties(base: Read, models: Sequence[Read], weights: Sequence[float], density: float, lam: float,
         normalize: bool) -> "torch.Tensor":
    """TIES-merging (Yadav et al. 2023): trim each ``tau_i = theta_i - base`` to its ``density`` largest
    magnitudes and weigh it by ``w_i``; elect each element's sign as the sign of their sum (+ where the
    sum is 0, as mergekit does); add to ``base`` ``lam`` times the sum of the values that agree with
    it, divided (``normalize``) by the sum of the weights of those that agree: with equal weights,
    the paper's disjoint mean.

    Two passes over the inputs (sign, then mean) keep memory at a few copies of one tensor."""
    import torch

    b = base()
    total = torch.zeros_like(b)
    for read, w in zip(models, weights):
        total.add_(trim(read().sub_(b), density), alpha=w)
    positive = total >= 0  # the elected sign, kept as bool: one float64 copy fewer in the second pass
    del total
    acc, den = torch.zeros_like(b), torch.zeros_like(b)
    for read, w in zip(models, weights):
        tau = trim(read().sub_(b), density).mul_(w)
        agree = torch.where(positive, tau > 0, tau < 0)  # a trimmed (zero) element agrees with no sign
        acc.add_(tau.mul_(agree))
        den.add_(agree, alpha=w)
        del tau, agree
    if normalize:
        den[den == 0] = 1
        acc.div_(den)
    return b.add_(acc, alpha=lam)


def trim(tau: "torch.Tensor", density: float) -> "torch.Tensor":
    """``tau`` with all but its ``max(1, int(density * n))`` largest magnitudes set to 0 (TIES's trim;
    mergekit's count). Equal magnitudes are kept in index order, so the result is reproducible."""
    import torch

    if density >= 1 or tau.numel() == 0:
        return tau
    k = max(1, int(density * tau.numel()))
    mag = tau.abs().reshape(-1)
    threshold = torch.topk(mag, k, sorted=False).values.min()
    keep = mag > threshold
    short = k - int(keep.sum())
    if short:  # the rest of the k among those equal to the threshold, first by index
        keep[torch.nonzero(mag == threshold).reshape(-1)[:short]] = True
    del mag
    return tau.mul_(keep.reshape(tau.shape))


def dare(tau: "torch.Tensor", density: float, rescale: str, generator: "torch.Generator") -> "torch.Tensor":
    """DARE (Yu et al. 2023): drop each element of ``tau`` with probability ``p = 1 - density`` and
    rescale what is kept: ``rescale="density"`` by ``1 / density`` (the paper), ``"l1"`` to the
    l1 norm ``tau`` had (mergekit's rescale), ``"none"`` not at all."""

    before = tau.abs().sum() if rescale == "l1" else None
    tau.mul_(keep_mask(tau.shape, density, generator))
    if rescale == "density":
        return tau.div_(density)
    if rescale == "l1":
        after = tau.abs().sum()
        if before >= L1_EPS and after >= L1_EPS:
            tau.mul_(before / after)
    return tau


def keep_mask(shape: Sequence[int], density: float, generator: "torch.Generator") -> "torch.Tensor":
    """Bernoulli(``density``) elements: ``U[0, 1) < density``, drawn from ``generator``."""
    import torch

    return torch.rand(tuple(shape), generator=generator, dtype=torch.float64) < density


def dare_generator(seed: int, model: int, name: str) -> "torch.Generator":
    """The generator of one model's mask of one tensor: fixed by (seed, model, name), whatever order
    or process the tensors are merged in, so a merge with one seed is reproducible."""
    import torch

    digest = hashlib.sha256(f"{seed}\0{model}\0{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def slerp(v0: Read, v1: Read, t: float) -> "torch.Tensor":
    """Spherical interpolation of the flattened tensors (Shoemake 1985), as mergekit computes it:
    with ``cos(theta)`` the cosine between them, ``sin((1-t)theta)/sin(theta) * v0 +
    sin(t theta)/sin(theta) * v1``; ``(1-t) v0 + t v1`` where ``|cos(theta)| > 0.9995`` (near
    colinear, where the division is ill-conditioned)."""
    import torch

    a, b = v0(), v1()
    if a.numel() == 0:
        return a
    na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    na, nb = na if na > NORM_EPS else 1.0, nb if nb > NORM_EPS else 1.0
    dot = min(1.0, max(-1.0, float(torch.dot(a.reshape(-1), b.reshape(-1))) / (na * nb)))
    if abs(dot) > DOT_THRESHOLD:
        return a.mul_(1 - t).add_(b, alpha=t)
    theta = math.acos(dot)
    s = math.sin(theta)
    return a.mul_(math.sin((1 - t) * theta) / s).add_(b, alpha=math.sin(t * theta) / s)
