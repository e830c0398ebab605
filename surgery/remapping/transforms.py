"""Pure ``dict[str, Tensor] -> dict[str, Tensor]`` functions: the ops applied to a state dict in
memory. Tensors that were shared stay shared. torch is imported only to cast."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from ..checkpoint import torch_dtype
from .fp8 import DEFAULT_BLOCK, DEQUANTIZED_DTYPE, dequantize_state_dict, refuse_unsafe, scaled_in_memory
from .group_ops import Made, apply as apply_group, plan_group
from .ops import OP_KINDS, Op, parse_dtype
from .plan import plan_names
from .tensor_ops import apply_steps, plan_steps


def apply_rules(sd: Mapping[str, Any], ops: list[Op]) -> dict[str, Any]:
    """Names by ``ops``, then the conversions they ask for: densify, dequantize, the last cast,
    the tensor ops (transpose, permute, reshape, rope_permute) on the tensors they matched, and
    what split, concat, stack and unstack write."""
    groups = any(OP_KINDS[o.kind].group for o in ops)
    plan = plan_names(sd.keys(), ops, {k: tuple(t.shape) for k, t in sd.items()} if groups else None)
    out = {new: sd[old] for old, new in plan.kept.items()}
    out.update(_made(sd, plan.made))
    if plan.tensor_ops:
        out = _tensor_ops(out, {plan.mapping[old]: o for old, o in plan.tensor_ops.items() if plan.mapping[old]})
    kinds = {o.kind for o in ops}
    if "densify" in kinds:
        out = densify(out)
    casts = [o.arg for o in ops if o.kind == "dtype"]
    if "dequantize" in kinds:  # FP8 scales applied straight into the cast's dtype, not through bf16
        out = dequantize(out, casts[-1] if casts else DEQUANTIZED_DTYPE)
    return cast(out, casts[-1]) if casts else out


def _made(sd: Mapping[str, Any], made: "list[tuple[str | None, Made]]") -> dict[str, Any]:
    """What split, concat, stack and unstack write, each a tensor of its own (a piece is copied
    out of its source, so that the result saves as separate tensors)."""
    out = {}
    for name, m in made:
        if name is None:
            continue
        g = plan_group(m, {s: tuple(sd[s].shape) for s in m.sources}, {s: str(sd[s].dtype) for s in m.sources})
        t = apply_steps(apply_group(g, [sd[s] for s in m.sources]), plan_steps(name, g.out_shape, list(m.after)))
        out[name] = t.contiguous().clone() if g.kind in ("split", "unstack") else t.contiguous()
    return out


def _tensor_ops(sd: dict[str, Any], ops: dict[str, list[Op]]) -> dict[str, Any]:
    """Each tensor with its ops applied (shapes checked first); tied tensors given the same ops stay tied."""
    done: dict[tuple, Any] = {}
    out = {}
    for k, t in sd.items():
        steps = plan_steps(k, tuple(t.shape), ops.get(k, [])) if k in ops else ()
        key = (id(t), steps)
        if key not in done:
            done[key] = apply_steps(t, steps).contiguous() if steps else t
        out[k] = done[key]
    return out


def strip_prefix(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Remove ``prefix`` from every key that has it: ``strip_prefix(sd, "module.")``."""
    return apply_rules(sd, [Op("strip_prefix", prefix)])


def add_prefix(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return apply_rules(sd, [Op("add_prefix", prefix)])


def rename(sd: Mapping[str, Any], pattern: str, replacement: str) -> dict[str, Any]:
    """``re.sub(pattern, replacement, key)`` on every key: ``rename(sd, r"^fc\\.", "head.")``."""
    return apply_rules(sd, [Op("rename", pattern, replacement)])


def drop(sd: Mapping[str, Any], pattern: str) -> dict[str, Any]:
    return apply_rules(sd, [Op("drop", pattern)])


def keep(sd: Mapping[str, Any], pattern: str) -> dict[str, Any]:
    return apply_rules(sd, [Op("keep", pattern)])


def auto_strip(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Peel ``module.`` / ``_orig_mod.`` (in any order, repeatedly) where every key has them."""
    return apply_rules(sd, [Op("auto")])


def cast(sd: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    """Cast floating tensors to ``dtype`` ('fp16', 'bf16', 'fp32'); other tensors unchanged. FP8
    weights with a scale beside them are refused: `dequantize` applies the scales."""
    target = torch_dtype(parse_dtype(dtype))
    refuse_unsafe("state dict", scaled_in_memory(sd), {k: k for k in sd}, {"dtype"}, parse_dtype(dtype))
    return _convert_each(sd, lambda t: t.to(target) if t.is_floating_point() else t)


def densify(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Sparse tensors (COO, CSR, CSC, BSR, BSC) as dense ones; other tensors unchanged."""
    import torch

    return _convert_each(sd, lambda t: t.to_dense() if t.layout != torch.strided else t)


def dequantize(sd: Mapping[str, Any], dtype: str = DEQUANTIZED_DTYPE,
               block_size: tuple[int, int] = DEFAULT_BLOCK) -> dict[str, Any]:
    """Quantized tensors as float32 (``t.dequantize()``); FP8 weights with a scale beside them
    (``x.weight_scale_inv``, ``x.weight_scale``) as ``dtype`` with the scale applied
    (``block_size`` blocks, or one scale per tensor or per row), the scales dropped; other
    tensors unchanged."""
    sd = dequantize_state_dict(sd, parse_dtype(dtype), tuple(block_size))  # type: ignore[arg-type]
    return _convert_each(sd, lambda t: t.dequantize() if t.is_quantized else t)


def _convert_each(sd: Mapping[str, Any], fn: Callable[[Any], Any]) -> dict[str, Any]:
    """``fn`` over every tensor, once per shared tensor, so tied names stay tied."""
    done: dict[int, Any] = {}
    out = {}
    for k, t in sd.items():
        if id(t) not in done:
            done[id(t)] = fn(t)
        out[k] = done[id(t)]
    return out
