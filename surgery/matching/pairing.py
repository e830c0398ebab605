"""Which of A's tensors each of B's is: candidates of one shape (or the same dims in another
order) and dtype family, ranked by value, then by what the names say; a pair is taken only when
each is the other's single best, round after round, so nothing is decided by a coin toss."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InputError
from .sides import Side
from .structure import STRONG, KeyParts, dtype_family, key_parts, layouts, structural_score
from .values import Values

# value evidence, best first: bit-equal as it is, bit-equal in another dim order, not compared, different
EQUAL, EQUAL_REORDERED, UNKNOWN, DIFFERENT = 3, 2, 1, 0
# Every key of B is scored against every key of A of its shape: n of one shape on each side cost
# n * n (tens of microseconds each), so 30,000 MoE experts of one shape would take days.
MAX_CANDIDATES = 1_000_000


@dataclass(frozen=True)
class Pair:
    """A's ``a`` is B's ``b``, its dims in the order ``dims`` where that is not None."""

    a: str
    b: str
    dims: tuple[int, ...] | None
    evidence: str  # value | name | structure | shape
    values: str  # equal | different | not compared

    def to_json(self) -> dict:
        return {"a": self.a, "b": self.b, "dims": list(self.dims) if self.dims else None,
                "evidence": self.evidence, "values": self.values}


@dataclass
class Pairing:
    pairs: list[Pair] = field(default_factory=list)
    ambiguous: list[tuple[list[str], list[str]]] = field(default_factory=list)  # (B keys, A keys) tied
    missing: list[str] = field(default_factory=list)  # B keys no free A tensor fits
    unused: list[str] = field(default_factory=list)  # A keys in no pair and no ambiguity


@dataclass(frozen=True)
class _Fit:
    score: tuple
    dims: tuple[int, ...] | None
    value: int


class _Scorer:
    def __init__(self, a: Side, b: Side, values: Values | None):
        self.a, self.b, self.values = a, b, values
        self.parts: dict[tuple[str, str], KeyParts] = {}
        self.by_family = _families(a)
        self.rank_a, self.rank_b = _ranks(a, self.by_family), _ranks(b, _families(b))
        _refuse_too_many(a, b, self.by_family, _families(b))
        self.fits: dict[str, dict[str, _Fit]] = {bk: self._fits(bk) for bk in b.shapes}

    def _part(self, side: str, key: str) -> KeyParts:
        if (side, key) not in self.parts:
            self.parts[(side, key)] = key_parts(key)
        return self.parts[(side, key)]

    def _fits(self, bk: str) -> dict[str, _Fit]:
        bs = self.b.shapes[bk]
        out = {}
        for ak in self.by_family.get((tuple(sorted(bs)), dtype_family(self.b.dtypes[bk])), ()):
            fit = self._fit(ak, bk, self.a.shapes[ak], bs)
            if fit is not None:
                out[ak] = fit
        return out

    def _fit(self, ak: str, bk: str, as_: tuple, bs: tuple) -> _Fit | None:
        value, dims = self._value(ak, bk, as_, bs)
        if value is None:
            return None
        names = structural_score(ak, bk, self._part("a", ak), self._part("b", bk))
        same_dtype = self.a.dtypes[ak] == self.b.dtypes[bk]
        in_order = self.rank_a is not None and self.rank_b is not None and self.rank_a[ak] == self.rank_b[bk]
        return _Fit((value, *names, in_order, dims is None, same_dtype), dims, value)

    def _value(self, ak: str, bk: str, as_: tuple, bs: tuple) -> tuple[int | None, tuple[int, ...] | None]:
        """The value evidence and the dim order it needs; (None, None): the shapes cannot meet."""
        orders = layouts(as_, bs)
        v = self.values
        if v is None or not v.comparable(ak, bk):
            if as_ == bs:
                return UNKNOWN, None
            return (UNKNOWN, orders[0]) if len(orders) == 1 else (None, None)  # unknown which order
        if as_ == bs and v.same_digest(ak, bk, None):
            return EQUAL, None
        for dims in orders:
            if v.same_digest(ak, bk, dims):
                return EQUAL_REORDERED, dims
        if as_ == bs:
            return DIFFERENT, None
        return (DIFFERENT, orders[0]) if len(orders) == 1 else (None, None)


def _refuse_too_many(a: Side, b: Side, fam_a: dict[tuple, list[str]], fam_b: dict[tuple, list[str]]) -> None:
    """Refuse, before any value is read, a pairing whose candidates would take hours to score."""
    sizes = {f: (len(fam_a.get(f, ())), len(keys)) for f, keys in fam_b.items()}
    total = sum(na * nb for na, nb in sizes.values())
    if total > MAX_CANDIDATES:
        (shape, family), (na, nb) = max(sizes.items(), key=lambda kv: kv[1][0] * kv[1][1])
        raise InputError(f"{a.label} and {b.label}: {total:,} candidate pairs to score, at most {MAX_CANDIDATES:,} "
                         f"({na:,} {family} tensors of A and {nb:,} of B have dims {list(shape)}); match a part of "
                         f"each at a time: `surgery remap CHECKPOINT PART.safetensors --keep REGEX` writes one")


def _families(side: Side) -> dict[tuple, list[str]]:
    """Keys by what they can pair with: their dims in any order, and their dtype family."""
    out: dict[tuple, list[str]] = {}
    for k, s in side.shapes.items():
        out.setdefault((tuple(sorted(s)), dtype_family(side.dtypes[k])), []).append(k)
    return out


def _ranks(side: Side, families: dict[tuple, list[str]]) -> dict[str, tuple[int, int]] | None:
    """Each key's place among its family in the side's own order, with the family's size: the
    n-th of n tensors of a shape is the n-th of n in the other model when both list their modules
    in the order they were built. None when the side's format does not keep that order, or its
    keys are sorted by name, which says nothing of the model."""
    keys = list(side.shapes)
    if not side.ordered or (side.kind == "checkpoint" and len(keys) > 2 and keys == sorted(keys)):
        return None
    return {k: (i, len(members)) for members in families.values() for i, k in enumerate(members)}


def pair_keys(a: Side, b: Side, values: Values | None) -> Pairing:
    """Mutual single-best pairs of B's keys with A's, then what is left: tied, missing, unused."""
    sc = _Scorer(a, b, values)
    free_a, free_b = dict.fromkeys(a.shapes), dict.fromkeys(b.shapes)
    taken: dict[str, Pair] = {}
    while True:
        top_b = {bk: _top({ak: f for ak, f in sc.fits[bk].items() if ak in free_a}) for bk in free_b}
        top_a = _top_of_a(sc, free_a, free_b)
        new = [(next(iter(t)), bk) for bk, t in top_b.items() if len(t) == 1 and top_a.get(next(iter(t))) == {bk}]
        if not new:
            break
        for ak, bk in new:
            taken[bk] = _pair(ak, bk, sc.fits[bk][ak])
            del free_a[ak], free_b[bk]
    res = Pairing(pairs=[_confirmed(taken[bk], values) for bk in b.shapes if bk in taken])
    res.ambiguous = _tied_groups(top_b, top_a)
    tied_a = {ak for _, aks in res.ambiguous for ak in aks}
    res.missing = [bk for bk in free_b if not top_b[bk]]
    res.unused = [ak for ak in free_a if ak not in tied_a]
    return res


def _confirmed(p: Pair, values: Values | None) -> Pair:
    """The pair, its bytes compared where digests proposed it; a digest collision loses the value evidence."""
    if values is None or p.values != "equal" or values.identical(p.a, p.b, p.dims):
        return p
    return Pair(p.a, p.b, p.dims, "name" if p.a == p.b else "structure", "different")


def _top(fits: dict[str, _Fit]) -> set[str]:
    if not fits:
        return set()
    best = max(f.score for f in fits.values())
    return {k for k, f in fits.items() if f.score == best}


def _top_of_a(sc: _Scorer, free_a: dict, free_b: dict) -> dict[str, set[str]]:
    by_a: dict[str, dict[str, _Fit]] = {}
    for bk in free_b:
        for ak, f in sc.fits[bk].items():
            if ak in free_a:
                by_a.setdefault(ak, {})[bk] = f
    return {ak: _top(fs) for ak, fs in by_a.items()}


def _pair(ak: str, bk: str, f: _Fit) -> Pair:
    names, in_order = f.score[1:-3], f.score[-3]  # structural_score's entries, then the order
    evidence = ("value" if f.value >= EQUAL_REORDERED else "name" if names[0]
                else "structure" if any(names[1:STRONG]) or names[STRONG] > 1 or any(names[STRONG + 1:-1])
                else "order" if in_order else "shape")
    values = {EQUAL: "equal", EQUAL_REORDERED: "equal", DIFFERENT: "different"}.get(f.value, "not compared")
    return Pair(ak, bk, f.dims, evidence, values)


def _tied_groups(top_b: dict[str, set[str]], top_a: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """The B and A keys left that tie for each other, in connected groups (B keys in their order)."""
    edges: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for bk, aks in top_b.items():
        for ak in aks:
            edges.setdefault(("b", bk), set()).add(("a", ak))
            edges.setdefault(("a", ak), set()).add(("b", bk))
    for ak, bks in top_a.items():
        for bk in bks:
            edges.setdefault(("a", ak), set()).add(("b", bk))
            edges.setdefault(("b", bk), set()).add(("a", ak))
    seen: set[tuple[str, str]] = set()
    groups = []
    for bk in top_b:
        if ("b", bk) in seen or ("b", bk) not in edges:
            continue
        stack, comp = [("b", bk)], []
        while stack:
            node = stack.pop()
            if node not in seen:
                seen.add(node)
                comp.append(node)
                stack.extend(edges.get(node, ()))
        order = {k: i for i, k in enumerate(top_b)}
        groups.append((sorted((k for s, k in comp if s == "b"), key=order.__getitem__),
                       sorted(k for s, k in comp if s == "a")))
    return groups
