"""``surgery trust DIR``: review the factory file a folder's manifest pins, and re-pin it only when asked.

A folder built from a file factory (``--arch file.py:fn`` at adapt) runs that file only with
``--trust-code`` and only while its sha256 is the one pinned in ``manifest.json``
(:func:`~surgery.adapter.arch.check_trust`). Once the file changes, even by a comment, the folder
is refused. :func:`review_factory` shows what the folder would run (the file, its size, the pinned
and the current sha256); :func:`repin_factory` records the current sha256 in the manifest, atomically.
Re-pinning is never automatic, and nothing here imports or runs the factory.

    >>> review_factory("run/").status  # doctest: +SKIP
    'changed'
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .adapter.arch import ArchSpec, factory_candidates
from .adapter.manifest import MANIFEST_NAME, read_manifest, write_json
from .errors import TrustError
from .io import atomic_file, sha256_file

SCHEMA = "surgery.trust/1"

# what review_factory finds: no code at all, code that is not a file (nothing to hash), a file
# factory whose file is missing, matches its pin, has changed, or was never pinned
STATUSES = ("no-code", "not-a-file", "missing", "matches", "changed", "unpinned")


@dataclass
class TrustReport:
    folder: str
    kind: str  # the manifest's arch.kind: torchvision, timm, file or module
    arch: str  # what the manifest builds, as adapt's --arch names it
    is_code: bool  # whether building runs code (and so needs --trust-code)
    status: str  # one of STATUSES
    factory: str | None = None  # the file the folder runs: the one matching the pin, else the first found
    size: int | None = None
    pinned_sha256: str | None = None
    current_sha256: str | None = None
    files: list[dict] = field(default_factory=list)  # every place looked at: path, exists, size, sha256
    repinned: bool = False

    def to_json(self) -> dict:
        return {"schema": SCHEMA, **asdict(self)}


def review_factory(folder: str | os.PathLike) -> TrustReport:
    """What ``folder``'s manifest builds the model with and whether its factory file still has
    the pinned sha256. Reads the manifest and hashes the file; changes nothing, runs nothing."""
    m = read_manifest(folder)
    where = m.path or Path(folder)
    spec = ArchSpec.from_json(m["arch"])
    rep = TrustReport(str(where), spec.kind, spec.display, spec.is_code, "no-code", pinned_sha256=spec.sha256)
    if not spec.is_code:
        return rep
    if spec.kind != "file":
        rep.status = "not-a-file"
        return rep
    rep.files = [_look(p) for p in factory_candidates(spec, where)]
    found = [f for f in rep.files if f["exists"]]
    if not found:
        rep.status = "missing"
        return rep
    chosen = next((f for f in found if f["sha256"] == spec.sha256), found[0])
    rep.factory, rep.size, rep.current_sha256 = chosen["path"], chosen["size"], chosen["sha256"]
    rep.status = "unpinned" if not spec.sha256 else "matches" if chosen["sha256"] == spec.sha256 else "changed"
    return rep


def repin_factory(folder: str | os.PathLike) -> TrustReport:
    """Pin the sha256 the factory file has now in ``folder``'s manifest (``arch.sha256``), after
    :func:`review_factory` found it changed or unpinned; the manifest is replaced atomically and
    nothing else is touched. A file that still matches is left as it is (``repinned`` False)."""
    rep = review_factory(folder)
    if rep.status in ("no-code", "not-a-file"):
        what = ("builds the model by name and runs no code" if rep.status == "no-code" else
                f"builds the model with code ({rep.kind} {rep.arch}) that is not a file to pin")
        raise TrustError(f"{rep.folder}: its manifest {what}; there is nothing to re-pin")
    if rep.status == "missing":
        raise TrustError(f"{rep.folder}: the manifest's factory file is not there "
                         f"({' or '.join(f['path'] for f in rep.files)}); put it back, or re-run surgery adapt")
    if rep.status == "matches":
        return rep
    path = Path(rep.folder) / MANIFEST_NAME
    data = json.loads(path.read_text(encoding="utf-8"))
    if data["arch"].get("sha256") != rep.pinned_sha256:
        raise TrustError(f"{path}: changed while it was being reviewed; run surgery trust again")
    data["arch"]["sha256"] = rep.current_sha256
    with atomic_file(path) as tmp:
        write_json(tmp, data)
    rep.repinned = True
    return rep


def _look(path: Path) -> dict:
    if not path.is_file():
        return {"path": str(path), "exists": False, "size": None, "sha256": None}
    return {"path": str(path.resolve()), "exists": True, "size": path.stat().st_size, "sha256": sha256_file(path)}
