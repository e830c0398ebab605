"""What a key's name says about where its tensor sits: pure functions over names and shapes.

A key is a module path and a leaf (``layer1.0.conv1`` + ``weight``). Renames that keep a model's
structure keep its numbers (``layer1.0.conv1`` -> ``stage_1.block0.c1``: 1, 0, 1) and its leaf
names (``weight``, ``bias``, ``running_mean``), so those, per module level, are the tiebreaks
between tensors of one shape. File order is not one: safetensors files store keys sorted.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

Shape = tuple[int, ...]
_NUMBER = re.compile(r"\d+")
MAX_PERMUTED_DIMS = 4  # 24 orders at most; larger tensors are compared as they are, or transposed


@dataclass(frozen=True)
class KeyParts:
    leaf: str
    numbers: tuple[tuple[int, ...], ...]  # the numbers in each module component, by level

    @property
    def flat(self) -> tuple[int, ...]:
        return tuple(itertools.chain.from_iterable(self.numbers))


def key_parts(key: str) -> KeyParts:
    *modules, leaf = key.split(".")
    return KeyParts(leaf, tuple(tuple(int(n) for n in _NUMBER.findall(m)) for m in modules))


def structural_score(a: str, b: str, pa: KeyParts, pb: KeyParts) -> tuple[int, ...]:
    """How strongly the names say ``a`` is ``b``, best first: the same name; the same leaf and the
    same numbers at the same levels; or at the same levels counted from the leaf, the levels one
    side has more holding no numbers (a prefix added or removed); how many trailing components
    the names share; the same leaf and numbers at any level; the same numbers; the same leaf."""
    same_leaf = pa.leaf == pb.leaf
    numbered = bool(pa.flat or pb.flat)  # two names without numbers agree on nothing by that
    return (a == b, same_leaf and numbered and pa.numbers == pb.numbers,
            same_leaf and numbered and _tail_aligned(pa.numbers, pb.numbers), _shared_tail(a, b),
            same_leaf and numbered and pa.flat == pb.flat, numbered and pa.flat == pb.flat, same_leaf)


STRONG = 3  # structural_score's entries before the shared tail: each says which key, not just which kind


def _tail_aligned(na: tuple, nb: tuple) -> bool:
    short, long_ = sorted((na, nb), key=len)
    extra = len(long_) - len(short)
    return long_[extra:] == short and not any(long_[:extra])


def _shared_tail(a: str, b: str) -> int:
    n = 0
    for x, y in zip(reversed(a.split(".")), reversed(b.split("."))):
        if x != y:
            break
        n += 1
    return n


def dtype_family(dtype: str) -> str:
    """Floats load into floats and integers into integers: a match never crosses families."""
    d = dtype.upper()
    if d.startswith(("F", "BF")):
        return "float"
    if d.startswith(("I", "U")):
        return "int"
    return d


def layouts(src: Shape, dst: Shape) -> list[tuple[int, ...]]:
    """Every order of ``src``'s dims other than its own that gives ``dst``'s shape."""
    if len(src) != len(dst) or len(src) < 2 or sorted(src) != sorted(dst):
        return []
    if len(src) > MAX_PERMUTED_DIMS:
        return [p for p in _swaps(len(src)) if tuple(src[i] for i in p) == dst]
    ident = tuple(range(len(src)))
    return [p for p in itertools.permutations(ident) if p != ident and tuple(src[i] for i in p) == dst]


def _swaps(n: int) -> list[tuple[int, ...]]:
    out = []
    for i, j in itertools.combinations(range(n), 2):
        p = list(range(n))
        p[i], p[j] = j, i
        out.append(tuple(p))
    return out
