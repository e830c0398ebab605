"""Pure functions over key names, shared by inspect, diff, remap, adapt and the architecture guess.

Wrapper prefixes (``module.``, ``_orig_mod.``) and the shared first component a checkpoint's keys
carry; a trie of dotted names whose identical numbered siblings collapse into one label
(``layer1.{0,1}.conv1``), used by the module tree and by :func:`collapse_keys`. Nothing here
imports torch or reads a file.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Hashable, Iterable

# Same set, same rule as ``surgery remap --auto``: a prefix counts only when every key has it.
# ``_forward_module.``: Lightning's wrapper of the LightningModule (its DeepSpeed and FSDP checkpoints).
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_forward_module.")


# ----------------------------------------------------------------------------- prefixes

def _wraps(p: str, keys: list[str]) -> bool:
    """``p`` wraps these keys: every key carries it, or all but a few top-level names the wrapper
    keeps beside the wrapped model (``n_averaged`` of torch's AveragedModel, a step counter): at
    most one key in ten, none dotted, none clashing with a stripped name."""
    rest: list[str] = []
    allowed = len(keys) // 10
    for k in keys:  # clean keys (the common case) give up after a tenth of them
        if not (k.startswith(p) and len(k) > len(p)):
            rest.append(k)
            if len(rest) > allowed:
                return False
    if len(rest) == len(keys) or any("." in k for k in rest):
        return False
    return not rest or not set(rest) & {k[len(p):] for k in keys if k.startswith(p) and len(k) > len(p)}


def peel(key: str, prefix: str) -> str:
    """``key`` without ``prefix`` when it carries it (a wrapper's own entries do not)."""
    return key[len(prefix):] if prefix and key.startswith(prefix) and len(key) > len(prefix) else key


def detect_wrapper_prefixes(keys: Iterable[str]) -> list[str]:
    """Wrapper prefixes the keys carry (see ``_wraps``), in the order they are peeled.

    >>> detect_wrapper_prefixes(["_orig_mod.module.fc.weight", "_orig_mod.module.fc.bias"])
    ['_orig_mod.', 'module.']
    >>> detect_wrapper_prefixes(["module.fc.weight", "module.fc.bias", "n_averaged"])
    ['module.']
    """
    cur = list(keys)
    peeled: list[str] = []
    while cur:
        for p in WRAPPER_PREFIXES:
            if _wraps(p, cur):
                peeled.append(p)
                cur = [peel(k, p) for k in cur]
                break
        else:
            break
    return peeled


def strip_wrappers(keys: Iterable[str]) -> tuple[list[str], str]:
    """Keys without their wrapper prefixes, and the joined prefix that was removed ('' if none)."""
    keys = list(keys)
    prefixes = detect_wrapper_prefixes(keys)
    for p in prefixes:
        keys = [peel(k, p) for k in keys]
    return keys, "".join(prefixes)


def common_prefix(keys: Iterable[str]) -> str | None:
    """First dotted component shared by every key (after wrapper prefixes), with its dot.

    Lightning's ``model.``, a detector's ``backbone.``. None for a single key, or when some key
    is that component alone (it would be left without a name).

    >>> common_prefix(["module.model.fc.weight", "module.model.conv.weight"])
    'model.'
    """
    stripped, _ = strip_wrappers(keys)
    if len(stripped) < 2:
        return None
    first = stripped[0].split(".", 1)[0] + "."
    if first == "." or not all(k.startswith(first) and len(k) > len(first) for k in stripped):
        return None
    return first


# ----------------------------------------------------------------------------- key trie

class KeyNode:
    __slots__ = ("children", "info", "tails")

    def __init__(self) -> None:
        self.children: dict[str, KeyNode] = {}
        self.info: Any = None  # the TensorInfo (or True for bare keys) when a key ends here
        self.tails: list[tuple[tuple[str, ...], Any]] | None = None  # keys below a depth-bounded trie's floor


def key_trie(items: Iterable[tuple[str, Any]], depth: int | None = None) -> KeyNode:
    """The keys as a tree of their dotted parts. With ``depth``, no node lies deeper: a node at
    that depth keeps the rest of each longer key, with its info, in ``tails`` (a model of 50,000
    tensors then needs one node per module shown, not one per name part)."""
    return key_trie_bottom_up(items, depth)[-1]


def key_trie_bottom_up(items: Iterable[tuple[str, Any]], depth: int | None = None) -> list[KeyNode]:
    """`key_trie`'s nodes, children before their parent (as `bottom_up` orders them), the root
    last: a node is made after its parent, so the order they are made in, reversed, is one."""
    root = KeyNode()
    made = [root]
    floor = None if depth is None else max(depth, 0)
    for key, info in items:
        parts = key.split(".")
        node = root
        for part in parts[:floor]:
            nxt = node.children.get(part)
            if nxt is None:
                nxt = node.children[part] = KeyNode()
                made.append(nxt)
            node = nxt
        if floor is None or len(parts) <= floor:
            node.info = info
        elif node.tails is None:
            node.tails = [(tuple(parts[floor:]), info)]
        else:
            node.tails.append((tuple(parts[floor:]), info))
    made.reverse()
    return made


def bottom_up(root: KeyNode) -> list[KeyNode]:
    """Every node, children before their parent. A loop, not recursion: a key may hold
    thousands of dots."""
    order, stack = [], [root]
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(node.children.values())
    order.reverse()
    return order


def subtree_signatures(root: KeyNode, leaf_sig: Callable[[Any], Hashable], order: list[KeyNode] | None = None) -> dict[int, int]:
    """id(node) -> small int, equal for subtrees with the same names, nesting and leaf signatures
    (a node's ``tails`` are its subtree spelled out)."""
    interned: dict[tuple, int] = {}
    out: dict[int, int] = {}
    for node in order or bottom_up(root):
        out[id(node)] = node_signature(node, leaf_sig, out, interned)
    return out


def node_signature(node: KeyNode, leaf_sig: Callable[[Any], Hashable], sigs: dict[int, int], interned: dict[tuple, int]) -> int:
    """`subtree_signatures` of one node whose children's are in ``sigs`` (``interned``: the table
    of the signatures handed out so far)."""
    children = node.children
    if not children:
        kids: tuple = ()
    elif len(children) == 1:  # most modules of a large model hold one child: no sort, no generator
        for name, child in children.items():
            kids = ((name, sigs[id(child)]),)
    else:
        kids = tuple(sorted([(name, sigs[id(child)]) for name, child in children.items()]))
    tails = () if not node.tails else ((node.tails[0][0], leaf_sig(node.tails[0][1])),) if len(node.tails) == 1 \
        else tuple(sorted((t, leaf_sig(i)) for t, i in node.tails))
    key = (None if node.info is None else leaf_sig(node.info), kids, tails)
    return interned.setdefault(key, len(interned))


_INDEXED = re.compile(r"^(.*[_\-])?(\d+)$")
# a longer number is no index (no model has 10**18 blocks): such a name groups with nothing, and is
# never read as an int (Python refuses to parse one of over 4,300 digits, which a file may hold)
MAX_INDEX_DIGITS = 18


def _index_name(name: str) -> tuple[str, int] | None:
    """'3' -> ('', 3); 'encoder_layer_11' -> ('encoder_layer_', 11); 'conv1' -> None.

    Only bare numbers (nn.Sequential / ModuleList) and names numbered after a '_' or '-' count:
    ``conv1``/``conv2`` are distinct modules that merely look alike.
    """
    if name.isdecimal():  # the common case, nn.Sequential's children: no regular expression
        return ("", int(name)) if len(name) <= MAX_INDEX_DIGITS else None
    m = _INDEXED.match(name)
    return (m.group(1) or "", int(m.group(2))) if m and len(m.group(2)) <= MAX_INDEX_DIGITS else None


def _brace(names: list[str]) -> str:
    """Label for collapsed siblings: 'stem{0..5}' for a shared numbered stem, else '{a,b}'."""
    if len(names) == 1:
        return names[0]
    idx = [_index_name(n) for n in names]
    if all(i is not None for i in idx) and len({i[0] for i in idx}) == 1:  # type: ignore[index]
        stem = idx[0][0]  # type: ignore[index]
        ordered = sorted(zip((i[1] for i in idx), names))  # type: ignore[index]
        parts, run = [], [ordered[0]]
        for item in ordered[1:]:
            if item[0] == run[-1][0] + 1:
                run.append(item)
            else:
                parts.append(run)
                run = [item]
        parts.append(run)
        text = []
        for r in parts:
            if len(r) >= 3:
                text.append(f"{r[0][1][len(stem):]}..{r[-1][1][len(stem):]}")
            else:
                text.extend(n[len(stem):] for _, n in r)
        return f"{stem}{{{','.join(text)}}}"
    return "{" + ",".join(names) + "}"


def sibling_groups(node: KeyNode, sigs: dict[int, int], merge_leaves: bool) -> list[tuple[str, list[KeyNode]]]:
    """Children of ``node`` as (label, members). Consecutive numbered siblings with the same stem
    and the same signature become one group; with ``merge_leaves``, all childless siblings too."""
    groups: list[tuple[list[str], list[KeyNode], Any]] = []
    for name, child in node.children.items():
        idx = _index_name(name)
        if groups and idx is not None:
            names, members, gkey = groups[-1]
            if gkey == (idx[0], sigs[id(child)]):
                names.append(name)
                members.append(child)
                continue
        groups.append(([name], [child], None if idx is None else (idx[0], sigs[id(child)])))
    if merge_leaves:
        leaf_at = [i for i, g in enumerate(groups) if not g[1][0].children]
        if len(leaf_at) > 1:
            first = leaf_at[0]
            names = [n for i in leaf_at for n in groups[i][0]]
            members = [m for i in leaf_at for m in groups[i][1]]
            merged = (names, members, None)
            groups = [merged if i == first else g for i, g in enumerate(groups) if i == first or i not in leaf_at]
    return [(_brace(names), members) for names, members, _ in groups]


# ----------------------------------------------------------------------------- collapsed names

def collapse_keys(keys: Iterable[str]) -> list[str]:
    """Key names with numbered siblings of identical structure and leaf alternatives in braces.

    >>> collapse_keys(['layer4.0.bn2.weight', 'layer4.0.bn2.bias', 'layer4.1.bn2.weight', 'layer4.1.bn2.bias'])
    ['layer4.{0,1}.bn2.{weight,bias}']

    Only names are compared (no shapes). Top-level leaves stay one per line.
    """
    root = key_trie((k, True) for k in keys)
    sigs = subtree_signatures(root, lambda _: 1)
    out: list[str] = []
    todo = [(label, members, "") for label, members in reversed(sibling_groups(root, sigs, merge_leaves=False))]
    while todo:  # depth first, in key order; a loop, since keys may hold thousands of dots
        label, members, prefix = todo.pop()
        rep = members[0]
        if rep.info is not None:
            out.append(prefix + label)
        if rep.children:
            todo.extend((lb, ms, prefix + label + ".") for lb, ms in reversed(sibling_groups(rep, sigs, merge_leaves=True)))
    return out
