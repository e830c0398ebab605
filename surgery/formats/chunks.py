"""Tensors stored in chunks, one per rank's piece (a DCP checkpoint of FSDP2/DTensor ranks): each
chunk read like any stored tensor, the global tensor assembled from them only when its data is
asked for, and the completeness certificate: every global tensor covered exactly once.

A chunked tensor is a :class:`~surgery.checkpoint.TensorInfo` of kind ``"chunked"``: its shape and
dtype are the global tensor's, ``parts`` its chunks (``"0"``, ``"1"``, ...) and ``params["offsets"]``
where each chunk starts in it (``checkpoint.materialize`` assembles it). A tensor whose chunks are runs of its flattened elements (a DeepSpeed
ZeRO rank's slice of a flat fp32 group) has ``params["flat"]``: its chunks are 1-D, their offsets
1-tuples into the flattened tensor. A chunk stored in another dtype is cast as it is copied into
place. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..checkpoint import TensorInfo
from ..errors import FormatError

KIND = "chunked"
CELLS_PER_CHUNK = 16  # grid cells the cover check may mark per chunk (a mesh's grid makes one each)


def chunked(name: str, dtype: str, shape: tuple[int, ...], chunks: Sequence[tuple[tuple[int, ...], TensorInfo]],
            flat: bool = False) -> TensorInfo:
    """The global tensor ``name`` made of ``chunks``: ``(offsets, chunk)`` pairs, in storage order;
    with ``flat``, 1-D chunks at offsets into the flattened tensor."""
    first = chunks[0][1] if chunks else None
    params: dict[str, Any] = {"offsets": [tuple(o) for o, _ in chunks]}
    if flat:
        params["flat"] = True
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), file=first.file if first else "", data_offset=0,
                      storage_nbytes=0, kind=KIND, parts={str(i): c for i, (_, c) in enumerate(chunks)},
                      params=params)


def cover_problem(shape: Sequence[int], boxes: Sequence[tuple[Sequence[int], Sequence[int]]]) -> str | None:
    """Why the boxes ``(offsets, sizes)`` do not cover ``shape`` exactly once, or None when they do:
    every box inside the tensor, no element in two boxes, none in no box. The boxes' faces cut the
    tensor into a grid of cells; each cell lies inside a box or outside all, so marking the cells
    each box holds decides the cover exactly."""
    dims = len(shape)
    for offsets, sizes in boxes:
        if len(offsets) != dims or len(sizes) != dims:
            return f"a chunk of rank {len(sizes)} in a tensor of rank {dims}"
        if any(o < 0 or s < 0 or o + s > n for o, s, n in zip(offsets, sizes, shape)):
            return f"chunk at {list(offsets)} of size {list(sizes)} reaches outside {list(shape)}"
    numel = math.prod(shape)
    covered = sum(math.prod(s) for _, s in boxes)
    if numel == 0:
        return None
    cuts = [sorted({0, n, *(o[d] for o, s in boxes if math.prod(s)), *(o[d] + s[d] for o, s in boxes if math.prod(s))})
            for d, n in enumerate(shape)]
    limit = CELLS_PER_CHUNK * len(boxes) + 64  # the check's work stays linear in the metadata's size
    if math.prod(len(c) - 1 for c in cuts) > limit:
        return f"{len(boxes)} chunks cut it into more than {limit:,} pieces, not a grid of ranks' pieces"
    where = [{x: i for i, x in enumerate(c)} for c in cuts]
    strides = [math.prod(len(c) - 1 for c in cuts[d + 1:]) for d in range(dims)]
    marked: set[int] = set()
    for offsets, sizes in boxes:
        if not math.prod(sizes):
            continue
        ranges = [range(where[d][offsets[d]], where[d][offsets[d] + sizes[d]]) for d in range(dims)]
        for cell in itertools.product(*ranges):  # stops at the first cell marked twice: work <= the cells
            flat = sum(i * s for i, s in zip(cell, strides))
            if flat in marked:
                return f"chunks overlap ({covered:,} elements stored for {numel:,})"
            marked.add(flat)
    if covered > numel:
        return f"chunks overlap ({covered:,} elements stored for {numel:,})"
    if len(marked) != math.prod(len(c) - 1 for c in cuts) or covered < numel:
        return f"chunks leave a gap ({covered:,} of {numel:,} elements stored)"
    return None


def split_dims(info: TensorInfo) -> list[int]:
    """The dims along which a chunked tensor is cut (dim 0 for FSDP; two for a 2-D mesh; dim 0 of
    the flattened tensor for one cut in flat runs)."""
    offsets = info.params.get("offsets", [])
    if info.params.get("flat"):
        return [0] if len({o[0] for o in offsets}) > 1 else []
    return [d for d in range(len(info.shape)) if len({o[d] for o in offsets}) > 1]


@dataclass
class Certificate:
    """What the cover check proved of a checkpoint stored in chunks: how many tensors, chunks,
    elements, and that each tensor's chunks cover it exactly once. ``digests`` (sha256 of each
    assembled tensor's bytes) are filled by the writer that assembles them."""

    source: str  # what the shapes were checked against, e.g. "DCP .metadata"
    ranks: int
    tensors: int
    chunked: int
    chunks: int
    elements: int
    split: dict[str, list[int]] = field(default_factory=dict)  # tensor -> the dims it is cut along
    digests: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        dims = sorted({tuple(d) for d in self.split.values()})
        along = ", ".join("dim " + "+".join(map(str, d)) for d in dims) or "none"
        return (f"{self.tensors:,} tensors in {self.chunks:,} chunks from {self.ranks} rank{'s' if self.ranks != 1 else ''} "
                f"({self.chunked:,} cut along {along}); each covered exactly once, {self.elements:,} elements, "
                f"checked against the {self.source}")

    def to_json(self) -> dict:
        return {"source": self.source, "ranks": self.ranks, "tensors": self.tensors, "chunked": self.chunked,
                "chunks": self.chunks, "elements": self.elements, "complete": True,
                "split": {k: list(v) for k, v in self.split.items()}, "digests": dict(self.digests)}


def refuse_gaps(src: str, gaps: list[str], pieces: str = "chunks") -> None:
    """One FormatError for every tensor ``gaps`` names (``"'name' [shape]: why"``), if any."""
    if gaps:
        raise FormatError(f"{src}: {len(gaps)} tensor{'s are' if len(gaps) > 1 else ' is'} not covered exactly once "
                          f"by the ranks' {pieces}, nothing was read: {'; '.join(gaps[:4])}"
                          f"{' ...' if len(gaps) > 4 else ''}")


def certify(tensors: dict[str, TensorInfo], source: str, ranks: int) -> "Certificate":
    """The certificate of a checkpoint whose chunked tensors each passed :func:`cover_problem`:
    ``source`` is what the shapes were checked against."""
    split = {n: d for n, t in tensors.items() if t.kind == KIND and (d := split_dims(t))}
    return Certificate(source=source, ranks=ranks, tensors=len(tensors), chunked=len(split),
                       chunks=sum(len(t.parts) if t.kind == KIND else 1 for t in tensors.values()),
                       elements=sum(t.numel for t in tensors.values()), split=split)


CERTIFICATE_KEY = "surgery.certificate"  # the metadata entry of an output written from chunks
# 64 characters, as long as the sha256 that replaces it; random per write, so that no tensor name
# or other metadata of the output can hold one
_TOKEN = "{}-{:047d}"
HASH_ON_THREAD = 1 << 20  # bytes from which a tensor is hashed beside its write


class Digests:
    """Each written tensor's sha256, taken as its bytes pass on their way to the output, for a
    source with a certificate (none is taken without one). The output's metadata holds the
    certificate with a placeholder per digest (:attr:`placeholder`); :meth:`final` says what
    replaces each once the tensors are written."""

    def __init__(self, certificate: Certificate | None, names: list[str]):
        self.certificate = certificate
        self.on = certificate is not None
        run = secrets.token_hex(8)
        self.tokens = {n: _TOKEN.format(run, i) for i, n in enumerate(names)} if self.on else {}
        self.sources: dict[str, Callable[[], bytes]] = {}
        self._job: tuple[threading.Thread, list] | None = None

    @property
    def placeholder(self) -> str:
        return self._json({n: "sha256:" + t for n, t in self.tokens.items()})

    def taken(self, name: str, source: Any) -> Any:
        """``source`` (a function returning the bytes), hashing what it returns."""
        if not self.on:
            return source

        def read() -> bytes:
            data = source()
            self._hash(name, data)
            return data

        self.sources[name] = source
        return read

    def _hash(self, name: str, data: Any) -> None:
        """Hash a large tensor on a thread while the writer writes it (hashlib lets go of the GIL):
        one tensor at a time, so at most two tensors' bytes are held."""
        self._wait()
        if len(data) < HASH_ON_THREAD:
            self.certificate.digests[name] = "sha256:" + hashlib.sha256(data).hexdigest()
            return
        failed: list = []

        def run() -> None:
            try:
                self.certificate.digests[name] = "sha256:" + hashlib.sha256(data).hexdigest()
            except BaseException as e:  # raised by _wait on the writer's thread
                failed.append(e)

        self._job = (threading.Thread(target=run, daemon=True), failed)
        self._job[0].start()

    def _wait(self) -> None:
        if self._job is not None:
            thread, failed = self._job
            thread.join()
            self._job = None
            if failed:
                raise failed[0]

    def final(self) -> dict[str, str]:
        """Placeholder -> digest for every tensor, and the whole placeholder certificate -> the
        final one (for an index file, which is written whole). A writer that did not read the
        entries (a torch file saves tensors) has its digests taken here."""
        if not self.on:
            return {}
        self._wait()
        digests = self.certificate.digests
        for name, src in self.sources.items():
            if name not in digests:
                digests[name] = "sha256:" + hashlib.sha256(src()).hexdigest()
        done = {self.tokens[n]: digests[n].removeprefix("sha256:") for n in self.tokens}
        return {**done, self.placeholder: self._json({n: digests[n] for n in self.tokens})}

    def _json(self, digests: dict[str, str]) -> str:
        return json.dumps({**self.certificate.to_json(), "digests": digests}, separators=(",", ":"), sort_keys=True)
