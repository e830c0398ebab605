"""What `surgery inspect` says of a checkpoint's names: the remap it suggests, the module tree,
dtype totals.

Everything here works on ``Mapping[str, TensorInfo]`` (or plain key lists) and never imports
torch, so ``surgery inspect`` of a multi-GB checkpoint stays a header read.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate, compress, groupby, repeat
from operator import attrgetter, itemgetter, sub
from typing import TYPE_CHECKING, Any, Hashable, Iterable, Mapping

from ..keys import MAX_INDEX_DIGITS, common_prefix, detect_wrapper_prefixes

if TYPE_CHECKING:  # pragma: no cover
    from ..checkpoint import TensorInfo



def suggest_remap(keys: Iterable[str]) -> list[str]:
    """``surgery remap`` options that remove the prefixes every key carries, in the order to apply.

    ``['--auto']`` for DataParallel/DDP/torch.compile wrappers, ``['--auto', '--strip-prefix
    model.']`` when a Lightning-style prefix follows them, ``['--strip-prefix backbone.']`` for a
    prefix alone, ``[]`` when the keys are clean.
    """
    keys = list(keys)
    opts = ["--auto"] if detect_wrapper_prefixes(keys) else []
    prefix = common_prefix(keys)
    if prefix is not None:
        opts.append(f"--strip-prefix {prefix}")
    return opts


def remap_command(keys: Iterable[str], src: str = "SRC", dst: str = "DST") -> str | None:
    """The whole command line that cleans the prefixes, or None when there is nothing to strip.

    >>> remap_command(["module.fc.weight", "module.fc.bias"], "ddp.pth", "clean.safetensors")
    'surgery remap ddp.pth clean.safetensors --auto'
    """
    opts = suggest_remap(keys)
    return " ".join(["surgery", "remap", src, dst, *opts]) if opts else None


# ----------------------------------------------------------------------------- module tree

@dataclass(frozen=True)
class TreeRow:
    """One row of :func:`module_tree`.

    ``path`` is the full dotted path with collapsed siblings in braces (``layer1.{0,1}.conv1``),
    ``name`` its last component (what an indented rendering prints), ``depth`` the number of
    components (1 for top-level). ``params`` counts elements over every instance the row stands
    for (buffers included: a state dict does not tell them apart), ``n_tensors`` likewise;
    ``repeat`` is how many identical instances the row stands for (ancestors' collapses
    included); ``shape`` is the per-instance shape on rows that are tensors, else None.
    """

    path: str
    name: str
    depth: int
    params: int
    n_tensors: int
    dtypes: tuple[str, ...]
    shape: tuple[int, ...] | None = None
    repeat: int = 1

    @classmethod
    def _fast(cls, path: str, name: str, depth: int, params: int, n_tensors: int, dtypes: tuple[str, ...],
              shape: tuple[int, ...] | None, repeat: int) -> "TreeRow":
        """A row made without the frozen ``__init__``'s setattr per field: a tree of 200,000
        tensors that do not collapse has 400,000 rows. Equal to ``TreeRow(...)``."""
        row = object.__new__(cls)
        row.__dict__.update(path=path, name=name, depth=depth, params=params, n_tensors=n_tensors, dtypes=dtypes,
                            shape=shape, repeat=repeat)
        return row

    @property
    def is_tensor(self) -> bool:
        return self.shape is not None

    def to_json(self) -> dict:
        return {"path": self.path, "name": self.name, "depth": self.depth, "params": self.params,
                "tensors": self.n_tensors, "dtypes": list(self.dtypes),
                "shape": None if self.shape is None else list(self.shape), "repeat": self.repeat}


_DIGITS = "0123456789"


def _numbered(name: str) -> tuple[str, int] | None:
    """'3' -> ('', 3); 'layer12' -> ('layer', 12); 'layers_0' -> ('layers_', 0); 'fc' -> None.

    Unlike `keys.collapse_keys`, which compares names only, the tree also takes a number glued to
    the name (``layer0``, ``block12``): its siblings merge only when their keys, shapes and dtypes
    are the same, so ``conv1``/``conv2`` of different shapes stay apart.
    """
    stem = "" if name.isdecimal() else name.rstrip(_DIGITS)  # a decimal name: nn.Sequential's children
    if not 0 < len(name) - len(stem) <= MAX_INDEX_DIGITS:
        return None
    return stem, int(name[len(stem):])


def _stems(names: list[str]) -> list[str]:
    """`_numbered`'s stem of each name, the name itself when it carries no number; in C loops, as a
    module may hold 200,000 children."""
    joined = "".join(names)
    lengths = list(map(len, names))
    if joined.isdecimal() and max(lengths) <= MAX_INDEX_DIGITS:  # nn.Sequential's or nn.ModuleList's children
        return [""] * len(names)
    stems = list(map(str.rstrip, names, repeat(_DIGITS)))
    if not joined.isascii():  # a number in other digits is a number too
        for j in compress(range(len(names)), map(str.isdecimal, names)):
            stems[j] = ""
    if max(map(sub, lengths, map(len, stems))) > MAX_INDEX_DIGITS:
        for j in range(len(names)):
            if lengths[j] - len(stems[j]) > MAX_INDEX_DIGITS:
                stems[j] = names[j]
    return stems


def _counted(names: list[str]) -> tuple[str, int] | None:
    """(stem, first) when ``names`` read ``stem`` followed by first, first + 1, ... in order, as
    nn.Sequential's children ('0', '1', ...) or ``layer0``, ``layer1``... do; else None. One
    comparison of two strings tells what a loop over 200,000 names would: each name is numbered,
    with that stem, and none is there twice."""
    stem = names[0].rstrip(_DIGITS)
    number = names[0][len(stem):]
    if not number or len(number) > MAX_INDEX_DIGITS or stem.isdecimal() or number != str(int(number)):
        return None  # no number, one in other digits (`_numbered` reads the whole name), a leading zero
    start = int(number)
    if names[-1] != f"{stem}{start + len(names) - 1}" or \
            ".".join(names) != stem + ("." + stem).join(map(str, range(start, start + len(names)))):
        return None  # names hold no dots: joined, they are told apart
    return stem, start


def _label(names: list[str], stem: str, first: int | None = None) -> str:
    """'layer{0..11}' for runs of three or more, 'layer{0,1,5}' otherwise; ``names`` share ``stem``
    (``first``, when they count up from it one by one: see `_counted`)."""
    if len(names) == 1:
        return names[0]
    if first is not None and len(names) >= 3:
        return f"{stem}{{{first}..{first + len(names) - 1}}}"
    nums = list(map(itemgetter(slice(len(stem), None)), names)) if stem else names
    ints = list(map(int, nums))  # C loops: a run may hold 200,000 names
    if len(ints) >= 3 and ints == list(range(ints[0], ints[0] + len(ints))):  # one run, in order: the usual
        return f"{stem}{{{nums[0]}..{nums[-1]}}}"
    ordered = sorted(zip(ints, nums))
    text: list[str] = []
    start = 0
    for i in range(1, len(ordered) + 1):
        if i < len(ordered) and ordered[i][0] == ordered[i - 1][0] + 1:
            continue
        run = ordered[start:i]
        text.extend([f"{run[0][1]}..{run[-1][1]}"] if len(run) >= 3 else [n for _, n in run])
        start = i
    return f"{stem}{{{','.join(text)}}}"


# A node's signature lists its keys (the parts past its path), shapes and dtypes when its subtree
# is at most this many levels deep; a deeper one is signed from its children's signatures, each
# worked out once, so that numbered modules nested thousands of levels deep cost what their keys do.
_SHALLOW = 4


class _Ones(Sequence):
    """The idx of children of one key each (``keys[j]`` is child j's), made only when asked for:
    200,000 ``layer{i}.weight`` are 200,000 such children, compared, and but one of them shown."""

    __slots__ = ("keys",)

    def __init__(self, keys: list[int]) -> None:
        self.keys = keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, j):  # type: ignore[override]
        return _Ones(self.keys[j]) if isinstance(j, slice) else (self.keys[j],)


class _Keys:
    """The keys of a checkpoint split at their dots once, and what `module_tree` asks of them.

    A node of the tree is the list of the indices of the keys below it (``idx``), at a level (the
    number of parts of its path; the root's is 0). Only the nodes the rows show are split into
    children, and only the children that could merge with a sibling are signed: 200,000
    ``layer{i}.weight`` are 200,000 one-key children of the root, compared by (``weight``, shape,
    dtype), and two rows. Most steps are C loops (``map``, ``count``, ``join``): a checkpoint may
    hold 200,000 tensors and `surgery inspect` must stay a header read.
    """

    def __init__(self, infos: Mapping[str, "TensorInfo"], depth: int | None) -> None:
        self.keys = list(infos)
        self.infos = list(infos.values())
        # no node lies below the floor: the parts of a key past it stay one string, its tail
        self.floor = sys.maxsize if depth is None else max(depth, 0)
        maxsplit = -1 if depth is None else self.floor
        self.parts = [key.split(".", maxsplit) for key in self.keys]
        self._splits: dict[tuple[int, int], tuple] = {}  # (id(idx), level) -> (idx, `split`'s)
        self._nodes: dict[tuple[int, int], tuple] = {}  # (id(idx), level) -> (idx, own, groups)
        self._stats: dict[int, tuple] = {}  # id(idx) -> (idx, elements, tensors, dtypes)
        self._deep: dict[tuple[int, int], tuple] = {}  # (id(idx), level) -> (idx, signature)
        self._longest: dict[int, tuple] = {}  # id(idx) -> (idx, the most parts a key holds)
        self._ends: dict[int, list[int]] = {}  # key index -> where each of its parts ends (`_start`)
        self._interned: dict[tuple, int] = {}  # a deep node's (own, children's signatures) -> its signature

    def _rows(self, table: list, idx: Sequence[int]) -> Iterable:
        """``table``'s rows for ``idx``: the table itself when ``idx`` holds every key (in order:
        nodes and children hold their keys in key order)."""
        return table if len(idx) == len(table) else map(table.__getitem__, idx)

    def split(self, idx: Sequence[int], level: int) -> tuple[Any, list[str], list[Sequence[int]], tuple | None]:
        """The info of the key that ends at the node (None if none), its children's names and
        idx in key order, and `_counted`'s reading of the names."""
        if len(idx) == 1:  # the commonest node: a tensor, or a module holding one
            i = idx[0]
            parts = self.parts[i]
            if len(parts) == level:
                return self.infos[i], [], [], None
            return (None, [parts[level]], [idx], None) if level < self.floor else (None, [], [], None)
        hit = self._splits.get((id(idx), level))
        if hit is None:
            own = None
            if level:  # the key that ends at the node: the one of ``level`` parts (found in the keys
                lengths = list(self._rows(self.lengths, idx))  # already here, not by its path: a chain
                if level in lengths:  # of modules 4,000 deep would rebuild 4,000 paths of 4,000 parts)
                    own = self.infos[idx[lengths.index(level)]]
            kids: tuple = ([], [], None)
            if level < self.floor:
                kids = self._children(idx if own is None else [i for i in idx if len(self.parts[i]) > level], level)
            hit = self._splits[id(idx), level] = (idx, own, *kids)
        return hit[1:]

    def _start(self, i: int, level: int) -> int:
        """Where key ``i``'s part ``level`` starts: its parts' lengths summed once per key (a chain
        of modules thousands deep asks for every level of one key)."""
        if not level:
            return 0
        ends = self._ends.get(i)
        if ends is None:
            ends = self._ends[i] = list(accumulate(map(len, self.parts[i])))
        return ends[level - 1] + level

    def _children(self, idx: Sequence[int], level: int) -> tuple[list[str], list[Sequence[int]], tuple | None]:
        first = self.parts[idx[0]]
        at = self._start(idx[0], level)  # where the keys' parts at ``level`` start
        if all(map(str.startswith, self._rows(self.keys, idx), repeat(first[level] + "."), repeat(at))):
            return [first[level]], [idx], None  # a module holding one module
        heads = list(map(itemgetter(level), self._rows(self.parts, idx)))
        counted = _counted(heads)
        distinct = len(heads) if counted is not None else len(set(heads))
        if distinct == len(heads):  # one key each (200,000 `layer{i}.weight`)
            return heads, _Ones(idx), counted
        runs = [(head, list(map(itemgetter(1), run))) for head, run in groupby(zip(heads, idx), itemgetter(0))]
        if len(runs) == distinct:  # each child's keys in a row, as a state dict lists them
            return list(map(itemgetter(0), runs)), list(map(itemgetter(1), runs)), None
        kids: dict[str, list[int]] = {head: [] for head in dict.fromkeys(heads)}
        for head, i in zip(heads, idx):
            kids[head].append(i)
        return list(kids), list(kids.values()), None

    def node(self, idx: Sequence[int], level: int) -> tuple[Any, list[tuple[str, Sequence[int], int, bool]]]:
        """The info of the key that ends at the node (None if none) and its children's `groups`."""
        if len(idx) == 1:
            own, names, idxs, _ = self.split(idx, level)
            return own, [(names[0], idxs[0], 1, True)] if names else []
        hit = self._nodes.get((id(idx), level))
        if hit is None:
            own, names, idxs, counted = self.split(idx, level)
            hit = self._nodes[id(idx), level] = (idx, own, self.groups(names, idxs, counted, level + 1))
        return hit[1], hit[2]

    @cached_property
    def lengths(self) -> list[int]:
        """How many parts each key is split into."""
        return list(map(len, self.parts))

    @cached_property
    def dense(self) -> bool:
        """Every tensor is dense: its elements follow from its shape, so siblings of one signature
        hold as many."""
        return list(map(attrgetter("kind"), self.infos)).count("dense") == len(self.infos)

    def stats(self, idx: Sequence[int], level: int, below: int = _SHALLOW) -> tuple[int, int, tuple[str, ...]]:
        """(elements, tensors, sorted dtypes) of the keys ``idx``, a node at ``level``: from its
        children's groups (rows too) down to ``below`` levels, else key by key."""
        if len(idx) == 1:
            info = self.infos[idx[0]]
            return info.numel, 1, (info.dtype,)
        hit = self._stats.get(id(idx))  # a module holding one module has its keys: counted once
        if hit is not None:
            return hit[1:]
        if level < self.floor and below > 0:
            own, groups = self.node(idx, level)
            if all(exact for *_, exact in groups) or self.dense:
                params, count, dtypes = (0, 0, set()) if own is None else (own.numel, 1, {own.dtype})
                for _, rep, m, _ in groups:
                    p, c, d = self.stats(rep, level + 1, below - 1)
                    params, count = params + m * p, count + m * c
                    dtypes.update(d)
                hit = self._stats[id(idx)] = (idx, params, count, tuple(sorted(dtypes)))
                return hit[1:]
        both = list(map(attrgetter("numel", "dtype"), self._rows(self.infos, idx)))
        hit = self._stats[id(idx)] = (idx, sum(map(itemgetter(0), both)), len(idx),
                                      tuple(sorted(set(map(itemgetter(1), both)))))
        return hit[1:]

    def signature(self, idx: Sequence[int], level: int) -> Hashable:
        """Equal for two nodes at ``level`` whose keys are the same past it, with the same shapes
        and dtypes: what `keys.subtree_signatures` by (shape, dtype) tells apart, told apart."""
        parts, infos = self.parts, self.infos
        if len(idx) == 1:
            info = infos[idx[0]]
            return tuple(parts[idx[0]][level:]), tuple(info.shape), info.dtype
        if not self._is_deep(idx, level):
            return frozenset([(tuple(parts[i][level:]), tuple(infos[i].shape), infos[i].dtype) for i in idx])
        hit = self._deep.get((id(idx), level))
        return hit[1] if hit is not None else self._deep_signature(idx, level)

    def _is_deep(self, idx: Sequence[int], level: int) -> bool:
        """More than one key, and more than _SHALLOW levels below the node (at ``level``)."""
        if len(idx) == 1:
            return False
        hit = self._longest.get(id(idx))
        if hit is None:
            hit = self._longest[id(idx)] = (idx, max(self._rows(self.lengths, idx)))
        return min(hit[1], self.floor) - level > _SHALLOW

    def _deep_signature(self, idx: Sequence[int], level: int) -> int:
        """`signature` of a deep node: an int, equal for equal (own key's shape and dtype,
        children's names and signatures). Its deep children are signed first, in a loop, not by
        recursion: a key may hold thousands of dots."""
        done = self._deep
        stack = [(idx, level)]
        while stack:
            node, lvl = stack[-1]
            own, names, idxs, _ = self.split(node, lvl)
            todo = [(k, lvl + 1) for k in idxs if (id(k), lvl + 1) not in done and self._is_deep(k, lvl + 1)]
            if todo:
                stack.extend(todo)
                continue
            stack.pop()
            key = (None if own is None else (tuple(own.shape), own.dtype),
                   frozenset(zip(names, [self.signature(k, lvl + 1) for k in idxs])))
            done[id(node), lvl] = (node, self._interned.setdefault(key, len(self._interned)))
        return done[id(idx), level][1]

    def alike(self, idxs: Sequence[Sequence[int]], level: int) -> tuple[list[int], bool]:
        """The lengths of the runs of nodes ``idxs`` (siblings at ``level``) of equal signatures,
        and whether each node is known to be one dense tensor."""
        if len(idxs) == 1:
            return [1], False
        if isinstance(idxs, _Ones):  # one key each: compared column by column, in C loops
            rests = list(map(itemgetter(slice(level, None)), self._rows(self.parts, idxs.keys)))
            leaves = list(map(attrgetter("shape", "dtype", "kind"), self._rows(self.infos, idxs.keys)))
            if rests.count(rests[0]) == len(rests) and leaves.count(leaves[0]) == len(leaves):
                return [len(idxs)], leaves[0][2] == "dense"
            # `signature`'s, of one key
            sigs: list = [(tuple(rest), tuple(shape), dtype) for rest, (shape, dtype, _) in zip(rests, leaves)]
        else:
            sigs = [self.signature(idx, level) for idx in idxs]
        return [len(list(same)) for _, same in groupby(sigs)], False

    def groups(self, names: list[str], idxs: list[Sequence[int]], counted: tuple | None,
               level: int) -> list[tuple[str, Sequence[int], int, bool]]:
        """Children ``names``, ``idxs`` of one node, at ``level``, as (label, first member's idx,
        members, whether each member holds as many elements as the first): consecutive numbered
        siblings with the same stem and the same signature make one. ``counted``: `_counted`'s
        reading of the names."""
        if len(names) <= 1:
            return [(names[0], idxs[0], 1, True)] if names else []
        out: list[tuple[str, Sequence[int], int, bool]] = []
        end = 0
        for stem, run in groupby([counted[0]] * len(names) if counted else _stems(names)):
            start, end = end, end + len(list(run))  # numbered siblings of one stem, or one name
            cuts = [start, end]
            if not counted and end - start > 1 and stem in names[start:end]:  # `conv` beside `conv1`, `conv2`:
                j = names.index(stem, start, end)  # no number, merges with nothing
                cuts = [start, j, j + 1, end]
            for at, stop in zip(cuts, cuts[1:]):
                lengths, dense = self.alike(idxs[at:stop], level) if at < stop else ([], False)
                for n in lengths:  # members hold as many elements as the first: one, or dense tensors alike
                    first = None if counted is None else counted[1] + at
                    out.append((_label(names[at:at + n], stem, first), idxs[at], n, n == 1 or dense))
                    at += n
        return out


def module_tree(infos: Mapping[str, "TensorInfo"], depth: int | None = None) -> list[TreeRow]:
    """Rows of the module tree in key order, parents before children, identical numbered
    siblings collapsed.

    ResNet's ``layer1.0`` and ``layer1.1`` have the same keys and shapes, so they become one row
    ``layer1.{0,1}`` (params summed, ``repeat=2``) with children such as
    ``layer1.{0,1}.conv1.weight``; ``layer2.0`` carries a downsample branch and stays apart from
    ``layer2.{1,2,3}``... Long runs read ``{0..11}``. Any numbering collapses the same way:
    ``layer0``..``layer9`` read ``layer{0..9}``, ``layers_0``.. ``layers_{0..9}``. ``depth`` keeps
    rows with at most that many components (``depth=2``: ``layer1``, ``layer1.{0,1}``). Indent by
    ``row.depth - 1``.
    """
    if not infos:
        return []
    keys = _Keys(infos, depth)
    _, top = keys.node(list(range(len(keys.infos))), 0)
    rows: list[TreeRow] = []
    todo = [(label, rep, n, "", 1) for label, rep, n, _ in reversed(top)]
    while todo:  # depth first, parents before children, in key order
        label, rep, n, prefix, level = todo.pop()  # n: the instances the row stands for
        own, groups = keys.node(rep, level)
        params, count, dtypes = keys.stats(rep, level)
        path = prefix + label
        rows.append(TreeRow._fast(path, label, level, params * n, count * n, dtypes,
                                  None if own is None else tuple(own.shape), n))
        todo.extend((lb, r, m * n, path + ".", level + 1) for lb, r, m, _ in reversed(groups))
    return rows


@dataclass(frozen=True)
class TreeCut:
    """The first rows of a module tree and what the rest hold (:func:`cut_tree`).

    ``hidden`` counts the rows left out; ``modules`` the top rows of the subtrees left out, whose
    ``params`` and ``n_tensors`` are totalled here (each tensor once); ``like`` names them:
    ``layerN`` or ``blocks.N`` when most are numbered alike, else the path of the first row left out.
    """

    shown: list[TreeRow]
    hidden: int = 0
    modules: int = 0
    params: int = 0
    n_tensors: int = 0
    like: str = ""


def cut_tree(rows: list[TreeRow], limit: int) -> TreeCut:
    """At most ``limit`` rows of ``rows`` (from :func:`module_tree`), and totals for the others.

    >>> cut = cut_tree(module_tree(infos), 40); len(cut.shown), cut.hidden  # doctest: +SKIP
    (40, 99960)
    """
    if len(rows) <= limit:
        return TreeCut(shown=list(rows))
    rest = rows[limit:]
    params = tensors = 0
    stems: dict[str, int] = {}
    top = rest[0].depth + 1
    modules = 0
    for r in rest:
        # in depth-first order a left-out row heads a left-out subtree unless a shallower
        # (or equally deep) left-out row came before it: that row or a later one is its parent
        if r.depth < top:
            top = r.depth
        if r.depth == top:
            modules += 1
            params += r.params
            tensors += r.n_tensors
            num = _numbered(r.name.split("{", 1)[0] + "0" if "{" in r.name else r.name)
            if num is not None:  # 'layer7' -> 'layer', 'blocks.12' -> 'blocks.'
                key = r.path[:len(r.path) - len(r.name)] + num[0]
                stems[key] = stems.get(key, 0) + 1
    stem, count = max(stems.items(), key=lambda kv: kv[1], default=("", 0))
    like = f"{stem}N" if 2 * count >= modules and count > 1 else rest[0].path
    return TreeCut(shown=rows[:limit], hidden=len(rest), modules=modules, params=params, n_tensors=tensors,
                   like=like)


# ----------------------------------------------------------------------------- dtypes

def dtype_bytes(infos: Mapping[str, "TensorInfo"]) -> dict[str, int]:
    """dtype -> total bytes, largest first."""
    out: dict[str, int] = {}
    for t in infos.values():
        out[t.dtype] = out.get(t.dtype, 0) + t.nbytes
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def dtype_counts(infos: Mapping[str, "TensorInfo"]) -> dict[str, int]:
    """dtype -> number of tensors, most first."""
    out: dict[str, int] = {}
    for t in infos.values():
        out[t.dtype] = out.get(t.dtype, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))
