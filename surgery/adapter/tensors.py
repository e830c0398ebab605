"""Tensor surgery: pretrained weights reshaped to fit a model that differs from the one they
were trained in. Position embeddings are resized to another patch grid, and a first convolution
is adapted to another number of input channels (timm's ``adapt_input_conv``). The shape tests
are pure functions of shapes, so the match decides what to load before any tensor is read."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

Shape = tuple[int, ...]
POS_EMBED = re.compile(r"(^|\.)(pos_embed|pos_embedding|position_embeddings?|absolute_pos_embed)$")
_MAX_PREFIX_TOKENS = 8  # class and distillation tokens, registers


def grid_prefix(a: int, b: int) -> int | None:
    """The number of prefix tokens p that leaves two square grids of ``a - p`` and ``b - p``."""
    for p in range(0, _MAX_PREFIX_TOKENS + 1):
        if a - p > 0 and b - p > 0 and math.isqrt(a - p) ** 2 == a - p and math.isqrt(b - p) ** 2 == b - p:
            return p
    return None


def pos_embed_fits(name: str, ckpt: Shape, model: Shape) -> bool:
    """Whether ``name`` is a position embedding whose checkpoint grid can be resized to the model's."""
    return (bool(POS_EMBED.search(name)) and len(ckpt) == 3 and len(model) == 3 and ckpt[0] == model[0]
            and ckpt[2] == model[2] and grid_prefix(ckpt[1], model[1]) is not None)


def input_conv_fits(ckpt: Shape, model: Shape) -> bool:
    """Whether two conv weights differ only in their input channels (dim 1)."""
    return ckpt[:1] + ckpt[2:] == model[:1] + model[2:]


def interpolate_pos_embed(t: "torch.Tensor", shape: tuple[int, ...]) -> "torch.Tensor | None":
    """(1, P + g*g, D) -> (1, P + G*G, D): prefix tokens kept, the grid resized bicubically.
    None when the shapes are not two square grids with the same prefix and width."""
    import torch

    if t.ndim != 3 or len(shape) != 3 or t.shape[0] != shape[0] or t.shape[2] != shape[2]:
        return None
    p = grid_prefix(t.shape[1], shape[1])
    if p is None:
        return None
    g, G = math.isqrt(t.shape[1] - p), math.isqrt(shape[1] - p)
    prefix, grid = t[:, :p], t[:, p:]
    d = t.shape[2]
    grid = grid.float().reshape(t.shape[0], g, g, d).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(G, G), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(t.shape[0], G * G, d).to(t.dtype)
    return torch.cat([prefix, grid], 1)


def adapt_input_conv(weight: "torch.Tensor", in_chans: int) -> "torch.Tensor":
    """(O, I, kh, kw) pretrained weights for ``in_chans`` inputs: 1 channel sums over the input
    channels; more repeats them and rescales by I / in_chans so activations keep their scale."""
    dt = weight.dtype
    w = weight.float()
    i = w.shape[1]
    if in_chans == i:
        return weight
    if in_chans == 1:
        out = w.sum(dim=1, keepdim=True)
    else:
        reps = math.ceil(in_chans / i)
        out = w.repeat(1, reps, 1, 1)[:, :in_chans] * (i / in_chans)
    return out.to(dt)
