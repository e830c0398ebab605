"""Models in the local Hugging Face Hub cache, found by name: ``ORG/NAME``, ``hf:ORG/NAME`` and
an optional ``@REVISION`` (a branch or tag under ``refs/``, or a commit hash).

The cache layout is read directly (no network call, no ``huggingface_hub`` import)::

    $HF_HUB_CACHE/models--ORG--NAME/refs/main            the commit hash of the branch
    $HF_HUB_CACHE/models--ORG--NAME/snapshots/HASH/...   the files, usually symlinks into blobs/
    $HF_HUB_CACHE/models--ORG--NAME/blobs/SHA            the bytes

A real local path always wins: ``org/name`` that exists on disk is that file or folder.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from .errors import InputError

PREFIX = "hf:"
# Hub repo ids: ORG/NAME of letters, digits, '-', '_', '.' (no '--' or '..', as the Hub refuses them)
_PART = r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"^({_PART})/({_PART})$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_REF_CAP = 256  # a ref holds a 40-digit hash and a newline; a bigger one is not the Hub's
# A name ending like a checkpoint file is a missing local file, not a Hub model
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".json", ".pkl", ".tar", ".distcp")
# What a snapshot's weights are called, in the order Hugging Face's loaders prefer them
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors",
                "pytorch_model.bin.index.json", "pytorch_model.bin",
                "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def cache_dir() -> Path:
    """``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub`` (``~/.cache``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def parse(name: str) -> tuple[str, str | None] | None:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; None when ``name`` is not a Hub model name."""
    text = name[len(PREFIX):] if name.startswith(PREFIX) else name
    repo_id, _, rev = text.partition("@")
    m = _REPO_ID.match(repo_id)
    if m is None or "--" in repo_id or ".." in repo_id or repo_id.lower().endswith(_FILE_SUFFIXES):
        return None
    if rev and (rev.startswith("/") or ".." in rev.split("/") or not re.fullmatch(r"[\w./-]+", rev)):
        return None
    return repo_id, rev or None


def resolve(path: str | os.PathLike) -> Path:
    """``path`` itself when it exists or is no Hub name; else the model's weights in the cache.

    >>> resolve("timm/resnet18.a1_in1k")  # doctest: +SKIP
    PosixPath('/home/me/.cache/huggingface/hub/models--timm--resnet18.a1_in1k/snapshots/5d1e.../model.safetensors')
    """
    text = os.fspath(path)
    explicit = isinstance(text, str) and text.startswith(PREFIX)
    if not isinstance(text, str) or (not explicit and os.path.lexists(text)):
        return Path(text)
    ref = parse(text)
    if ref is None:
        if explicit:
            raise InputError(f"{text}: not a Hugging Face model name; expected hf:ORG/NAME or hf:ORG/NAME@REVISION")
        return Path(text)
    return weights_in(snapshot(*ref, shown=text))


def snapshot(repo_id: str, revision: str | None = None, *, shown: str | None = None) -> Path:
    """The snapshot folder of ``repo_id`` at ``revision`` (default ``main``) in the local cache."""
    shown = shown or repo_id
    cache = cache_dir()
    org, name = repo_id.split("/")
    repo = cache / f"models--{org}--{name}"
    rev = revision or "main"
    fetch = (f"fetch it with `huggingface-cli download {repo_id}" + (f" --revision {rev}" if revision else "")
             + "` (or pass a local path)")
    if not repo.is_dir():
        raise InputError(f"{shown}: no such file or folder, and not in the Hugging Face cache "
                         f"(looked for {repo}; set HF_HUB_CACHE or HF_HOME if it is elsewhere); {fetch}")
    snaps = repo / "snapshots"
    if _COMMIT.match(rev) and (snaps / rev).is_dir():
        return snaps / rev
    ref = repo / "refs" / rev
    if os.path.lexists(ref):
        commit = _read_ref(ref, repo, shown)
    else:
        have = sorted(p.name for p in snaps.iterdir() if p.is_dir()) if snaps.is_dir() else []
        if revision is None and len(have) == 1:
            return snaps / have[0]  # a cache copied without refs/: its only snapshot
        refs = sorted(str(p.relative_to(repo / "refs")) for p in (repo / "refs").rglob("*") if p.is_file()) \
            if (repo / "refs").is_dir() else []
        raise InputError(f"{shown}: revision {rev!r} is not in the Hugging Face cache at {repo} "
                         f"(refs there: {', '.join(refs) or 'none'}; snapshots: {', '.join(h[:12] for h in have) or 'none'}); "
                         f"{fetch}")
    folder = snaps / commit
    if not folder.is_dir():
        raise InputError(f"{shown}: refs/{rev} names commit {commit!r} but {snaps} has no such snapshot; "
                         f"the download did not finish: {fetch}")
    return folder


def _read_ref(ref: Path, repo: Path, shown: str) -> str:
    """The commit hash a ``refs/`` file holds. It must be a small regular file inside the repo
    folder (the Hub writes 40 hex digits); anything else is refused without quoting a byte of it,
    since a link could lead to any file on the machine."""
    where = f"{shown}: {ref} in the Hugging Face cache"
    st = os.lstat(ref)
    if not stat.S_ISREG(st.st_mode) or repo.resolve() not in ref.resolve().parents:
        raise InputError(f"{where} is not a regular file inside {repo}; the cache holds refs as plain files: "
                         f"delete it and download the model again")
    try:
        with open(ref, "rb") as fh:
            data = fh.read(_REF_CAP + 1)
    except OSError as e:
        raise InputError(f"{where} cannot be read ({e.strerror or e})") from None
    commit = data.decode("ascii", errors="replace").strip()
    if len(data) > _REF_CAP or not _COMMIT.match(commit):
        raise InputError(f"{where} does not hold a commit hash (40 hex digits); the download did not finish "
                         f"or the file was changed: delete it and download the model again")
    return commit


def weights_in(folder: Path) -> Path:
    """The weights file Hugging Face would load from a snapshot (safetensors first), else the folder."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    return folder


def link_root(folder: str | os.PathLike) -> Path:
    """The folder a file's symlinks may point into: a Hub repo folder ``models--ORG--NAME`` for a
    file in one of its snapshots (their files are links into ``../../blobs``), else ``folder``."""
    p = Path(folder)
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return p.parent.parent
    return p
