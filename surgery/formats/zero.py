"""DeepSpeed ZeRO checkpoint folders (stage 1, 2 and 3), read as their fp32 master weights.

``engine.save_checkpoint(OUT)`` writes ``OUT/latest`` (the tag, e.g. ``global_step2``) and
``OUT/TAG/``: a model states file (``mp_rank_00_model_states.pt``; at stage 3 one per rank,
``zero_pp_rank_R_mp_rank_00_model_states.pt``) with the module's state dict, ``param_shapes`` (the
trainable params of each group, in flat order), the frozen params and the buffer names, and one
``zero_pp_rank_R_mp_rank_00_optim_states.pt`` per rank with its piece of the fp32 master weights.
Stage 1/2: each group is one flat fp32 vector, padded to a multiple of 2 x world size and split in
equal partitions, one a rank, the params laid in it one after another (with the alignment padding
``param_alignment_paddings`` says). Stage 3: each param is split on its own, ceil(numel / world)
elements a rank (the last zero-padded), laid one after another in the rank's flat groups.

Each param becomes a tensor made of 1-D runs of the ranks' flat vectors (``chunks.chunked(...,
flat=True)``), checked to cover it exactly once. DeepSpeed's own records in the pickles (the ZeRO
stage enum, the loss scaler) load as inert records through the restricted unpickler: deepspeed is
never imported, no pickled code is run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

from ..checkpoint import FLOAT_DTYPES, Checkpoint, TensorInfo, contiguous_stride
from ..errors import FormatError, SelectError
from .chunks import certify, chunked, cover_problem
from .locate import tensor_infos
from .sharded import check_inside
from .torch_records import Opaque, TensorRef
from .torch_zip import read_zip

FORMAT = "deepspeed-zero"
DS_RECORDS = frozenset({"deepspeed.*"})  # DeepSpeed's pickled records, loaded inert (never imported)
MODEL_FILE = "mp_rank_00_model_states.pt"
_RANK_FILE = re.compile(r"^(?:bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_(optim|model)_states\.pt$")
_TAG = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")


def is_zero_folder(p: Path) -> bool:
    """A folder ``engine.save_checkpoint`` wrote (``latest`` beside ``global_step*/``), or one tag's folder."""
    if (p / "latest").is_file() and any(p.glob(f"*/*{MODEL_FILE}")):
        return True
    return any(p.glob(f"*{MODEL_FILE}"))


def _step_folder(p: Path, src: str) -> Path:
    """The tag folder: the one ``latest`` names, or ``p`` itself."""
    if any(p.glob(f"*{MODEL_FILE}")) or not (p / "latest").is_file():
        return p
    with open(p / "latest", "rb") as f:
        tag = f.read(256).decode("utf-8", "replace").strip()
    if not _TAG.match(tag) or tag in (".", ".."):
        raise FormatError(f"{src}: 'latest' holds {tag[:60]!r}, not a checkpoint tag such as global_step2")
    if not (p / tag).is_dir():
        raise FormatError(f"{src}: 'latest' names {tag!r}, but there is no such folder")
    check_inside(p / tag, p / "latest", src, tag)
    return p / tag


def _rank_files(folder: Path, kind: str, src: str) -> list[Path]:
    """The ``kind`` ("optim" or "model") file of each rank, rank 0 first; refused when one is
    missing, twice or for another model-parallel rank."""
    found: dict[int, Path] = {}
    for f in sorted(folder.iterdir()):
        m = _RANK_FILE.match(f.name)
        if not m or m.group(3) != kind:
            continue
        if m.group(2) != "00":
            raise FormatError(f"{src}: {f.name} is a model-parallel rank's file; only mp_rank_00 ZeRO checkpoints "
                              f"are read")
        rank = int(m.group(1))
        if rank in found:
            raise FormatError(f"{src}: two {kind} states files for rank {rank} ({found[rank].name}, {f.name})")
        found[rank] = f
    if not found:
        raise FormatError(f"{src}: no zero_pp_rank_*_{kind}_states.pt rank files in {folder.name}")
    missing = [r for r in range(max(found) + 1) if r not in found]
    if missing:
        raise FormatError(f"{src}: the {kind} states of rank{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(map(str, missing[:8]))} are missing ({len(found)} of {max(found) + 1} files)")
    return [found[r] for r in range(len(found))]


@dataclasses.dataclass
class _File:
    path: Path
    obj: dict
    offsets: dict

    def tensors(self, refs: dict[str, Any], src: str) -> dict[str, TensorInfo]:
        bad = [k for k, v in refs.items() if not isinstance(v, TensorRef) or v.kind != "dense"]
        if bad:
            raise FormatError(f"{src}: {self.path.name}: {bad[0]!r} is not a plain tensor")
        return tensor_infos(refs, self.offsets, str(self.path), src)


def _read(path: Path, accept: frozenset, src: str) -> _File:
    check_inside(path, path.parent / MODEL_FILE, src, path.name)
    up, offsets = read_zip(path, accept | DS_RECORDS)
    if not isinstance(up.obj, dict):
        raise FormatError(f"{src}: {path.name} does not hold a dict; not a DeepSpeed checkpoint file")
    return _File(path, up.obj, offsets)


def _value(x: Any) -> Any:
    """An enum DeepSpeed pickled (ZeroStageEnum.gradients) as its value."""
    return x.args[0] if isinstance(x, Opaque) and len(x.args) == 1 else x


def _stage_world(optim: list[_File], src: str) -> tuple[int, int]:
    stages, worlds = [], []
    for f in optim:
        osd = f.obj.get("optimizer_state_dict")
        if not isinstance(osd, dict) or "zero_stage" not in osd:
            raise FormatError(f"{src}: {f.path.name} has no optimizer_state_dict.zero_stage; not a ZeRO checkpoint")
        stages.append(_value(osd["zero_stage"]))
        count = osd.get("partition_count")
        worlds.append(max(count) if isinstance(count, list) and count else count)
    stage, world = stages[0], worlds[0]
    if stage not in (1, 2, 3) or any(s != stage for s in stages):
        said = ", ".join(map(str, stages))[:80]
        raise FormatError(f"{src}: the rank files say ZeRO stage {said}, not one of 1, 2, 3")
    if any(w != world for w in worlds):
        said = ", ".join(str(w)[:20] for w in worlds[:8])
        raise FormatError(f"{src}: the rank files disagree on the world size (partition_count {said}); a rank's file "
                          f"is from another run")
    if world != len(optim):
        raise FormatError(f"{src}: the optimizer states say a world of {world} ranks (partition_count) but "
                          f"{len(optim)} rank files are here; a rank's file is missing or left from another run")
    return stage, world


def open_zero(path: Path, accept: frozenset = frozenset(), select: str | None = None) -> Checkpoint:
    src = str(path)
    if select:
        raise SelectError(f"{src}: --select does not apply to a DeepSpeed ZeRO folder; it gives the fp32 master "
                          f"weights")
    folder = _step_folder(Path(path), src)
    optim = [_read(f, accept, src) for f in _rank_files(folder, "optim", src)]
    stage, world = _stage_world(optim, src)
    if stage < 3:
        if not (folder / MODEL_FILE).is_file():
            raise FormatError(f"{src}: {MODEL_FILE} is missing from {folder.name}")
        models = [_read(folder / MODEL_FILE, accept, src)]
    else:
        names = _rank_files(folder, "model", src)
        if len(names) != world:
            raise FormatError(f"{src}: {len(names)} model states files for a world of {world} ranks")
        models = [_read(f, accept, src) for f in names]
    try:
        tensors, extras = _tensors(models, optim, stage, world, src)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
        raise FormatError(f"{src}: a ZeRO record has a field of the wrong type ({type(e).__name__}: {str(e)[:100]}); "
                          f"the files are corrupt or from an unsupported DeepSpeed") from None
    files = [str(f.path) for f in (*models, *optim)]
    ckpt = Checkpoint(path=Path(path), format=FORMAT, file_size=sum(os.path.getsize(f) for f in files),
                      tensors=tensors, extras=extras, files=files,
                      description=f"DeepSpeed ZeRO stage {stage} checkpoint ({folder.name}, {world} ranks): "
                                  f"its fp32 master weights")
    ckpt.certificate = certify(tensors, "ZeRO param_shapes", world)
    return ckpt


def _tensors(models: list[_File], optim: list[_File], stage: int, world: int, src: str):
    """Buffers, frozen params, trainable params and shared names, in the order DeepSpeed's own
    consolidation gives them; and the module's entries none of them name."""
    m0 = models[0].obj
    module = m0["module"]
    shapes = m0["param_shapes"]
    if not isinstance(module, dict) or not isinstance(shapes, list):
        raise FormatError(f"{src}: {models[0].path.name} has no module state dict or param_shapes")
    tensors = _buffers(models[0], src)
    frozen = m0.get("frozen_param_shapes") or {}
    if stage < 3:
        tensors.update(_frozen2(models[0], frozen, src))
        groups = [_groups(f, "single_partition_of_fp32_groups", src) for f in optim]
        pads = optim[0].obj["optimizer_state_dict"].get("param_alignment_paddings")
        tensors.update(_trainable2(shapes, groups, pads, world, src))
    else:
        tensors.update(_frozen3(models, frozen, src))
        groups = [_groups(f, "fp32_flat_groups", src) for f in optim]
        tensors.update(_trainable3(shapes, groups, world, src))
    for alias, target in (m0.get("shared_params") or {}).items():
        if target in tensors:
            tensors[alias] = dataclasses.replace(tensors[target], name=alias)
    extras = {k: "module entry ZeRO's param_shapes do not name (not reconstructed, as DeepSpeed's own does not)"
              for k in module if k not in tensors}
    extras["ds_version"] = str(m0.get("ds_version"))
    return tensors, extras


def _buffers(model: _File, src: str) -> dict[str, TensorInfo]:
    """The module's buffers, a floating one in fp32 as DeepSpeed's consolidation gives it."""
    names = set(model.obj.get("buffer_names") or ())
    found = model.tensors({k: v for k, v in model.obj["module"].items() if k in names}, src)
    out = {}
    for name, t in found.items():
        if t.dtype in FLOAT_DTYPES and t.dtype != "F32":
            t = chunked(name, "F32", t.shape, [((0,) * len(t.shape), t)])  # one chunk, cast as it is copied
        out[name] = t
    return out


def _groups(f: _File, key: str, src: str) -> list[TensorInfo]:
    refs = f.obj["optimizer_state_dict"].get(key)
    if not isinstance(refs, list):
        raise FormatError(f"{src}: {f.path.name} has no {key}")
    infos = f.tensors({str(i): r for i, r in enumerate(refs)}, src)
    if any(len(t.shape) != 1 for t in infos.values()):
        raise FormatError(f"{src}: {f.path.name}: {key} holds a tensor that is not flat")
    return list(infos.values())


def _runs(name: str, segments: list[tuple[int, TensorInfo]], start: int, length: int, at: int) -> list:
    """``(offsets, piece)`` for elements [start, start + length) of the 1-D ``segments`` laid end
    to end (each ``(where it starts, flat tensor)``), placed at ``at`` in the flattened tensor."""
    out = []
    for begin, seg in segments:
        lo, hi = max(start, begin), min(start + length, begin + seg.shape[0])
        if lo < hi:
            step = (seg.stride or (1,))[0]
            piece = dataclasses.replace(seg, name=name, shape=(hi - lo,), stride=(1,),
                                        storage_offset=seg.storage_offset + (lo - begin) * step)
            out.append(((at + lo - start,), piece))
    return out


def _laid(tensors: list[TensorInfo]) -> tuple[list[tuple[int, TensorInfo]], int]:
    """Flat tensors laid end to end: each with where it starts, and the total length."""
    out, at = [], 0
    for t in tensors:
        out.append((at, t))
        at += t.shape[0]
    return out, at


def _whole(name: str, shape: tuple, pieces: list, src: str) -> TensorInfo:
    """The tensor of ``shape`` the runs ``pieces`` make: a view of one run, else a flat chunked tensor."""
    shape = tuple(int(n) for n in shape)
    numel = math.prod(shape)
    problem = cover_problem((numel,), [(o, p.shape) for o, p in pieces])
    if problem:
        raise FormatError(f"{src}: {name!r} {list(shape)} is not covered exactly once by the ranks' pieces: {problem}")
    if len(pieces) == 1:
        return dataclasses.replace(pieces[0][1], shape=shape, stride=contiguous_stride(shape))
    return chunked(name, pieces[0][1].dtype if pieces else "F32", shape, pieces, flat=True)


def _trainable2(shapes: list, groups: list[list[TensorInfo]], pads: Any, world: int, src: str) -> dict[str, TensorInfo]:
    """Stage 1/2: group g is the ranks' partitions g laid end to end, its params one after another."""
    if any(len(g) != len(shapes) for g in groups):
        raise FormatError(f"{src}: param_shapes names {len(shapes)} groups but a rank holds "
                          f"{sorted({len(g) for g in groups})} fp32 partitions")
    out: dict[str, TensorInfo] = {}
    align = 2 * world
    for g, params in enumerate(shapes):
        laid, avail = _laid([ranks[g] for ranks in groups])
        offset = 0
        for i, (name, shape) in enumerate(params.items()):
            numel = math.prod(shape)
            if offset + numel > avail:
                raise FormatError(f"{src}: group {g}'s params need more than the {avail:,} elements the ranks' "
                                  f"partitions hold (at {name!r}); the partitions do not add up to param_shapes")
            out[name] = _whole(name, shape, _runs(name, laid, offset, numel, 0), src)
            offset += numel + (int(pads[g][i]) if pads else 0)
        if -(-offset // align) != -(-avail // align):
            raise FormatError(f"{src}: group {g}'s params take {offset:,} elements but the ranks' partitions hold "
                              f"{avail:,}, more than the alignment padding; the partitions do not match param_shapes")
    return out


def _trainable3(shapes: list, groups: list[list[TensorInfo]], world: int, src: str) -> dict[str, TensorInfo]:
    """Stage 3: each param split on its own, ceil(numel / world) elements a rank, laid one after
    another in each rank's flat groups (the groups end to end)."""
    sizes = {tuple(t.shape[0] for t in g) for g in groups}
    if len(sizes) != 1:
        raise FormatError(f"{src}: the ranks' fp32 groups differ in size ({sorted(sizes)[:4]}); a rank's file is "
                          f"from another run")
    laid = [_laid(g) for g in groups]
    avail = laid[0][1]
    out: dict[str, TensorInfo] = {}
    offset = 0
    for name, shape in ((k, v) for d in shapes for k, v in d.items()):
        numel = math.prod(shape)
        each = -(-numel // world)
        if offset + each > avail:
            raise FormatError(f"{src}: the params need more than the {avail:,} elements each rank holds (at {name!r}); "
                              f"the partitions do not add up to param_shapes")
        pieces = []
        for r in range(world):
            n = min(numel, (r + 1) * each) - r * each
            if n > 0:
                pieces += _runs(name, laid[r][0], offset, n, r * each)
        out[name] = _whole(name, shape, pieces, src)
        offset += each
    if offset != avail:
        raise FormatError(f"{src}: the params take {offset:,} elements of each rank's {avail:,}; the partitions do "
                          f"not match param_shapes")
    return out


def _frozen2(model: _File, shapes: dict, src: str) -> dict[str, TensorInfo]:
    """Stage 1/2: each frozen param whole in the model states file."""
    frags = model.obj.get("frozen_param_fragments") or {}
    missing = [k for k in shapes if k not in frags]
    if missing:
        raise FormatError(f"{src}: frozen param {missing[0]!r} has no fragment in {model.path.name}")
    out = model.tensors({k: frags[k] for k in shapes}, src)
    for name, shape in shapes.items():
        if out[name].numel != math.prod(shape):
            raise FormatError(f"{src}: frozen param {name!r} holds {out[name].numel:,} elements, not {list(shape)}")
    return out


def _frozen3(models: list[_File], shapes: dict, src: str) -> dict[str, TensorInfo]:
    """Stage 3: each frozen param's ranks' fragments laid end to end, the padding at the end dropped."""
    frags = []
    for f in models:
        found = f.obj.get("frozen_param_fragments") or {}
        missing = [k for k in shapes if k not in found]
        if missing:
            raise FormatError(f"{src}: frozen param {missing[0]!r} has no fragment in {f.path.name}")
        frags.append(f.tensors({k: found[k] for k in shapes}, src))
    out = {}
    for name, shape in shapes.items():
        laid, avail = _laid([dataclasses.replace(r[name], shape=(r[name].numel,), stride=(1,)) for r in frags])
        numel = math.prod(shape)
        if avail < numel:
            raise FormatError(f"{src}: the ranks' fragments of frozen param {name!r} hold {avail:,} elements, "
                              f"fewer than {list(shape)}")
        out[name] = _whole(name, shape, _runs(name, laid, 0, numel, 0), src)
    return out
