"""Bound what a pickle can build by reading its opcode bytes, before anything is unpickled.

The C unpickler is fast and never calls foreign code through `torch_pickle`'s hooks, but some of
its own work is unbounded: it sizes its memo table by the largest index a PUT names (one
LONG_BINPUT 0xFFFFFFFF allocates tens of GB), and it hashes dict keys and set members, which
walks a tuple recursively with no depth guard (a deep tuple crashes the interpreter) and no
caching (tuples that share one memo entry, billion-laughs style, take exponential time). Later
``str()`` of such an object has the same blow-up in memory. So `scan` simulates the pickle
machine's stack over the raw bytes, one table lookup per opcode (no `pickletools.genops`, no
decoding of arguments), and refuses a pickle that:

- nests objects deeper than MAX_DEPTH;
- builds any object, or does in all, more than a budget of work: an object's *expanded size*
  counts every element it reaches, shared ones as often as they are reached, and every byte of
  the strings among them; the budget is MAX_EXPANDED plus EXPANSION_PER_BYTE per byte of pickle
  (a checkpoint's objects expand to a few units per byte; a bomb to millions);
- names memo slots far beyond those it filled, holds an integer wider than MAX_INT_BYTES, or
  uses an opcode no checkpoint writer emits (protocol-5 buffers, copyreg extension codes).
"""

from __future__ import annotations

import re
import struct
from typing import Any

from ..errors import FormatError

MAX_DEPTH = 1000
MAX_EXPANDED = 4_000_000
EXPANSION_PER_BYTE = 32
WORK_FACTOR = 4  # all building work together: a few times the largest object allowed
MEMO_SLACK = 1 << 16
MAX_INT_BYTES = 1024  # 2466 decimal digits: below Python's int-to-str limit, far above any real count
MAX_INT_DIGITS = 2466


class Truncated(Exception):
    """The opcode stream runs past the bytes given: the caller may read more and scan again."""


# Opcode categories: what the scanner does with each byte value. Anything not listed is refused.
_PUT, _GET, _LEAF, _MARK, _SIZED, _BUILD, _MARKED, _LINE, _SKIP, _STOP, _MEMOIZE, _DUP, _WRAP1, _WRAP2, _PUT1, _TUPLE = range(1, 17)
_CAT = [0] * 256
_ARG = [0] * 256     # fixed argument bytes (_PUT/_GET/_LEAF/_SKIP); length-field bytes (_SIZED)
_POPS = [0] * 256    # _BUILD: objects popped
_MODE = [0] * 256    # _BUILD/_MARKED: 0 new object, 1 in place into the object below, 2 discard

for _ch, _n in ((b"q", 1), (b"r", 4)):
    _CAT[_ch[0]], _ARG[_ch[0]] = _PUT, _n
for _ch, _n in ((b"h", 1), (b"j", 4)):
    _CAT[_ch[0]], _ARG[_ch[0]] = _GET, _n
for _ch, _n in ((b"N", 0), (b"\x88", 0), (b"\x89", 0), (b"J", 4), (b"K", 1), (b"M", 2), (b"G", 8), (b")", 0)):
    _CAT[_ch[0]], _ARG[_ch[0]] = _LEAF, _n
# strings, bytes and long integers: a length field, then that many bytes
for _ch, _n in ((b"T", 4), (b"U", 1), (b"X", 4), (b"\x8c", 1), (b"\x8d", 8), (b"B", 4), (b"C", 1), (b"\x8e", 8),
                (b"\x96", 8), (b"\x8a", 1), (b"\x8b", 4)):
    _CAT[_ch[0]], _ARG[_ch[0]] = _SIZED, _n
_NEW, _IN_PLACE, _DISCARD = 0, 1, 2
for _ch, _n, _m in ((b"\x85", 1, _NEW), (b"\x86", 2, _NEW), (b"\x87", 3, _NEW), (b"R", 2, _NEW), (b"Q", 1, _NEW),
                    (b"\x81", 2, _NEW), (b"\x92", 3, _NEW), (b"\x93", 2, _NEW), (b"0", 1, _DISCARD),
                    (b"a", 1, _IN_PLACE), (b"s", 2, _IN_PLACE), (b"b", 1, _IN_PLACE)):
    _CAT[_ch[0]], _POPS[_ch[0]], _MODE[_ch[0]] = _BUILD, _n, _m
for _ch, _m in ((b"t", _NEW), (b"l", _NEW), (b"d", _NEW), (b"\x91", _NEW), (b"o", _NEW), (b"e", _IN_PLACE),
                (b"u", _IN_PLACE), (b"\x90", _IN_PLACE), (b"1", _DISCARD)):
    _CAT[_ch[0]], _MODE[_ch[0]] = _MARKED, _m
for _ch in b"]}\x8f":  # empty list, dict, set: filled in place later
    _CAT[_ch] = _LEAF
_FRESH = frozenset(b"]}\x8f")
for _ch in b"ILFSVPgpci":  # protocol 0: arguments end at a newline (GLOBAL and INST have two lines)
    _CAT[_ch] = _LINE
_CAT[b"("[0]], _CAT[b"."[0]], _CAT[b"\x94"[0]], _CAT[b"2"[0]] = _MARK, _STOP, _MEMOIZE, _DUP
for _ch in b"\x85Q":  # the commonest new objects, counted inline: TUPLE1, BINPERSID ...
    _CAT[_ch] = _WRAP1
for _ch in b"\x86R\x81\x93":  # ... TUPLE2, REDUCE, NEWOBJ, STACK_GLOBAL
    _CAT[_ch] = _WRAP2
_CAT[b"q"[0]] = _PUT1  # BINPUT: a one-byte index, never far past the slots filled
_CAT[b"t"[0]] = _TUPLE  # the commonest marked object, counted inline
_CAT[0x80], _ARG[0x80] = _SKIP, 1   # PROTO
_CAT[0x95], _ARG[0x95] = _SKIP, 8   # FRAME: its opcodes follow inline
_INT_OPS = frozenset(b"\x8a\x8b")
_SIGNED = frozenset(b"T\x8b")
_U32 = struct.Struct("<I")
_LEAF_NODE = (1, 0)


def scan(data: bytes, source: str, start: int = 0) -> int:
    """Check the pickle that starts at ``data[start]``; return the offset just past its STOP.

    Raises `FormatError` for a pickle outside the bounds above or a corrupt one, and
    `Truncated` when the opcodes run past the end of ``data``."""
    try:
        return _run(data, start, MAX_EXPANDED + EXPANSION_PER_BYTE * len(data), source)
    except (FormatError, Truncated):
        raise
    except (IndexError, ValueError, KeyError) as e:
        raise FormatError(f"{source}: corrupt pickle ({type(e).__name__} while reading its opcodes)") from None


def _refuse(source: str, what: str) -> FormatError:
    return FormatError(f"{source}: pickle {what}; no checkpoint does that, refusing it")


def _run(data: bytes, pos: int, limit: int, source: str) -> int:  # noqa: C901 - one loop is the point
    # One flat loop on purpose: it runs once per opcode of the pickle, and split into functions
    # every opcode would pay for Python calls.
    # Branches are ordered by how often torch.save's pickles use them (BINPUT/LONG_BINPUT, BINGET,
    # BININT1, TUPLE1, REDUCE, ...); a PUT after a new object is taken in the same step.
    end = len(data)
    cat_of, arg_of, mode_of, u32 = _CAT, _ARG, _MODE, _U32.unpack_from
    stack: list[Any] = []
    push = stack.append
    marks: list[int] = []
    memo: dict[int, Any] = {}
    leaf = _LEAF_NODE
    work_left = WORK_FACTOR * limit
    PUT1, PUT, GET, LEAF, WRAP1, WRAP2, TUPLE, MARK, SIZED = _PUT1, _PUT, _GET, _LEAF, _WRAP1, _WRAP2, _TUPLE, _MARK, _SIZED
    try:
        while True:
            op = data[pos]
            cat = cat_of[op]
            if cat == PUT1:
                memo[data[pos + 1]] = stack[-1]
                pos += 2
            elif cat == PUT:
                idx = u32(data, pos + 1)[0]
                pos += 5
                if idx > len(memo) + MEMO_SLACK:
                    raise _refuse(source, f"stores into memo slot {idx} after filling {len(memo)}")
                memo[idx] = stack[-1]
            elif cat == GET:
                push(memo[data[pos + 1] if op == 104 else u32(data, pos + 1)[0]])
                pos += arg_of[op] + 1
            elif cat == LEAF:
                pos += arg_of[op] + 1
                push([1, 0] if op in _FRESH else leaf)
            elif cat == WRAP1:
                pos += 1
                a = stack[-1]
                stack[-1] = [a[0] + 1, a[1] + 1]
                work_left -= a[0] + 1
                if a[1] >= MAX_DEPTH or a[0] >= limit or work_left < 0:
                    raise _too_big(a[1] + 1, source)
            elif cat == WRAP2:
                pos += 1
                b = stack.pop()
                a = stack[-1]
                size, depth = a[0] + b[0] + 1, (a[1] if a[1] > b[1] else b[1]) + 1
                stack[-1] = [size, depth]
                work_left -= size
                if depth > MAX_DEPTH or size > limit or work_left < 0:
                    raise _too_big(depth, source)
                if data[pos] == 114:  # the LONG_BINPUT that stores the new object, taken in this step
                    idx = u32(data, pos + 1)[0]
                    if idx > len(memo) + MEMO_SLACK:
                        raise _refuse(source, f"stores into memo slot {idx} after filling {len(memo)}")
                    memo[idx] = stack[-1]
                    pos += 5
            elif cat == TUPLE or (cat == _MARKED and mode_of[op] == _NEW):  # TUPLE, LIST, DICT, FROZENSET, OBJ
                pos += 1
                k = marks.pop()
                size, depth = 1, 0
                for c in stack[k:]:
                    size += c[0]
                    if c[1] > depth:
                        depth = c[1]
                del stack[k:]
                push([size, depth + 1])
                work_left -= size
                if depth >= MAX_DEPTH or size > limit or work_left < 0:
                    raise _too_big(depth + 1, source)
                if data[pos] == 114:  # the LONG_BINPUT that stores the new object, taken in this step
                    idx = u32(data, pos + 1)[0]
                    if idx > len(memo) + MEMO_SLACK:
                        raise _refuse(source, f"stores into memo slot {idx} after filling {len(memo)}")
                    memo[idx] = stack[-1]
                    pos += 5
            elif cat == MARK:
                pos += 1
                marks.append(len(stack))
            elif cat == SIZED:
                if op == 88:  # BINUNICODE: maybe the name of a run of tensors as torch.save writes them
                    done = _tensor_run(data, pos, stack, memo, limit, work_left)
                    if done is not None:
                        pos, work_left = done
                        continue
                w = arg_of[op]
                if w == 4:
                    n = u32(data, pos + 1)[0]
                    if n >= 1 << 31 and op in _SIGNED:
                        raise _refuse(source, "declares a negative length")
                else:
                    n = data[pos + 1] if w == 1 else int.from_bytes(data[pos + 1:pos + 9], "little")
                if n > MAX_INT_BYTES and op in _INT_OPS:
                    raise _refuse(source, f"holds a {n}-byte integer")
                pos += 1 + w + n
                if pos > end:
                    raise Truncated()
                push((1 + n, 0))
                if data[pos] == 114:  # the LONG_BINPUT that stores the new object, taken in this step
                    idx = u32(data, pos + 1)[0]
                    if idx > len(memo) + MEMO_SLACK:
                        raise _refuse(source, f"stores into memo slot {idx} after filling {len(memo)}")
                    memo[idx] = stack[-1]
                    pos += 5
            else:
                pos, work_left = _rare(data, pos, op, cat, stack, marks, memo, limit, work_left, source)
                if cat == _STOP:
                    return pos
    except (IndexError, struct.error):
        if pos >= end - 8:  # an argument or the next opcode lies past the bytes given
            raise Truncated() from None
        raise _refuse(source, "pops an empty stack or mark") from None


# One dict entry of a state dict as torch.save (pickle protocol 2) writes it, once the rebuild
# function, the 'storage' tag, the storage type, the location and OrderedDict are memoized and
# 256 memo slots are filled (every PUT is then a LONG_BINPUT: 'r' and a 4-byte slot):
#   X name PUT  GET(_rebuild_tensor_v2) ( ( GET('storage') GET(type) X key PUT GET(location) INT t PUT Q
#   INT(offset) SHAPE PUT? STRIDE PUT? NEWFALSE GET(OrderedDict) ) R PUT t PUT R PUT
# `_tensor_run` accounts for such entries exactly as `_run` would, one entry per step instead of
# one opcode per step. `_run` reads an entry's opcodes, its strings' lengths and the memo slots it
# reads and stores, never a string's characters nor an int's value. Entries alike in all it reads
# but their names and the slots they store share a *template* (`_template`): what `_run` counts
# for them, worked out once from the memo, and their bytes after the name, with the bytes `_run`
# ignores masked out and with PUTs of slots 0, 1, ... (``base``). An entry whose PUTs store slots
# n, n+1, ... (torch.save's do) is one of the template exactly when its bytes, read as one
# little-endian integer v, give
#   v & mask == base + n * step      (n: its first PUT's slot; step: a 1 in each PUT's slot field)
# as long as n + 7 < 2**32 (checked), so that no slot carries into the byte after it. Anything else
# (no template fits, a bound is near, the PUTs store other slots) goes back to `_run`, which takes
# it opcode by opcode and raises the precise error.
_INT_RX = rb"(?:K.|M..|J....)"
_GET_RX = rb"(?:h.|j....)"
_SHAPE_RX = rb"(\)|" + _INT_RX + rb"\x85|" + _INT_RX * 2 + rb"\x86|" + _INT_RX * 3 + rb"\x87|\(" + _INT_RX + rb"*t)"
# Finds an entry's template where no guess fits. The groups: 1 the memo slots it reads first and
# the key's length, 2 the location's slot, 3 and 4 the opcodes of the storage's size and of the
# offset, 5 the shape, 6 b"r" when a PUT follows it, 7 and 8 the same for the stride, 9 the
# OrderedDict's slot. torch.save writes the key as a decimal number.
_ENTRY = re.compile(
    rb"r....(" + _GET_RX + rb"\(\(" + _GET_RX * 2 + rb"X.\x00\x00\x00)[0-9]+r....(" + _GET_RX + rb")(?=([KMJ]))"
    + _INT_RX + rb"tr....Q(?=([KMJ]))" + _INT_RX + _SHAPE_RX + rb"(?=(r?))(?:r....)?" + _SHAPE_RX
    + rb"(?=(r?))(?:r....)?([\x88\x89]" + _GET_RX + rb")\)Rr....tr....Rr....", re.S)
_HEAD = re.compile(rb"(h.|j....)\(\((h.|j....)(h.|j....)X(.)", re.S)
_INT_VALUES = re.compile(rb"(K).|(M)..|(J)....", re.S)  # ints as their opcodes alone: `_INT_VALUES.sub(rb"\1\2\3", b)`
_VALUE_BYTES = {75: 1, 77: 2, 74: 4}  # the value bytes after BININT1, BININT2, BININT
_LAST_FIRST_SLOT = (1 << 32) - 8  # n + 7 still fits 4 bytes: no slot carries into the byte after it
_RANK_OP = {0x85: (2, 2), 0x86: (3, 3), 0x87: (4, 3)}  # TUPLE1-3 of ints: (size, work) as `_run` counts them


def _shape_node(ops: bytes) -> tuple[int, int, int]:
    """A shape or stride tuple of ints, by its opcodes: (size, depth) of its node and the work `_run` charges."""
    if ops == b")":
        return 1, 0, 0
    if ops[-1] != 116:  # TUPLE1, TUPLE2, TUPLE3
        size, work = _RANK_OP[ops[-1]]
        return size, 1, work
    n = len(ops) - 2  # MARK, the ints, TUPLE
    return 1 + n, 1, 1 + n


def _parts(ops: bytes) -> list:
    """The layout parts (see `_template`) of opcodes whose ints' values are left out."""
    out: list = []
    for op in ops:
        out.append(bytes((op,)))
        if op in _VALUE_BYTES:
            out.append(_VALUE_BYTES[op])
    return out


def _tensor_run(data: bytes, pos: int, stack: list, memo: dict, limit: int, work_left: int) -> tuple[int, int] | None:
    """Account for the state-dict entries that start at ``pos``; None when not one is there."""
    end, start = len(data), pos
    u32 = _U32.unpack_from
    # A template's counts hold while no PUT stores into a slot it read: an entry is taken here
    # only if its slots are all above ``read``, the largest slot any template of this call read.
    # (A PUT may store into another slot filled before: `_run` would too, and the memo ends up the
    # same.) The slack check below holds the largest slot to the fewest filled: `_run`'s, or
    # stricter. A file's entries come in a few templates, often in a cycle (a layer's weight,
    # bias, ...): each template keeps the two that came after it last, which are tried first.
    templates: dict[tuple, list | None] = {}
    read = -1
    after: list = []  # the templates that came after the entry before's, the latest first
    while pos + 5 < end and data[pos] == 88:
        p = pos + 5 + u32(data, pos + 1)[0]
        for tp in after:
            n = _first_slot(tp, data, p)
            if n >= 0:
                break
        else:  # none of them: find the template by the entry's bytes
            tp = _find_template(data, p, memo, templates, limit)
            if tp is None:
                break
            read = max(read, tp[1])
            n = _first_slot(tp, data, p)
            if n < 0:
                break
        c, length, key_node, p0, p1, a0, a1, t0, t1, work, h0, h1, shape, stride = tp[2]
        if n <= read or n + c - 1 > len(memo) + MEMO_SLACK or n > _LAST_FIRST_SLOT or work_left < work:
            break
        if not after or after[0] is not tp:
            after[:] = [tp] + after[:1]
        after = tp[-1]
        work_left -= work
        name = (p - pos - 4, 0)  # 1 + its length, as `_run` counts a string
        tn = [t0, t1]
        memo[n] = name
        memo[n + 1] = key_node
        memo[n + 2] = [p0, p1]
        if shape is not None:
            memo[n + 3] = [shape[0], shape[1]] if shape[1] else _LEAF_NODE
            n += 1
        if stride is not None:
            memo[n + 3] = [stride[0], stride[1]] if stride[1] else _LEAF_NODE
            n += 1
        memo[n + 3] = [h0, h1]
        memo[n + 4] = [a0, a1]
        memo[n + 5] = tn
        stack += (name, tn)
        pos = p + length
    for tp in templates.values():  # successor lists make cycles, which a paused gc would keep
        if tp is not None:
            tp[-1].clear()
    return None if pos == start else (pos, work_left)


def _first_slot(tp: list, data: bytes, p: int) -> int:
    """The slot the entry at ``p`` stores first, if it is one of template ``tp``; else -1."""
    length, mask, base, step = tp[0]
    b = data[p:p + length]
    v = int.from_bytes(b, "little")
    n = v >> 8 & 0xFFFFFFFF
    return n if v & mask == base + n * step and len(b) == length else -1


def _find_template(data: bytes, p: int, memo: dict, templates: dict, limit: int) -> list | None:
    """The template of the entry at ``p``, made when first met; None when there is no entry
    there, a memo slot it reads is empty, or the tensor alone is past a bound (`_run` says which)."""
    m = _ENTRY.match(data, p)
    if m is None:
        return None
    head, loc, size_op, offset_op, shape, shape_put, stride, stride_put, od = m.groups()
    named = (head, loc, size_op, offset_op, _INT_VALUES.sub(rb"\1\2\3", shape), shape_put,
             _INT_VALUES.sub(rb"\1\2\3", stride), stride_put, od)
    if named not in templates:
        templates[named] = _template(memo, named, limit)
    return templates[named]


def _template(memo: dict, named: tuple, limit: int) -> list | None:
    """[the entry's bytes as (length, mask, base, step), the largest slot it reads, what `_run`
    counts for it, the templates that came after it] for `_find_template`'s key."""
    head, loc, size_op, offset_op, shape, shape_put, stride, stride_put, od = named
    fn, tag, stype, klen = _HEAD.match(head).groups()
    slots = [int.from_bytes(x[1:], "little") for x in (fn, tag, stype, loc, od[1:])]
    try:
        c, s, ty, lc, o = (memo[k] for k in slots)
    except KeyError:
        return None
    lk = klen[0]
    sh, st = _shape_node(shape), _shape_node(stride)
    p0, p1, h0, h1 = s[0] + ty[0] + lc[0] + 3 + lk, max(s[1], ty[1], lc[1]) + 1, o[0] + 2, o[1] + 1
    a0 = p0 + sh[0] + st[0] + h0 + 4
    a1 = max(p1 + 1, sh[1], st[1], h1) + 1
    t0, t1 = c[0] + a0 + 1, (c[1] if c[1] > a1 else a1) + 1
    work = 2 * p0 + 1 + sh[2] + st[2] + h0 + a0 + t0
    if t1 > MAX_DEPTH or t0 > limit:
        return None
    # the entry's bytes after its name, in order: None for a PUT, a number for that many bytes
    # `_run` ignores (the key's characters, ints' values), else the bytes themselves
    parts = [None, head, lk, None, loc, *_parts(size_op), b"t", None, b"Q", *_parts(offset_op), *_parts(shape),
             *([None] if shape_put else []), *_parts(stride), *([None] if stride_put else []), od, b")R", None,
             b"t", None, b"R", None]
    base, mask, step, puts = bytearray(), bytearray(), 0, 0
    for part in parts:
        if part is None:  # a PUT of slot n + puts: 'r', then the slot's 4 bytes
            step |= 1 << (8 * len(base) + 8)
            base += b"r" + puts.to_bytes(4, "little")
            mask += b"\xff" * 5
            puts += 1
        elif type(part) is int:
            base += bytes(part)
            mask += bytes(part)
        else:
            base += part
            mask += b"\xff" * len(part)
    layout = (len(base), int.from_bytes(mask, "little"), int.from_bytes(base, "little"), step)
    counts = (puts, len(base), (1 + lk, 0), p0, p1, a0, a1, t0, t1, work, h0, h1,
              sh[:2] if shape_put else None, st[:2] if stride_put else None)
    return [layout, max(slots), counts, []]


def _rare(data: bytes, pos: int, op: int, cat: int, stack: list, marks: list, memo: dict, limit: int, work_left: int,
          source: str) -> tuple[int, int]:
    """The opcodes a torch checkpoint uses a few times at most (or that refuse the pickle)."""
    if cat == _BUILD:
        k = _POPS[op]
        if len(stack) < k:
            raise _refuse(source, "pops an empty stack")
        kids = stack[-k:]
        del stack[-k:]
        return pos + 1, _attach(stack, kids, _MODE[op], limit, work_left, source)
    if cat == _MARKED:
        k = marks.pop()
        kids = stack[k:]
        del stack[k:]
        return pos + 1, _attach(stack, kids, _MODE[op], limit, work_left, source)
    if cat == _MEMOIZE:
        memo[len(memo)] = stack[-1]
        return pos + 1, work_left
    if cat == _DUP:
        stack.append(stack[-1])
        return pos + 1, work_left
    if cat == _SKIP:
        return pos + _ARG[op] + 1, work_left
    if cat == _LINE:
        return _line_op(data, pos, op, stack, marks, memo, limit, work_left, source)
    if cat == _STOP:
        if len(stack) != 1 or marks:
            raise _refuse(source, "stops with a malformed stack")
        return pos + 1, work_left
    raise _refuse(source, f"uses opcode 0x{op:02x} at offset {pos}")


def _attach(stack: list, kids: list, mode: int, limit: int, work_left: int, source: str) -> int:
    """Account for ``kids`` joining a new object (pushed) or the object now on top of the stack."""
    size = 0
    depth = 0
    for c in kids:
        size += c[0]
        if c[1] > depth:
            depth = c[1]
    if mode == _NEW:
        node = [size + 1, depth + 1]
        stack.append(node)
    elif mode == _IN_PLACE:
        if not stack:
            raise _refuse(source, "pops an empty stack")
        node = stack[-1]
        if type(node) is tuple:  # a string or number: the unpickler fails on it, nothing grows
            return work_left
        node[0] += size
        if depth + 1 > node[1]:
            node[1] = depth + 1
    else:
        return work_left
    work_left -= size
    if node[1] > MAX_DEPTH or node[0] > limit or work_left < 0:
        raise _too_big(node[1], source)
    return work_left


def _too_big(depth: int, source: str) -> FormatError:
    if depth > MAX_DEPTH:
        return _refuse(source, f"nests objects more than {MAX_DEPTH} levels deep")
    return _refuse(source, "references shared objects so often that it expands past the elements and bytes "
                           "its size allows (a pickle bomb)")


def _line_op(data: bytes, pos: int, op: int, stack: list, marks: list, memo: dict, limit: int, work_left: int,
             source: str) -> tuple[int, int]:
    """Protocol-0 opcodes, whose arguments are text lines."""
    nl = data.find(b"\n", pos + 1)
    if nl < 0:
        raise Truncated()
    arg = data[pos + 1:nl]
    if op in b"ci":  # GLOBAL / INST: module and name lines
        nl = data.find(b"\n", nl + 1)
        if nl < 0:
            raise Truncated()
    pos = nl + 1
    if op in b"IL" and len(arg) > MAX_INT_DIGITS:
        raise _refuse(source, f"holds a {len(arg)}-digit integer")
    if op == b"p"[0]:
        idx = int(arg)
        if idx > len(memo) + MEMO_SLACK:
            raise _refuse(source, f"stores into memo slot {idx} after filling {len(memo)}")
        memo[idx] = stack[-1]
    elif op == b"g"[0]:
        stack.append(memo[int(arg)])
    elif op == b"i"[0]:
        k = marks.pop()
        kids = stack[k:]
        del stack[k:]
        work_left = _attach(stack, kids, _NEW, limit, work_left, source)
    elif op == b"P"[0] or op == b"c"[0]:
        stack.append([1, 0])
    else:
        stack.append((1 + len(arg), 0))
    return pos, work_left


__all__ = ["scan", "Truncated", "MAX_DEPTH", "MAX_EXPANDED", "MAX_INT_BYTES"]
