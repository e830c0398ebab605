"""Per-rank files of a sharded model: ``torch.save(model.state_dict())`` run on each rank of an
FSDP2 (``fully_shard``) model, one file a rank (verl's ``model_world_size_N_rank_K.pt``, or any N
files ``*rank{K}*.pt|.bin`` in one folder), read as one checkpoint; and FSDP1's state dicts saved
so (accelerate's ``pytorch_model_fsdp_0_rank{K}.bin``): ShardedTensors, each rank's local shards
at the offsets its metadata gives, checked against every shard box the metadata lists (a
LOCAL_STATE_DICT's flat parameters consolidate as the flat tensors they are).

Each value of such a file is a DTensor: the rank's local tensor and its spec (the device mesh, the
placements, the global shape, stride and dtype). A global tensor ``Shard(d)`` on a 1-D mesh is made
of the ranks' local tensors at the offsets along ``d`` torch gives them (ceil(n / N) a rank, the
last ranks short or empty), checked to cover it exactly once; a ``Replicate()`` one is rank 0's
local tensor. Plain tensors (buffers left unsharded) are rank 0's. DTensor, DeviceMesh, the
placements and the spec's records load as inert records through the restricted unpickler: their
classes are never imported or called, no pickled code is run.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint, TensorInfo
from ..errors import FormatError, SelectError
from .chunks import certify, chunked, cover_problem
from .locate import tensor_infos
from .sharded import check_inside
from .torch_records import DType, Opaque, TensorRef, _opaque_class
from .torch_zip import read_zip

FORMAT = "torch-per-rank"
_RANKED = re.compile(r"^(?P<pre>.*rank[_-]?)(?P<rank>\d+)(?P<post>(?:\D.*)?\.(?:pt|bin))$")
_WORLD = re.compile(r"world_size_(\d+)")
_ACCEPT = frozenset({"torch.distributed.tensor.*", "torch.distributed._tensor.*", "torch.distributed.device_mesh.*",
                     "torch.distributed._mesh_layout.*", "torch.distributed._shard.*", "torch.distributed.remote_device.*"})
_SHARDED_TENSOR = "torch.distributed._shard.sharded_tensor.api.ShardedTensor"


class _Record(Opaque):
    """A record built with NEWOBJ's arguments (a NamedTuple such as TensorMeta): kept as ``args``."""

    def __new__(cls, *args: Any) -> Any:
        out = object.__new__(cls)
        out.args = args
        return out


def _wrapper(qualname: str) -> type:
    cls = _opaque_class(qualname)
    cls.wrapper = True  # torch_records builds it from _rebuild_wrapper_subclass and keeps its fields
    return cls


_RECORDS = {
    ("torch.distributed.tensor", "DTensor"): _wrapper("torch.distributed.tensor.DTensor"),
    ("torch.distributed.tensor.api", "DTensor"): _wrapper("torch.distributed.tensor.DTensor"),
    ("torch.distributed._tensor.api", "DTensor"): _wrapper("torch.distributed.tensor.DTensor"),
}
for _m in ("torch.distributed.tensor._dtensor_spec", "torch.distributed._tensor.placement_types"):
    _RECORDS[_m, "TensorMeta"] = type("TensorMeta", (_Record,), {"qualname": f"{_m}.TensorMeta"})
_RECORDS["torch.distributed._shard.sharded_tensor.api", "ShardedTensor"] = _wrapper(_SHARDED_TENSOR)


_PROCESS_GROUP_STATE = _opaque_class(f"{_SHARDED_TENSOR}.ProcessGroupState")


def _nested_class(owner: Any, name: Any) -> type:
    """``getattr(ShardedTensor, "ProcessGroupState")``, as FSDP1's ShardedTensor pickles its
    process group's record: one inert class, never Python's getattr; any other getattr is refused."""
    if getattr(owner, "qualname", None) != _SHARDED_TENSOR or name != "ProcessGroupState":
        raise FormatError(f"the pickle calls getattr({getattr(owner, 'qualname', type(owner).__name__)}, "
                          f"{str(name)[:40]!r}); only ShardedTensor's ProcessGroupState is read")
    return _PROCESS_GROUP_STATE


_RECORDS["builtins", "getattr"] = _nested_class


def _template(name: str) -> tuple[str, str, int] | None:
    m = _RANKED.match(name)
    return (m["pre"], m["post"], int(m["rank"])) if m else None


def _named_world(pre: str) -> int | None:
    m = _WORLD.search(pre)
    return int(m.group(1)) if m else None


def _groups(folder: Path) -> dict[tuple[str, str], dict[int, list[Path]]]:
    out: dict[tuple[str, str], dict[int, list[Path]]] = {}
    for f in sorted(folder.iterdir()):
        t = _template(f.name)
        if t and f.is_file():
            out.setdefault(t[:2], {}).setdefault(t[2], []).append(f)
    return out


def _candidates(folder: Path) -> dict[tuple[str, str], dict[int, list[Path]]]:
    """The rank file sets that may be the model's: those named ``model*`` if any (verl saves its
    optimizer's and extra state's per-rank files beside them), each of two files or more or naming
    a world of two ranks or more."""
    groups = {t: g for t, g in _groups(folder).items()
              if sum(map(len, g.values())) > 1 or (_named_world(t[0]) or 0) >= 1
              or _names_dtensor(min(g.items())[1][0])}  # a world of one rank
    models = {t: g for t, g in groups.items() if t[0].startswith("model")}
    return models or groups


def is_per_rank(p: Path) -> bool:
    """A folder of per-rank files holding DTensors or ShardedTensors, or one of those files (it
    stands for its set). Rank files of plain tensors (DDP's per-rank copies, ``ckpt_rank0.pt``) stay checkpoints of
    their own."""
    if p.is_dir():
        return any(_names_dtensor(min(g.items())[1][0]) for g in _candidates(p).values())
    t = _template(p.name)
    return bool(t and t[:2] in _candidates(p.parent) and _names_dtensor(p))


def members(folder: Path) -> set[Path]:
    """The files of the folder's rank sets that hold DTensors (what a scan lists as one checkpoint,
    the folder); its other files are checkpoints of their own."""
    return {f for g in _candidates(folder).values() if _names_dtensor(min(g.items())[1][0])
            for fs in g.values() for f in fs}


def _names_dtensor(path: Path) -> bool:
    """Whether the first MiB of a torch file (where torch.save puts data.pkl) names DTensor's or
    ShardedTensor's module (a key that merely contains "DTensor" does not)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
            return any(m in head for m in (b"torch.distributed.tensor", b"torch.distributed._tensor",
                                           b"torch.distributed._shard.sharded_tensor"))
    except OSError:
        return False


def _rank_files(p: Path, src: str) -> tuple[list[Path], int]:
    """Each rank's file, rank 0 first, and the world size; refused when the set is ambiguous, a
    rank is missing or twice, or a file names another world size."""
    folder = p if p.is_dir() else p.parent
    sets = _candidates(folder)
    if not p.is_dir():
        sets = {t: g for t, g in sets.items() if t == _template(p.name)[:2]}
    if len(sets) != 1:
        said = ", ".join(f"{pre}K{post}" for pre, post in sorted(sets)[:4])
        worlds = sorted({_named_world(pre) or 0 for pre, _ in sets})
        if len({(_WORLD.sub("", pre), post) for pre, post in sets}) == 1 and len(worlds) == len(sets):
            raise FormatError(f"{src}: rank files of worlds of {', '.join(map(str, worlds))} ranks ({said}); a "
                              f"rank's file is left from another run")
        raise FormatError(f"{src}: {len(sets)} sets of per-rank files ({said}); pass one of the files to choose")
    (pre, post), found = next(iter(sets.items()))
    twice = [r for r, fs in found.items() if len(fs) > 1]
    if twice:
        raise FormatError(f"{src}: two files for rank {twice[0]} ({', '.join(f.name for f in found[twice[0]])})")
    stem = _WORLD.sub("", pre)
    others = sorted({w for t in _groups(folder) if t[1] == post and t[0] != pre and _WORLD.sub("", t[0]) == stem
                     for w in [_named_world(t[0])] if w is not None})
    world = _named_world(pre) or max(found) + 1
    if others:
        raise FormatError(f"{src}: rank files of a world of {world} beside ones of a world of "
                          f"{', '.join(map(str, others))}; a rank's file is left from another run")
    missing = [r for r in range(world) if r not in found]
    extra = [r for r in found if r >= world]
    if missing or extra:
        what = f"rank {', '.join(map(str, missing[:8]))} missing" if missing else f"rank {extra[0]} beyond it"
        raise FormatError(f"{src}: {pre}K{post} names a world of {world} ranks but {len(found)} files are here "
                          f"({what})")
    return [found[r][0] for r in range(world)], world


def _fields(obj: Opaque) -> dict:
    """A record's fields: its BUILD state, a (dict, slots) pair merged."""
    state = obj.state
    if isinstance(state, tuple) and len(state) == 2 and all(isinstance(x, (dict, type(None))) for x in state):
        state = {**(state[0] or {}), **(state[1] or {})}
    if not isinstance(state, dict):
        raise TypeError(f"{obj!r} has no fields")
    return state


def _int(value: Any, what: str) -> int:
    """A field that must be an int (not a bool, a float or a string that int() would take)."""
    if type(value) is not int:
        raise TypeError(f"{what} is {str(value)[:40]!r}, not an int")
    return value


def _shape(values: Any, src: str, where: str) -> tuple[int, ...]:
    """A global shape as torch could hold it: at most 64 dims, each and their product below 2**63."""
    shape = tuple(_int(n, "a size") for n in values)
    if len(shape) > 64 or any(not 0 <= n < 1 << 63 for n in shape) or math.prod(max(n, 1) for n in shape) >= 1 << 63:
        raise FormatError(f"{src}: {where} has the global shape {list(shape)[:8]}, which no tensor has; the file is "
                          f"corrupt")
    return shape


def _placement(p: Any, src: str, where: str) -> tuple:
    kind = type(p).__name__
    if isinstance(p, Opaque) and p.qualname.endswith(".Shard"):
        return ("Shard", _int(_fields(p)["dim"], "a Shard's dim"))
    if isinstance(p, Opaque) and p.qualname.endswith(".Replicate"):
        return ("Replicate",)
    raise FormatError(f"{src}: {where} is placed as {kind}; only Shard(d) and Replicate() on a 1-D mesh are read")


def _dtensor(v: Opaque, src: str, where: str) -> dict:
    """A DTensor record's local tensor, placement, global shape and dtype, mesh size and coordinate."""
    d = _fields(v)
    local, spec = d["_local_tensor"], _fields(d["_spec"])
    if not isinstance(local, TensorRef) or local.kind != "dense":
        raise FormatError(f"{src}: {where}'s local tensor is not a plain tensor")
    placements = [_placement(p, src, where) for p in spec["placements"]]
    if len(placements) != 1:
        said = ", ".join(f"{p[0]}({p[1] if len(p) > 1 else ''})" for p in placements)
        raise FormatError(f"{src}: {where} is placed ({said}) on a {len(placements)}-D mesh; only 1-D meshes "
                          f"(FSDP2's) are read")
    shape, stride, dtype = spec["tensor_meta"].args
    if not isinstance(dtype, DType):
        raise TypeError("tensor_meta's dtype is not a dtype")
    mesh = _fields(spec["mesh"])
    ranks = mesh.get("_rank_map", mesh.get("mesh"))
    size = math.prod(ranks.shape) if isinstance(ranks, TensorRef) else None
    coord = mesh.get("_coordinate_on_dim")
    return {"kind": "dtensor", "local": local, "placement": placements[0], "shape": _shape(shape, src, where),
            "dtype": dtype.dtype, "size": size,
            "coord": _int(coord[0], "a mesh coordinate") if isinstance(coord, (tuple, list)) and coord else None}


def _sharded_tensor(v: Opaque, src: str, where: str) -> dict:
    """An FSDP1 ShardedTensor record: this rank's local shards at their offsets, the global shape
    and dtype, every rank's shard boxes (the metadata each file carries) and the world size."""
    local_shards, meta, pg = v.state[0], _fields(v.state[1]), v.state[2]
    dtype, shape = v.args[0], _shape(v.args[1], src, where)
    if not isinstance(dtype, DType):
        raise TypeError("the ShardedTensor's dtype is not a dtype")

    def box(m: Opaque) -> tuple:
        f = _fields(m)
        rank = _fields(f["placement"]).get("_rank") if isinstance(f["placement"], Opaque) else None
        return (tuple(_int(n, "an offset") for n in f["shard_offsets"]), tuple(_int(n, "a size") for n in f["shard_sizes"]),
                rank)

    local = []
    for shard in local_shards:
        f = _fields(shard)
        if not isinstance(f["tensor"], TensorRef) or f["tensor"].kind != "dense":
            raise FormatError(f"{src}: {where}'s local shard is not a plain tensor")
        local.append((box(f["metadata"])[0], f["tensor"]))
    world = _fields(pg).get("global_world_size") if isinstance(pg, Opaque) else None
    return {"kind": "sharded", "shape": shape, "dtype": dtype.dtype, "local": local,
            "boxes": sorted(box(m) for m in meta["shards_metadata"]),
            "size": _int(world, "the world size") if world is not None else None}


def _spec(v: Opaque, src: str, where: str) -> dict:
    return _sharded_tensor(v, src, where) if v.qualname == _SHARDED_TENSOR else _dtensor(v, src, where)


def open_per_rank(path: Path, accept: frozenset = frozenset(), select: str | None = None) -> Checkpoint:
    src = str(path)
    if select:
        raise SelectError(f"{src}: --select does not apply to per-rank files; they hold one state dict")
    files, world = _rank_files(Path(path), src)
    read = []
    for f in files:
        check_inside(f, files[0].parent / "rank file", src, f.name)
        up, offsets = read_zip(f, accept | _ACCEPT, extra=_RECORDS)
        if not isinstance(up.obj, dict):
            raise FormatError(f"{src}: {f.name} does not hold a state dict")
        read.append((up.obj, offsets))
    try:
        tensors, extras, kinds = _tensors(files, read, world, src)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
        raise FormatError(f"{src}: a DTensor record has a field of the wrong type ({type(e).__name__}: "
                          f"{str(e)[:100]}); the files are corrupt or from an unsupported torch") from None
    folder = files[0].parent
    sharded = [k for k, kind in kinds.items() if kind == "sharded"]
    flat = bool(sharded) and all(str(k).split(".")[-1] in ("_flat_param", "flat_param") for k in sharded)
    said = (f"FSDP1 flat parameters (LOCAL_STATE_DICT, {world} ranks): the names and shapes of the parameters inside "
            f"them are not in the files; load them into the FSDP-wrapped model, or save with SHARDED_STATE_DICT"
            if flat else f"per-rank state dicts of a sharded model ({folder.name}, {world} ranks)")
    ckpt = Checkpoint(path=Path(path), format=FORMAT, file_size=sum(os.path.getsize(f) for f in files),
                      tensors=tensors, extras=extras, files=[str(f) for f in files], description=said,
                      file_kind="flat_parameters" if flat else "state_dict")
    ckpt.certificate = certify(tensors, " and ".join(sorted({"dtensor": "DTensor specs",
                                                            "sharded": "ShardedTensor metadata"}[k]
                                                           for k in set(kinds.values()))), world)
    return ckpt


def _tensors(files: list[Path], read: list[tuple[dict, dict]], world: int, src: str):
    """The global tensors, in rank 0's order; rank 0's entries that are not tensors; the kinds of
    sharded tensor read ("dtensor", "sharded")."""
    specs = [{k: _spec(v, src, f"{f.name}: {k!r}") for k, v in obj.items()
              if isinstance(v, Opaque) and getattr(v, "wrapper", False)} for f, (obj, _) in zip(files, read)]
    if not specs[0]:
        raise FormatError(f"{src}: {files[0].name} holds no DTensor; not the state dict of a sharded model (open "
                          f"one file by its path)")
    for f, s in zip(files[1:], specs[1:]):
        odd = sorted(map(str, s.keys() ^ specs[0].keys()))
        if odd:
            raise FormatError(f"{src}: {odd[0]!r} is a sharded tensor in one of {files[0].name}, {f.name} only; the "
                              f"files are from different models or runs")
        mixed = next((k for k in s if s[k]["kind"] != specs[0][k]["kind"]), None)
        if mixed is not None:
            raise FormatError(f"{src}: {mixed!r} is a {_KIND_NAMES[specs[0][mixed]['kind']]} in {files[0].name} but a "
                              f"{_KIND_NAMES[s[mixed]['kind']]} in {f.name}; the files are from different runs")
    for f, s, (_, offsets) in zip(files, specs, read):
        _local_infos(s, offsets, f, src)
    obj, offsets = read[0]
    plain = tensor_infos({k: v for k, v in obj.items() if isinstance(v, TensorRef) and k not in specs[0]}, offsets,
                         str(files[0]), src)
    tensors: dict[str, TensorInfo] = {}
    extras: dict[str, str] = {}
    for k, v in obj.items():
        if k in specs[0] and specs[0][k]["kind"] == "sharded":
            tensors[k] = _global_sharded(k, [s[k] for s in specs], world, src)
        elif k in specs[0]:
            tensors[k] = _global(k, [s[k] for s in specs], [s[k]["info"] for s in specs], world, src)
        elif k in plain:
            tensors[k] = plain[k]
        else:
            extras[str(k)] = f"{type(v).__name__} (rank 0's)"
    return tensors, extras, {k: d["kind"] for k, d in specs[0].items()}


_KIND_NAMES = {"dtensor": "DTensor", "sharded": "ShardedTensor"}


def _local_infos(specs: dict, offsets: dict, file: Path, src: str) -> None:
    """Each spec's local tensors located in its rank's file: a DTensor's as ``info``, a
    ShardedTensor's shards as ``infos`` (each named after its tensor)."""
    refs = {}
    for k, d in specs.items():
        if d["kind"] == "sharded":
            refs.update({(k, i): ref for i, (_, ref) in enumerate(d["local"])})
        else:
            refs[k, None] = d["local"]
    keys = list(refs)
    found = tensor_infos({f"#{n}": refs[key] for n, key in enumerate(keys)}, offsets, str(file), src)
    for n, (k, i) in enumerate(keys):
        info = dataclasses.replace(found[f"#{n}"], name=str(k))
        if i is None:
            specs[k]["info"] = info
        else:
            specs[k].setdefault("infos", []).append(info)


def _global_sharded(name: str, specs: list[dict], world: int, src: str) -> TensorInfo:
    """A ShardedTensor from every rank's local shards, each where its metadata puts it; each
    rank's shards must be those every file's metadata gives that rank, and cover the tensor."""
    first = specs[0]
    shape, dtype, boxes = first["shape"], first["dtype"], first["boxes"]
    pieces = []
    for r, d in enumerate(specs):
        if d["size"] is not None and d["size"] != world:
            raise FormatError(f"{src}: rank {r}'s {name!r} was saved in a world of {d['size']} ranks, not the {world} "
                              f"the files say; a rank file is from another world size")
        if (d["shape"], d["dtype"], d["boxes"]) != (shape, dtype, boxes):
            raise FormatError(f"{src}: rank {r}'s {name!r} ({d['dtype']} {list(d['shape'])}, {len(d['boxes'])} "
                              f"shards) differs from rank 0's ({dtype} {list(shape)}, {len(boxes)} shards); the "
                              f"files are from different runs")
        want = collections.Counter((o, s) for o, s, rank in boxes if rank == r)
        for (offsets, _), info in zip(d["local"], d.get("infos", [])):
            if info.dtype != dtype:
                raise FormatError(f"{src}: rank {r} holds a {info.dtype} shard of {name!r}, which is {dtype}; the "
                                  f"files are corrupt or from different runs")
            if want[offsets, info.shape] <= 0:
                raise FormatError(f"{src}: rank {r} holds {list(info.shape)} at {list(offsets)} of {name!r}, a shard "
                                  f"its metadata does not give rank {r}")
            want[offsets, info.shape] -= 1
            pieces.append((offsets, info))
        if any(want.values()):
            raise FormatError(f"{src}: rank {r} holds {len(d['local'])} of the {len(d['local']) + sum(want.values())} "
                              f"shards of {name!r} its metadata gives it")
    problem = cover_problem(shape, [(o, p.shape) for o, p in pieces if math.prod(p.shape)])
    if problem:
        raise FormatError(f"{src}: {name!r} {list(shape)} is not covered exactly once by the ranks' shards: {problem}")
    pieces = [(o, p) for o, p in pieces if math.prod(p.shape)]
    if len(pieces) == 1 and pieces[0][1].shape == shape:
        return pieces[0][1]
    return chunked(name, dtype, shape, pieces)


def _global(name: str, specs: list[dict], infos: list[TensorInfo], world: int, src: str) -> TensorInfo:
    """The global tensor from each rank's local tensor and spec."""
    first = specs[0]
    shape, dtype, placement = first["shape"], first["dtype"], first["placement"]
    for r, d in enumerate(specs):
        if d["size"] is not None and d["size"] != world:
            raise FormatError(f"{src}: rank {r}'s {name!r} is on a mesh of {d['size']} ranks, not the {world} the "
                              f"files say; a rank file is from another world size")
        if (d["shape"], d["dtype"], d["placement"]) != (shape, dtype, placement) or d["local"].dtype != dtype:
            raise FormatError(f"{src}: rank {r}'s {name!r} ({d['dtype']} {list(d['shape'])}, {d['placement'][0]}) "
                              f"differs from rank 0's ({dtype} {list(shape)}, {placement[0]}); the files are from "
                              f"different runs")
    if placement[0] == "Replicate":
        for r, info in enumerate(infos):
            if info.shape != shape or info.dtype != dtype:
                raise FormatError(f"{src}: {name!r} is replicated as {dtype} {list(shape)} but rank {r} holds "
                                  f"{info.dtype} {list(info.shape)}")
        return infos[0]
    dim = placement[1]
    if not 0 <= dim < len(shape):
        raise FormatError(f"{src}: {name!r} {list(shape)} is placed as Shard({dim}), a dim it does not have")
    n = shape[dim]
    each = -(-n // world)
    pieces = []
    for r, (d, info) in enumerate(zip(specs, infos)):
        at = r if d["coord"] is None else d["coord"]
        lo = min(at * each, n)
        want = shape[:dim] + (max(0, min(n, lo + each) - lo),) + shape[dim + 1:]
        if info.shape != want:
            raise FormatError(f"{src}: rank {r} holds {list(info.shape)} of {name!r} {list(shape)}; Shard({dim}) on "
                              f"{world} ranks gives mesh coordinate {at} {list(want)}")
        if want[dim]:
            pieces.append(((0,) * dim + (lo,) + (0,) * (len(shape) - dim - 1), info))
    problem = cover_problem(shape, [(o, p.shape) for o, p in pieces])
    if problem:
        raise FormatError(f"{src}: {name!r} {list(shape)} is not covered exactly once by the ranks' pieces: {problem}")
    if not pieces:
        return infos[0]
    if len(pieces) == 1:
        return pieces[0][1]
    return chunked(name, dtype, shape, pieces)
