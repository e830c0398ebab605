"""Checkpoint keys -> model keys: pure functions over ``{name: shape}`` dicts (no torch).

Order of attempts, each keeping what the previous one found:
1. wrapper prefixes (``module.``, ``_orig_mod.``, in any order) are peeled where every key has them;
2. the prefix mapping ``ckpt_prefix -> model_prefix`` (each at most three components) that makes
   the most checkpoint keys meet a model key of the same shape: a network saved under
   ``backbone.``/``encoder.``/``model.``, or a target that wraps the network, or both;
3. only when that mapping covers less than half of the model: whole-component suffix matching
   (``a.b.conv1.weight`` meets ``conv1.weight``), an error when a key meets several.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from ..keys import detect_wrapper_prefixes, strip_wrappers
from ..errors import AlignError

Shape = tuple[int, ...]
_IGNORED = "num_batches_tracked"
_MAX_PREFIX_PARTS = 3


@dataclass
class Alignment:
    """``mapping``: checkpoint key (as given) -> model key it is meant for (present or not in the
    model: the loader sorts loaded / mismatched / unexpected)."""

    mapping: dict[str, str]
    wrappers: list[str] = field(default_factory=list)
    ckpt_prefix: str = ""
    model_prefix: str = ""
    method: str = "identity"  # identity | prefix | suffix
    matched: int = 0

    def to_json(self) -> dict:
        return {"wrappers_stripped": list(self.wrappers), "ckpt_prefix": self.ckpt_prefix,
                "model_prefix": self.model_prefix, "method": self.method, "matched": self.matched}


def _split_points(key: str) -> Iterable[tuple[str, str]]:
    """(prefix, rest) at component boundaries: the whole key, then up to three leading components
    peeled, keeping at least module + leaf in ``rest``."""
    yield "", key
    parts = key.split(".")
    for i in range(1, min(_MAX_PREFIX_PARTS, len(parts) - 2) + 1):
        yield ".".join(parts[:i]) + ".", ".".join(parts[i:])


def best_prefix_mapping(ckpt: Mapping[str, Shape], model: Mapping[str, Shape],
                        ignore: Iterable[str] = ()) -> tuple[str, str, int]:
    """(ckpt_prefix, model_prefix, matches) maximising same-shape matches; ties prefer the
    identity, then shorter prefixes. ``ignore``: model keys that must not count (the new head)."""
    skip = set(ignore)
    by_suffix: dict[str, list[str]] = {}
    for m, shape in model.items():
        if m in skip or m.endswith(_IGNORED):
            continue
        for pre, rest in _split_points(m):
            by_suffix.setdefault(rest, []).append(pre)
    votes: Counter[tuple[str, str]] = Counter()
    for k, shape in ckpt.items():
        if k.endswith(_IGNORED):
            continue
        for cp, rest in _split_points(k):
            for mp in by_suffix.get(rest, ()):
                if tuple(model[mp + rest]) == tuple(shape):
                    votes[(cp, mp)] += 1
    if not votes:
        return "", "", 0
    (cp, mp), n = min(votes.items(), key=lambda kv: (-kv[1], kv[0] != ("", ""), len(kv[0][0]) + len(kv[0][1]), kv[0]))
    return cp, mp, n


def suffix_matches(ckpt: Mapping[str, Shape], model: Mapping[str, Shape],
                   ignore: Iterable[str] = ()) -> dict[str, str]:
    """ckpt key -> model key where one is the other with whole leading components removed and the
    shapes agree. Raises AlignError listing every model key that several checkpoint keys meet."""
    skip = set(ignore)
    by_tail: dict[str, list[str]] = {}
    for k in ckpt:
        parts = k.split(".")
        for i in range(len(parts)):
            by_tail.setdefault(".".join(parts[i:]), []).append(k)
    out: dict[str, str] = {}
    ambiguous: list[str] = []
    for m, shape in model.items():
        if m in skip or m.endswith(_IGNORED):
            continue
        cands = [k for k in by_tail.get(m, ()) if tuple(ckpt[k]) == tuple(shape)]
        if not cands:
            parts = m.split(".")
            for i in range(1, len(parts) - 1):  # the model key is longer: its tail is a checkpoint key
                tail = ".".join(parts[i:])
                if tail in ckpt and tuple(ckpt[tail]) == tuple(shape):
                    cands = [tail]
                    break
        if len(cands) == 1:
            if cands[0] in out:
                ambiguous.append(f"{cands[0]!r} fits both {out[cands[0]]!r} and {m!r}")
            out[cands[0]] = m
        elif len(cands) > 1:
            ambiguous.append(f"{m!r} fits {', '.join(repr(c) for c in cands[:3])}")
    if ambiguous:
        more = f" (and {len(ambiguous) - 5} more)" if len(ambiguous) > 5 else ""
        raise AlignError(f"cannot match checkpoint keys to the model unambiguously by suffix: "
                         f"{'; '.join(ambiguous[:5])}{more}; say which prefix to strip with "
                         f"--strip-prefix or --rename 'REGEX=>REPL'")
    return out


def align_keys(ckpt: Mapping[str, Shape], model: Mapping[str, Shape], ignore: Iterable[str] = ()) -> Alignment:
    """How checkpoint keys map onto model keys.

    >>> align_keys({"module.backbone.fc.weight": (2, 3)}, {"fc.weight": (2, 3)}).mapping
    {'module.backbone.fc.weight': 'fc.weight'}
    """
    ignore = set(ignore)
    stripped, _ = strip_wrappers(list(ckpt))
    wrappers = detect_wrapper_prefixes(list(ckpt))
    clean = {s: tuple(v) for s, v in zip(stripped, ckpt.values())}
    back = dict(zip(stripped, ckpt))
    cp, mp, n = best_prefix_mapping(clean, model, ignore)

    def moved(k: str) -> str:
        return mp + k[len(cp):] if k.startswith(cp) else k

    mapping = {back[k]: moved(k) for k in clean}
    method = "identity" if (cp, mp) == ("", "") else "prefix"
    wanted = sum(1 for m in model if m not in ignore and not m.endswith(_IGNORED))
    if wanted and n < wanted / 2:
        suffix = suffix_matches(clean, model, ignore)
        if len(suffix) > n:
            mapping = {back[k]: suffix.get(k, k) for k in clean}
            return Alignment(mapping, wrappers, "", "", "suffix", len(suffix))
    return Alignment(mapping, wrappers, cp, mp, method, n)
