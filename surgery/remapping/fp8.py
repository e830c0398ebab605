"""FP8 weights stored with a scale tensor beside them, as DeepSeek, Hugging Face (fine-grained
FP8), vLLM and compressed-tensors write them: ``x.weight`` in F8_E4M3 and ``x.weight_scale_inv``
(or ``x.weight_scale``) in float32. The weight's values mean ``fp8 * scale``; cast alone, they
are silently wrong. This module finds the pairs from metadata (no torch: inspect uses it too),
says which refusals apply, and applies the scales one weight at a time.

A scale is one of three layouts, told apart by its shape:
- block: ``[..., ceil(rows/B0), ceil(cols/B1)]``, one value per B0 x B1 block (128 x 128 unless
  ``quantization_config.weight_block_size`` in a ``config.json`` beside the weights says otherwise);
  the last blocks of a row or column are ragged when B does not divide the shape;
- tensor: one value (shape ``[]``, ``[1]``, ``[1, 1]``);
- channel: one value per row, ``[rows]`` or ``[rows, 1]``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

from ..checkpoint import FLOAT_DTYPES
from ..errors import RuleError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .fp4 import Packed

SCALED_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"})  # packed FP4: fp4.py
# `<name>_scale_inv` (DeepSeek, transformers), `<name>_scale` (vLLM, compressed-tensors); for
# `<prefix>.weight` these are `<prefix>.weight_scale_inv` and `<prefix>.weight_scale`
SCALE_SUFFIXES = ("_scale_inv", "_scale")
DEFAULT_BLOCK = (128, 128)
DEQUANTIZED_DTYPE = "BF16"  # as DeepSeek's fp8_cast_bf16.py writes them, unless --dtype says otherwise
ROWS_PER_STEP = 128  # rows dequantized at a time: float32 temporaries stay a sliver of the weight


@dataclass(frozen=True)
class Scaling:
    """One FP8 weight and the scale tensor beside it."""

    weight: str
    dtype: str
    shape: tuple[int, ...]
    scale: str
    scale_shape: tuple[int, ...]
    layout: str  # "block", "tensor", "channel"; "" when the scale's shape fits none of them
    block: tuple[int, int] = DEFAULT_BLOCK

    @property
    def block_shape(self) -> tuple[int, ...]:
        """The shape a block scale of this weight has."""
        return block_scale_shape(self.shape, self.block)

    def describe(self) -> str:
        """'block scales 128x128', 'a per-tensor scale', 'per-channel scales'."""
        return {"block": f"block scales {self.block[0]}x{self.block[1]}", "tensor": "a per-tensor scale",
                "channel": "per-channel scales"}.get(self.layout, "a scale whose shape fits no layout")

    def misfit(self) -> str:
        """Why the scale's shape fits no layout, for the refusal."""
        expected = [f"{list(self.block_shape)} ({self.block[0]}x{self.block[1]} blocks)"] if len(self.shape) >= 2 else []
        expected.append("one value (per tensor)")
        if len(self.shape) == 2:
            expected.append(f"[{self.shape[0]}] or [{self.shape[0]}, 1] (per row)")
        return f"a scale for {list(self.shape)} is {', '.join(expected)}"

    @property
    def scales(self) -> tuple[str, ...]:
        """The tensors --dequantize applies and drops (fp4.Packed has the same interface)."""
        return (self.scale,)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.shape

    def out_name(self, new: str) -> str:
        return new

    def dequantize(self, weight: "torch.Tensor", read: Callable[[str], "torch.Tensor"],
                   dtype: "torch.dtype") -> "torch.Tensor":
        """The weight with its scale applied, as ``dtype``; ``read`` gives the scale by name."""
        return dequantized(weight, read(self.scale), self, dtype)

    def to_json(self) -> dict:
        return {"tensor": self.weight, "dtype": self.dtype, "scale": self.scale, "scale_shape": list(self.scale_shape),
                "layout": self.layout or None, **({"block": list(self.block)} if self.layout == "block" else {})}


def block_scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    return (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))


def layout(shape: tuple[int, ...], scale_shape: tuple[int, ...], scale_dtype: str, block: tuple[int, int]) -> str:
    """Which layout a scale of ``scale_shape`` has for a weight of ``shape`` ('' for none)."""
    if scale_dtype not in FLOAT_DTYPES:
        return ""
    if math.prod(scale_shape) == 1 and len(scale_shape) <= max(len(shape), 1):
        return "tensor"
    if len(shape) >= 2 and tuple(scale_shape) == block_scale_shape(shape, block):
        return "block"
    if len(shape) == 2 and tuple(scale_shape) in ((shape[0],), (shape[0], 1)):
        return "channel"
    return ""


def find_scaled(tensors: Mapping[str, tuple[str, tuple[int, ...]]],
                block: tuple[int, int] = DEFAULT_BLOCK) -> dict[str, Scaling]:
    """Every FP8/FP4 weight with a scale beside it: weight name -> `Scaling`. ``tensors``: name ->
    (dtype, shape), the dtype as `checkpoint.DTYPES` names it."""
    out = {}
    for name, (dtype, shape) in tensors.items():
        if dtype not in SCALED_DTYPES:
            continue
        scale = next((name + s for s in SCALE_SUFFIXES if name + s in tensors), None)
        if scale is not None:
            s_dtype, s_shape = tensors[scale]
            out[name] = Scaling(name, dtype, tuple(shape), scale, tuple(s_shape),
                                layout(tuple(shape), tuple(s_shape), s_dtype, block), block)
    return out


def scaled_in(ckpt) -> dict[str, Scaling]:
    """`find_scaled` over a checkpoint's metadata, the block size read from a config.json beside it
    when there are pairs to read it for."""
    meta = {n: (t.dtype, t.shape) for n, t in ckpt.tensors.items()}
    found = find_scaled(meta)
    if not found:
        return found
    block = block_size_beside(Path(ckpt.path))
    return found if block == DEFAULT_BLOCK else find_scaled(meta, block)


def block_size_beside(path: Path) -> tuple[int, int]:
    """``quantization_config.weight_block_size`` of the config.json in the weights' folder, else 128x128."""
    config = (path if path.is_dir() else path.parent) / "config.json"
    if not config.is_file():
        return DEFAULT_BLOCK
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RuleError(f"{config}: cannot read it for quantization_config.weight_block_size: "
                        f"{' '.join(str(e).split())[:200]}") from None
    qc = data.get("quantization_config") if isinstance(data, dict) else None
    size = qc.get("weight_block_size") if isinstance(qc, dict) else None
    if size is None:
        return DEFAULT_BLOCK
    if (not isinstance(size, list) or len(size) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n < 1 << 31 for n in size)):
        raise RuleError(f"{config}: quantization_config.weight_block_size is {str(size)[:60]}, not two positive "
                        f"integers such as [128, 128]")
    return size[0], size[1]


def _count(n: int, what: str = "tensor") -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def _listed(items: list[str], limit: int = 4) -> str:
    return "; ".join(items[:limit]) + (f"; ... {len(items) - limit} more" if len(items) > limit else "")


def refuse_unsafe(src: str, scaled: Mapping[str, "Scaling | Packed"], kept: Mapping[str, "str | None"],
                  kinds: set[str], target: str | None) -> None:
    """Refuse, before anything is written, a cast that would upcast FP8 weights without their scales
    (and cast the scales) or leave FP4 weights packed, and a --dequantize whose scales do not fit
    their weights: every refusal that applies, in one error."""
    from .fp4 import Packed, refuse_unsafe_fp4

    errors = []
    for check, part in ((_refuse_fp8, {k: s for k, s in scaled.items() if not isinstance(s, Packed)}),
                        (refuse_unsafe_fp4, {k: s for k, s in scaled.items() if isinstance(s, Packed)})):
        try:
            check(src, part, kept, kinds, target)  # type: ignore[operator]
        except RuleError as e:
            errors.append(str(e))
    if errors:
        raise RuleError(" ".join(errors))


def _refuse_fp8(src: str, scaled: Mapping[str, Scaling], kept: Mapping[str, "str | None"], kinds: set[str],
                target: str | None) -> None:
    live = [s for s in scaled.values() if kept.get(s.weight) is not None]
    if "dequantize" in kinds:
        unfit = [s for s in live if not s.layout]
        if unfit:
            bad = [f"{s.weight!r} {s.dtype}{list(s.shape)} with {s.scale!r} {list(s.scale_shape)}: {s.misfit()}"
                   for s in unfit]
            drop = (f"--drop '^({'|'.join(re.escape(s.weight) for s in unfit)})$'" if len(unfit) <= 4
                    else "--drop them")
            raise RuleError(f"{src}: cannot apply the scales of {_count(len(bad))}: {_listed(bad)}. Nothing was "
                            f"written; fix the scales (or the block size in config.json) or {drop}")
        return
    if target is not None and live:
        pairs = [f"{s.weight!r} ({s.dtype}, scale {s.scale!r})" for s in live]
        what = _count(len(live), "scaled FP8 tensor")
        raise RuleError(f"{src}: --dtype {target} would cast {what} without applying their scales, and cast the scales: "
                        f"{_listed(pairs, 3)}. Nothing was written; add --dequantize to "
                        f"apply the scales (the weights written as {target}, the scales dropped)")


def dequantized(weight: "torch.Tensor", scale: "torch.Tensor", s: Scaling, dtype: "torch.dtype") -> "torch.Tensor":
    """``weight.to(float32) * scale`` (the scale expanded over its block, row or the whole tensor),
    cast to ``dtype``; computed a few rows at a time into the output."""
    import torch

    scale = scale.to(torch.float32)
    out = torch.empty(weight.shape, dtype=dtype)
    if s.layout == "tensor":
        flat, dst, value = weight.reshape(-1), out.view(-1), scale.reshape(())
        step = ROWS_PER_STEP * 4096
        for i in range(0, flat.numel(), step):
            dst[i:i + step] = (flat[i:i + step].to(torch.float32) * value).to(dtype)
        return out
    if s.layout == "channel":
        per_row = scale.reshape(-1, 1)
        for rows in _steps(weight.shape[0], ROWS_PER_STEP):
            out[rows] = (weight[rows].to(torch.float32) * per_row[rows]).to(dtype)
        return out
    (b0, b1), cols = s.block, weight.shape[-1]
    w3, o3 = weight.reshape(-1, *weight.shape[-2:]), out.view(-1, *weight.shape[-2:])
    s3 = scale.reshape(-1, *scale.shape[-2:])
    for layer in range(w3.shape[0]):
        for i, rows in enumerate(_steps(w3.shape[1], b0)):
            row_scale = s3[layer, i].repeat_interleave(b1)[:cols]  # one block row, ragged last block cropped
            o3[layer, rows] = (w3[layer, rows].to(torch.float32) * row_scale).to(dtype)
    return out


def _steps(n: int, step: int) -> Iterator[slice]:
    return (slice(i, min(i + step, n)) for i in range(0, n, step))


def dequantize_state_dict(sd: Mapping[str, "torch.Tensor"], dtype: str = DEQUANTIZED_DTYPE,
                          block: tuple[int, int] = DEFAULT_BLOCK) -> dict[str, "torch.Tensor"]:
    """A state dict's scaled FP8 and packed FP4 weights with their scales applied (as ``dtype``), the
    scales dropped; an unpacked FP4 weight takes its name without ``_blocks`` / ``_packed``."""
    from ..checkpoint import torch_dtype

    scaled = scaled_in_memory(sd, block)
    refuse_unsafe("state dict", scaled, {k: k for k in sd}, {"dequantize"}, None)
    scales = {n for s in scaled.values() for n in s.scales}
    target = torch_dtype(dtype)
    return {scaled[k].out_name(k) if k in scaled else k: scaled[k].dequantize(t, sd.__getitem__, target)
            if k in scaled else t for k, t in sd.items() if k not in scales}


def scaled_in_memory(sd: Mapping[str, "torch.Tensor"],
                     block: tuple[int, int] = DEFAULT_BLOCK) -> dict[str, "Scaling | Packed"]:
    """`find_scaled` and `fp4.find_packed` over tensors in memory."""
    from ..checkpoint import canonical_from_torch
    from .fp4 import find_packed

    meta = {k: (canonical_from_torch(str(t.dtype)) or "", tuple(t.shape)) for k, t in sd.items()
            if hasattr(t, "dtype") and hasattr(t, "shape")}
    return {**find_scaled(meta, block), **find_packed(meta)}
