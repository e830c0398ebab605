"""FP4 weights: 4-bit e2m1 values packed two to a byte (the first in the low nibble), each block
of values sharing one scale. Stored as bytes, a cast leaves them packed and casts their scales,
so `--dtype` refuses them; `--dequantize` unpacks them and applies the scales. Two layouts exist:

- MXFP4 as OpenAI's gpt-oss stores it: ``x_blocks`` U8 ``[..., G, 16]`` (32 values per block)
  and ``x_scales`` U8 ``[..., G]``, one E8M0 exponent per block: value = fp4 * 2**(e - 127).
  Written as ``x``, as transformers' ``convert_moe_packed_tensors`` writes it: ``[..., G*32]``
  with dimensions 1 and 2 swapped when it has three or more (gpt-oss's experts, stored
  ``[experts, out, in]``, are ``[experts, in, out]`` in the unquantized model).
- blocks along the last dimension: ``x.weight`` (ModelOpt NVFP4) or ``x.weight_packed``
  (compressed-tensors) in U8, or any weight in F4 / float4_e2m1fn_x2, with ``x.weight_scale``
  ``[..., ceil(K/B)]``: F8_E4M3 for NVFP4 (B = 16), U8 / F8_E8M0 exponents for MXFP4 (B = 32).
  NVFP4's per-tensor scale multiplies the block scales (ModelOpt's ``x.weight_scale_2``) or
  divides them (compressed-tensors' ``x.weight_global_scale``). Written as ``x.weight``, ``[..., K]``.

Like fp8.py, finding them reads metadata only (no torch: inspect uses it too).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

from ..checkpoint import FLOAT_DTYPES
from ..errors import RuleError
from . import fp8

if TYPE_CHECKING:  # pragma: no cover
    import torch

# e2m1 codes 0..15: sign bit 3, then two exponent bits and one mantissa bit
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
VALUES_PER_ELEMENT = {"U8": 2, "F4_E2M1FN_X2": 2, "F4": 1}  # 4-bit values per stored element, last dim
BLOCK = {"nvfp4": 16, "mxfp4": 32}
MX_SCALE_DTYPES = ("U8", "F8_E8M0")
E8M0_BIAS = 127
VALUES_PER_STEP = 1 << 20  # values unpacked at a time: float32 temporaries of 4 MB each


@dataclass(frozen=True)
class Packed:
    """One packed FP4 weight and the scales beside it."""

    weight: str
    dtype: str
    shape: tuple[int, ...]
    scale: str
    scale_dtype: str
    scale_shape: tuple[int, ...]
    kind: str  # "mxfp4", "nvfp4"; "" when the scale's dtype is neither's
    layout: str  # "blocks" (gpt-oss's x_blocks [..., G, 16]) or "rows" (blocks along the last dimension)
    global_scale: str | None = None
    global_dtype: str = ""
    global_shape: tuple[int, ...] = ()
    divide: bool = False  # compressed-tensors' global scale divides the block scales; ModelOpt's multiplies

    @property
    def scales(self) -> tuple[str, ...]:
        """The tensors --dequantize applies and drops."""
        return (self.scale,) if self.global_scale is None else (self.scale, self.global_scale)

    @property
    def block(self) -> int:
        return BLOCK.get(self.kind, 0)

    @property
    def values(self) -> int:
        """Values per row once unpacked (K)."""
        if self.layout == "blocks":
            return math.prod(self.shape[-2:]) * 2
        return self.shape[-1] * VALUES_PER_ELEMENT[self.dtype] if self.shape else 0

    @property
    def out_shape(self) -> tuple[int, ...]:
        if self.layout == "rows":
            return (*self.shape[:-1], self.values)
        natural = (*self.shape[:-2], self.values)
        return (natural[0], natural[2], natural[1], *natural[3:]) if len(natural) >= 3 else natural

    def out_name(self, new: str) -> str:
        """``x_blocks`` -> ``x``, ``x.weight_packed`` -> ``x.weight``; other names as they are."""
        suffix = "_blocks" if self.layout == "blocks" else "_packed" if self.weight.endswith("_packed") else ""
        return new[: -len(suffix)] if suffix and new.endswith(suffix) else new

    def problem(self) -> str:
        """Why --dequantize cannot unpack this weight ('' when it can)."""
        if self.dtype == "F4" and self.shape and self.shape[-1] % 2:
            return f"{self.dtype}{list(self.shape)} has an odd number of values per row, which do not fill whole bytes"
        if not self.kind:
            return f"its scale is {self.scale_dtype}, not F8_E4M3 (NVFP4) or U8 / F8_E8M0 exponents (MXFP4)"
        if self.layout == "blocks":
            if len(self.shape) < 2 or self.shape[-1] != 16:
                return f"MXFP4 blocks are [..., blocks, 16] (32 values in 16 bytes), not {list(self.shape)}"
            expected = self.shape[:-1]
        else:
            if not self.shape:
                return "a packed weight has at least one dimension"
            expected = (*self.shape[:-1], -(-self.values // self.block))
        if tuple(self.scale_shape) != tuple(expected):
            return f"its scale is {list(self.scale_shape)}, not {list(expected)} (one per {self.block} values)"
        if self.global_scale is not None and (math.prod(self.global_shape) != 1 or self.global_dtype not in FLOAT_DTYPES):
            return f"the per-tensor scale {self.global_scale!r} is {self.global_dtype}{list(self.global_shape)}, not one float"
        return ""

    def describe(self) -> str:
        """'MXFP4 (U8, 32-value blocks)', for inspect."""
        return f"{self.kind.upper() or 'FP4'} ({self.dtype}, {self.block or '?'}-value blocks)"

    def to_json(self) -> dict:
        return {"tensor": self.weight, "dtype": self.dtype, "format": self.kind or None, "scale": self.scale,
                "scale_shape": list(self.scale_shape), "global_scale": self.global_scale, "block": self.block or None,
                "output": self.out_name(self.weight), "output_shape": list(self.out_shape),
                "problem": self.problem() or None}

    def dequantize(self, packed: "torch.Tensor", read: Callable[[str], "torch.Tensor"],
                   dtype: "torch.dtype") -> "torch.Tensor":
        """The weight unpacked with its scales applied, as ``dtype``; ``read`` gives a scale by name."""
        return dequantized(packed, read(self.scale), read(self.global_scale) if self.global_scale else None, self, dtype)


def find_packed(tensors: Mapping[str, tuple[str, tuple[int, ...]]]) -> dict[str, Packed]:
    """Every packed FP4 weight with a scale beside it: weight name -> `Packed`. ``tensors``: name ->
    (dtype, shape), the dtype as `checkpoint.DTYPES` names it."""
    out = {}
    for name, (dtype, shape) in tensors.items():
        if dtype not in VALUES_PER_ELEMENT:
            continue
        if name.endswith("_blocks") and dtype == "U8" and name[:-7] + "_scales" in tensors:
            scale = name[:-7] + "_scales"
            s_dtype, s_shape = tensors[scale]
            out[name] = Packed(name, dtype, tuple(shape), scale, s_dtype, tuple(s_shape),
                               "mxfp4" if s_dtype in MX_SCALE_DTYPES else "", "blocks")
            continue
        base = name[:-7] if name.endswith("_packed") else name
        if base + "_scale" not in tensors:
            continue
        s_dtype, s_shape = tensors[base + "_scale"]
        kind = "nvfp4" if s_dtype == "F8_E4M3" else "mxfp4" if s_dtype in MX_SCALE_DTYPES else ""
        if dtype == "U8" and not (kind == "nvfp4" or (kind and base != name)):
            continue  # bytes with a scale that says nothing of FP4: another quantization's
        glob = next(((base + s, s == "_global_scale") for s in ("_scale_2", "_global_scale") if base + s in tensors), None)
        g_dtype, g_shape = tensors[glob[0]] if glob else ("", ())
        out[name] = Packed(name, dtype, tuple(shape), base + "_scale", s_dtype, tuple(s_shape), kind, "rows",
                           glob[0] if glob else None, g_dtype, tuple(g_shape), bool(glob and glob[1]))
    return out


def packed_in(ckpt) -> dict[str, Packed]:
    """`find_packed` over a checkpoint's metadata."""
    return find_packed({n: (t.dtype, t.shape) for n, t in ckpt.tensors.items()})


def scaled_weights_in(ckpt) -> dict[str, "fp8.Scaling | Packed"]:
    """Scaled FP8 and packed FP4 weights, by weight name."""
    return {**fp8.scaled_in(ckpt), **packed_in(ckpt)}


def refuse_unsafe_fp4(src: str, packed: Mapping[str, Packed], kept: Mapping[str, "str | None"], kinds: set[str],
                      target: str | None) -> None:
    """fp8.refuse_unsafe's refusals for packed FP4 weights: it calls this one."""
    live = [p for p in packed.values() if kept.get(p.weight) is not None]
    if "dequantize" in kinds:
        bad = [f"{p.weight!r} {p.dtype}{list(p.shape)} with {p.scale!r} {p.scale_dtype}{list(p.scale_shape)}: "
               f"{p.problem()}" for p in live if p.problem()]
        if bad:
            names = [p.weight for p in live if p.problem()]
            drop = f"--drop '{_pattern(names)}'" if len(names) <= 4 else "--drop them"
            raise RuleError(f"{src}: cannot unpack {fp8._count(len(bad), 'FP4 tensor')}: {fp8._listed(bad)}. Nothing "
                            f"was written; fix the scales or {drop}")
        _refuse_clashes(src, live, kept)
        return
    if target is not None and live:
        pairs = [f"{p.weight!r} ({p.kind.upper() or 'FP4'} {p.dtype}, scale {p.scale!r})" for p in live]
        raise RuleError(f"{src}: --dtype {target} would leave {fp8._count(len(live), 'packed FP4 tensor')} as packed "
                        f"bytes, their scales unapplied: {fp8._listed(pairs, 3)}. Nothing was written; add --dequantize to unpack "
                        f"them and apply the scales (the weights written as {target}, the scales dropped)")


def _refuse_clashes(src: str, live: list[Packed], kept: Mapping[str, "str | None"]) -> None:
    """``x_blocks`` is written as ``x``: refused where another kept tensor is written as ``x``."""
    names = {n for n in kept.values() if n is not None}
    clashes = [f"{p.weight!r} -> {p.out_name(kept[p.weight])!r}" for p in live  # type: ignore[arg-type]
               if p.out_name(kept[p.weight]) != kept[p.weight] and p.out_name(kept[p.weight]) in names]  # type: ignore[arg-type]
    if clashes:
        raise RuleError(f"{src}: unpacked FP4 weights would take names other tensors keep: {fp8._listed(clashes)}. "
                        f"Nothing was written; rename or drop one of each pair first")


def dequantized(packed: "torch.Tensor", scale: "torch.Tensor", global_scale: "torch.Tensor | None", p: Packed,
                dtype: "torch.dtype") -> "torch.Tensor":
    """The unpacked values times their block's scale, as ``dtype``, a few rows at a time. MXFP4:
    ``torch.ldexp(value, e - 127)``, as transformers computes it; NVFP4: ``value * (block_scale *
    global)`` (ModelOpt) or ``value * (block_scale / global)`` (compressed-tensors), in float32."""
    import torch

    codes = packed.view(torch.uint8)
    if p.kind == "mxfp4":  # torch.ldexp(x, e) is x * 2.0**e: the same products, the power taken once per block
        exps = scale.view(torch.uint8).to(torch.int32) - E8M0_BIAS
        factors = torch.ldexp(torch.ones(exps.shape), exps)
    else:
        factors = scale.to(torch.float32)
    if global_scale is not None:
        g = global_scale.to(torch.float32).reshape(())
        factors = factors / g if p.divide else factors * g
    out = torch.empty(p.out_shape, dtype=dtype)
    if out.numel() == 0:  # no values: reshape(-1, 0) below could not infer its rows
        return out
    if p.layout == "rows":
        _fill(out.view(-1, p.values), codes.reshape(-1, codes.shape[-1]), factors.reshape(-1, factors.shape[-1]), p)
        return out
    if len(p.shape) < 4:  # the output has at most two dimensions: nothing to swap
        _fill(out.view(-1, p.values), codes.reshape(-1, p.values // 2), factors.reshape(-1, p.shape[-2]), p)
        return out
    slab = torch.empty((*p.shape[1:-2], p.values), dtype=dtype)
    for i in range(p.shape[0]):  # one expert at a time: memory is the output and one expert
        _fill(slab.view(-1, p.values), codes[i].reshape(-1, p.values // 2), factors[i].reshape(-1, p.shape[-2]), p)
        out[i].copy_(slab.transpose(0, 1))
    return out


def _fill(dst: "torch.Tensor", codes: "torch.Tensor", factors: "torch.Tensor", p: Packed) -> None:
    """``dst`` [rows, K] from ``codes`` [rows, K/2] bytes and ``factors`` [rows, blocks] (float32)."""
    import torch

    pairs = _pairs()
    k, blocks = dst.shape[1], factors.shape[1]
    ragged = blocks * p.block - k  # values the last block lacks
    step = max(1, VALUES_PER_STEP // max(k, 1))
    for r in range(0, dst.shape[0], step):
        rows = codes[r:r + step]
        values = pairs[rows.int()].reshape(rows.shape[0], k)
        if ragged:
            values = torch.nn.functional.pad(values, (0, ragged))
        scaled = values.view(rows.shape[0], blocks, p.block) * factors[r:r + step, :, None]
        dst[r:r + step] = scaled.view(rows.shape[0], -1)[:, :k]


@functools.lru_cache(maxsize=1)
def _pairs() -> "torch.Tensor":
    """Byte -> its two values, [256, 2] float32: the low nibble's first."""
    import torch

    lut = torch.tensor(E2M1, dtype=torch.float32)
    byte = torch.arange(256)
    return torch.stack([lut[byte & 0x0F], lut[byte >> 4]], dim=1)


def _pattern(names: list[str]) -> str:
    """A --drop pattern matching exactly ``names``."""
    return f"^({'|'.join(re.escape(n) for n in names)})$"
