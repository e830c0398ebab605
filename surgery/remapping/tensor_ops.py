"""One-to-one tensor ops: transpose, permute, reshape and the RoPE permute of q/k projections.

Each op's parameters are kept as text (``"0,1"``, ``"32,hf-to-meta"``) so that an `Op` stays
a plain frozen record; `params` parses them. The planner learns each output shape from
`out_shape` without reading data (the refusals are worded there), the source function applies
`apply` to one tensor at a time, and `inverse` gives the step that undoes one, for
``--verify-roundtrip``.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING, Any

from ..errors import RuleError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .ops import Op

TENSOR_KINDS = ("transpose", "permute", "reshape", "rope_permute")
DIRECTIONS = ("hf-to-meta", "meta-to-hf")
Params = tuple  # ints, and for rope_permute (heads, direction)
MAX_DIMS = 64


def _ints(kind: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError:
        raise RuleError(f"{kind} takes comma-separated integers, not {text!r}") from None


def parse_params(kind: str, text: str) -> Params:
    """The parameters of a tensor op from their text; RuleError when they cannot be right for any tensor."""
    if kind == "rope_permute":
        heads, _, direction = text.partition(",")
        if not heads.strip().isdigit() or int(heads) <= 0 or direction.strip() not in DIRECTIONS:
            raise RuleError(f"rope_permute takes HEADS,DIRECTION (a positive head count, then hf-to-meta or "
                            f"meta-to-hf), not {text!r}")
        return int(heads), direction.strip()
    if text.count(",") >= MAX_DIMS:  # before parsing: 'reshape 1,1,1,...' a million times over
        raise RuleError(f"{kind} takes at most {MAX_DIMS} dims (torch's limit), not {text.count(',') + 1}")
    dims = _ints(kind, text)
    if kind == "transpose" and len(dims) != 2:
        raise RuleError(f"transpose takes two dims, e.g. 0,1, not {text!r}")
    if kind == "permute" and sorted(d % len(dims) for d in dims) != list(range(len(dims))):
        raise RuleError(f"permute takes an order of all the dims, each once (e.g. 1,0,2), not {text!r}")
    if kind == "reshape" and (dims.count(-1) > 1 or any(d < -1 for d in dims)):
        raise RuleError(f"reshape takes sizes of at least 0 with at most one -1, not {text!r}")
    if kind == "reshape" and prod(max(d, 1) for d in dims) >= 2**63:  # torch's strides are int64, even with a 0
        raise RuleError(f"reshape to {text!r} has sizes whose product torch cannot index (at least 2**63)")
    return dims


def canonical(kind: str, text: str) -> str:
    """The one text of the parameters (``'0, 1'`` -> ``'0,1'``), checked."""
    return ",".join(str(p) for p in parse_params(kind, text))


def _dim(d: int, ndim: int, what: str) -> int:
    if not -ndim <= d < ndim:
        raise RuleError(f"dim {d} is out of range for {what}")
    return d % ndim


def out_shape(kind: str, params: Params, shape: tuple[int, ...], what: str) -> tuple[int, ...]:
    """The shape a tensor of ``shape`` has after the op; ``what`` names it in the one-line refusal."""
    shape = tuple(shape)
    what = f"{what} of shape {list(shape)}"
    if kind == "transpose":
        a, b = (_dim(d, len(shape), what) for d in params)
        out = list(shape)
        out[a], out[b] = out[b], out[a]
        return tuple(out)
    if kind == "permute":
        if len(params) != len(shape):
            raise RuleError(f"permute order {','.join(map(str, params))} has {len(params)} dims, {what} {len(shape)}")
        return tuple(shape[d % len(shape)] for d in params)
    if kind == "reshape":
        return _reshaped(params, shape, what)
    heads, _ = params
    if not shape or shape[0] % heads or (shape[0] // heads) % 2:
        raise RuleError(f"rope_permute with {heads} heads needs rows divisible by the heads into an even head "
                        f"size; {what} has {shape[0] if shape else 'no'} rows")
    return shape


def _reshaped(sizes: Params, shape: tuple[int, ...], what: str) -> tuple[int, ...]:
    total, known = prod(shape), prod(d for d in sizes if d != -1)
    if -1 not in sizes and total == known:
        return tuple(sizes)
    if -1 in sizes and known and total % known == 0:
        return tuple(total // known if d == -1 else d for d in sizes)
    raise RuleError(f"reshape to {list(sizes)} does not fit {what} ({total} elements)")


def apply(kind: str, params: Params, t: "torch.Tensor") -> "torch.Tensor":
    """The op on one tensor (a view where torch gives one; the writer makes it contiguous)."""
    if kind == "transpose":
        return t.transpose(*params)
    if kind == "permute":
        return t.permute(*params)
    if kind == "reshape":
        return t.reshape(params)
    heads, direction = params
    rows, rest = t.shape[0], tuple(t.shape[1:])
    half = rows // heads // 2
    # torchtune's convert_weights._permute (and transformers' convert_llama_weights_to_hf.permute):
    # hf -> meta is view(h, 2, hd/2, dim).transpose(1, 2), meta -> hf view(h, hd/2, 2, dim).transpose(1, 2)
    pair = (2, half) if direction == "hf-to-meta" else (half, 2)
    return t.reshape(heads, *pair, *rest).transpose(1, 2).reshape(rows, *rest)


def inverse(kind: str, params: Params, in_shape: tuple[int, ...]) -> tuple[str, Params]:
    """The op that undoes this one on its output; ``in_shape`` is the shape it was given."""
    if kind == "transpose":
        return kind, params
    if kind == "permute":
        n = len(params)
        order = [d % n for d in params]
        return kind, tuple(order.index(i) for i in range(n))
    if kind == "reshape":
        return kind, tuple(in_shape)
    heads, direction = params
    return kind, (heads, DIRECTIONS[1 - DIRECTIONS.index(direction)])


@dataclass(frozen=True)
class Step:
    """One tensor op as planned for one tensor: what it gets and what it gives."""

    kind: str
    params: Params
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def inverse(self) -> "Step":
        kind, params = inverse(self.kind, self.params, self.in_shape)
        return Step(kind, params, self.out_shape, self.in_shape)


def plan_steps(name: str, shape: tuple[int, ...], ops: "list[Op]") -> tuple[Step, ...]:
    """The steps ``ops`` take on tensor ``name`` of ``shape``, each shape known before any byte is read."""
    steps = []
    for op in ops:
        params = parse_params(op.kind, op.repl)
        try:
            new = out_shape(op.kind, params, shape, repr(name))
        except RuleError as e:
            raise RuleError(f"{op}: {e}; nothing was written") from None
        steps.append(Step(op.kind, params, tuple(shape), new))
        shape = new
    return tuple(steps)


def apply_steps(t: "torch.Tensor", steps: "tuple[Step, ...]") -> "torch.Tensor":
    for s in steps:
        t = apply(s.kind, s.params, t)
    return t


def undo_steps(t: "torch.Tensor", steps: "tuple[Step, ...]") -> "torch.Tensor":
    """The tensor before ``steps``, from the tensor after them: the inverse steps in reverse order."""
    return apply_steps(t, tuple(s.inverse() for s in reversed(steps)))


# ---------------------------------------------------------------- the rules file's forms

JSON_FIELDS = {"transpose": "dims", "permute": "dims", "reshape": "shape"}


def from_json(kind: str, value: Any) -> tuple[str, str] | None:
    """``{match: REGEX, dims|shape: [...]}`` / ``{match, heads, direction}`` or ``'REGEX:ARGS'``."""
    if isinstance(value, str):
        return split_cli(kind, value)
    if not isinstance(value, dict) or not isinstance(value.get("match"), str):
        return None
    if kind == "rope_permute":
        heads, direction = value.get("heads"), value.get("direction")
        if set(value) != {"match", "heads", "direction"} or not _is_int(heads) or not isinstance(direction, str):
            return None
        return value["match"], f"{heads},{direction}"
    field = JSON_FIELDS[kind]
    dims = value.get(field)
    if set(value) != {"match", field} or not isinstance(dims, list) or not all(map(_is_int, dims)):
        return None
    return value["match"], ",".join(map(str, dims))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def to_json(kind: str, regex: str, text: str) -> dict:
    params = parse_params(kind, text)
    if kind == "rope_permute":
        return {"match": regex, "heads": params[0], "direction": params[1]}
    return {"match": regex, JSON_FIELDS[kind]: list(params)}


def split_cli(kind: str, spec: str) -> tuple[str, str]:
    """``'REGEX:ARGS'`` -> (REGEX, ARGS), split at the last colon (the arguments never hold one)."""
    regex, sep, args = spec.rpartition(":")
    if not sep:
        example = {"rope_permute": "'q_proj\\.weight$:32,hf-to-meta'", "reshape": "'^pos$:1,-1,768'",
                   "permute": "'^w$:2,0,1'"}.get(kind, "'c_attn\\.weight$:0,1'")
        raise RuleError(f"{kind.replace('_', '-')} {spec!r} needs the form 'REGEX:ARGS' (e.g. {example})")
    return regex, args


JSON_HINTS = {
    "transpose": "{match: REGEX, dims: [D0, D1]} or 'REGEX:D0,D1'",
    "permute": "{match: REGEX, dims: [ORDER...]} or 'REGEX:ORDER'",
    "reshape": "{match: REGEX, shape: [SIZES...]} or 'REGEX:SIZES' (one size may be -1)",
    "rope_permute": "{match: REGEX, heads: N, direction: hf-to-meta|meta-to-hf} or 'REGEX:N,DIRECTION'",
}
