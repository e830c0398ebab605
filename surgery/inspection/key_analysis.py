"""What `surgery inspect` says of a checkpoint's names: the remap it suggests, the module tree,
dtype totals.

Everything here works on ``Mapping[str, TensorInfo]`` (or plain key lists) and never imports
torch, so ``surgery inspect`` of a multi-GB checkpoint stays a header read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from ..keys import KeyNode, common_prefix, detect_wrapper_prefixes, key_trie_bottom_up, node_signature

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

    @property
    def is_tensor(self) -> bool:
        return self.shape is not None

    def to_json(self) -> dict:
        return {"path": self.path, "name": self.name, "depth": self.depth, "params": self.params,
                "tensors": self.n_tensors, "dtypes": list(self.dtypes),
                "shape": None if self.shape is None else list(self.shape), "repeat": self.repeat}


def _leaf_sig(t: "TensorInfo") -> tuple:
    return (tuple(t.shape), t.dtype)


def _sigs_and_stats(order: list["KeyNode"]) -> tuple[dict[int, int], dict[int, tuple[int, int, frozenset]]]:
    """`keys.subtree_signatures` by (shape, dtype), and id(node) -> (elements, tensors, dtypes) of
    its whole subtree, in one pass (``order``: children first). A model of many tensors is mostly
    tensor leaves, modules holding one child and (at the depth shown) modules holding one tensor:
    each is worked out once per (shape, dtype), (name, child) or (rest of key, shape, dtype), the
    other nodes node by node."""
    interned: dict[tuple, int] = {}
    sigs: dict[int, int] = {}
    stats: dict[int, tuple[int, int, frozenset]] = {}
    leaves: dict[tuple, tuple[int, tuple[int, int, frozenset]]] = {}  # (shape, dtype) -> (signature, stats)
    floor_leaves: dict[tuple, tuple[int, tuple[int, int, frozenset]]] = {}  # (rest of key, shape, dtype) -> the same
    one_dtype: dict[str, frozenset] = {}
    for node in order:
        children, info = node.children, node.info
        if node.tails is None:
            if not children and info is not None and info.kind == "dense":  # a tensor
                key = (tuple(info.shape), info.dtype)
                hit = leaves.get(key)
                if hit is None:
                    hit = leaves[key] = (interned.setdefault((key, (), ()), len(interned)),
                                         (info.numel, 1, frozenset((info.dtype,))))
                sigs[id(node)], stats[id(node)] = hit
                continue
            if info is None and len(children) == 1:  # a module holding one module or tensor: its figures
                for name, child in children.items():
                    sigs[id(node)] = interned.setdefault((None, ((name, sigs[id(child)]),), ()), len(interned))
                    stats[id(node)] = stats[id(child)]
                continue
        elif not children and info is None and len(node.tails) == 1:  # at the floor: a module holding one tensor
            tail, t = node.tails[0]
            if t is not None and t.kind == "dense":
                key = (tail, tuple(t.shape), t.dtype)
                hit = floor_leaves.get(key)
                if hit is None:
                    sig = interned.setdefault((None, (), ((tail, (tuple(t.shape), t.dtype)),)), len(interned))
                    hit = floor_leaves[key] = (sig, (t.numel, 1, frozenset((t.dtype,))))
                sigs[id(node)], stats[id(node)] = hit
                continue
        sigs[id(node)] = node_signature(node, _leaf_sig, sigs, interned)
        stats[id(node)] = _node_stats(node, stats, leaves, one_dtype)
    return sigs, stats


def _node_stats(node: "KeyNode", stats: dict, leaves: dict, one_dtype: dict) -> tuple[int, int, frozenset]:
    """(elements, tensors, dtypes) of ``node``'s subtree, its children's in ``stats``."""
    tails = node.tails
    if not node.children and node.info is None and tails is not None and len(tails) == 1:
        info = tails[0][1]  # the commonest node at the depth shown: one module holding one tensor
        if info is not None and info.kind == "dense":
            key = (tuple(info.shape), info.dtype)
            hit = leaves.get(key)
            return hit[1] if hit is not None else (info.numel, 1, frozenset((info.dtype,)))
    params, count, dts = 0, 0, frozenset()
    infos = [] if node.info is None else [node.info]
    if tails is not None:
        infos += [i for _, i in tails if i is not None]
    for info in infos:
        params += info.numel
        count += 1
        d = one_dtype.get(info.dtype) or one_dtype.setdefault(info.dtype, frozenset((info.dtype,)))
        if d is not dts:
            dts = d if dts <= d else dts if d <= dts else dts | d
    for child in node.children.values():
        p, c, d = stats[id(child)]
        params += p
        count += c
        dts = d if dts <= d else dts if d <= dts else dts | d
    return params, count, dts


_DIGITS = "0123456789"


def _numbered(name: str) -> tuple[str, int] | None:
    """'3' -> ('', 3); 'layer12' -> ('layer', 12); 'layers_0' -> ('layers_', 0); 'fc' -> None.

    Unlike `keys.collapse_keys`, which compares names only, the tree also takes a number glued to
    the name (``layer0``, ``block12``): its siblings merge only when their keys, shapes and dtypes
    are the same, so ``conv1``/``conv2`` of different shapes stay apart.
    """
    if name.isdecimal():  # nn.Sequential's children (and the odd non-ASCII number)
        return "", int(name)
    stem = name.rstrip(_DIGITS)  # a C loop: a model may have 50,000 such names
    return (stem, int(name[len(stem):])) if len(stem) < len(name) else None


def _label(names: list[str], stem: str) -> str:
    """'layer{0..11}' for runs of three or more, 'layer{0,1,5}' otherwise; ``names`` share ``stem``."""
    if len(names) == 1:
        return names[0]
    k = len(stem)
    nums = [n[k:] for n in names]
    ordered = sorted(zip(map(int, nums), nums))  # C loops: a run may hold 200,000 names
    text: list[str] = []
    start = 0
    for i in range(1, len(ordered) + 1):
        if i < len(ordered) and ordered[i][0] == ordered[i - 1][0] + 1:
            continue
        run = ordered[start:i]
        text.extend([f"{run[0][1]}..{run[-1][1]}"] if len(run) >= 3 else [n for _, n in run])
        start = i
    return f"{stem}{{{','.join(text)}}}"


def _tree_groups(node: "KeyNode", sigs: dict[int, int]) -> list[tuple[str, list["KeyNode"]]]:
    """Children of ``node`` as (label, members): consecutive numbered siblings with the same stem
    and the same signature become one group, whatever the numbering style."""
    groups: list[tuple[list[str], list[KeyNode], Any]] = []
    last = None  # the key of groups[-1]
    for name, child in node.children.items():  # `_numbered`'s stem, inlined: a model may have 50,000 children
        stem = "" if name.isdecimal() else name.rstrip(_DIGITS)
        if len(stem) == len(name):
            groups.append(([name], [child], None))
            last = None
            continue
        key = (stem, sigs[id(child)])
        if key == last:
            names, members, _ = groups[-1]
            names.append(name)
            members.append(child)
        else:
            groups.append(([name], [child], key))
            last = key
    return [(_label(names, "" if key is None else key[0]), members) for names, members, key in groups]


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
    order = key_trie_bottom_up(infos.items(), depth)
    root = order[-1]
    sigs, stats = _sigs_and_stats(order)
    rows: list[TreeRow] = []
    todo = [(label, members, "", 1, 1) for label, members in reversed(_tree_groups(root, sigs))]
    while todo:  # depth first, parents before children, in key order
        label, members, prefix, level, mult = todo.pop()
        if depth is not None and level > depth:
            continue
        rep = members[0]
        n = len(members) * mult
        params, count, dts = stats[id(rep)]
        path = prefix + label
        rows.append(TreeRow(path=path, name=label, depth=level, params=params * n, n_tensors=count * n,
                            dtypes=tuple(sorted(dts)), shape=None if rep.info is None else tuple(rep.info.shape),
                            repeat=n))
        todo.extend((lb, ms, path + ".", level + 1, n) for lb, ms in reversed(_tree_groups(rep, sigs)))
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
