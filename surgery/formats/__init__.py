"""One registry of on-disk formats: sniffed from the bytes, never from the file name.

Each `Format` has a name, a sniffer over the first bytes (or the folder's contents), an opener
that returns a `Checkpoint` with metadata only, and whether surgery can write it. The CLI's
choices and the tests' matrix come from `FORMATS`.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import hub
from ..checkpoint import Checkpoint
from ..errors import FormatError, InputError

SNIFF_BYTES = 512  # a tar names its format at byte 257
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    opener: Callable[..., Checkpoint]
    writable: bool = False


def _open_safetensors(path, accept, select):
    from .safetensors_fmt import open_safetensors

    if select:
        from ..errors import SelectError

        raise SelectError(f"{path}: --select does not apply to safetensors; it holds one flat tensor dict")
    return open_safetensors(path)


def _open_zip(path, accept, select):
    from .torch_zip import open_zip

    return open_zip(path, accept, select)


def _open_legacy(path, accept, select):
    from .torch_legacy import open_legacy

    return open_legacy(path, accept, select)


def _open_tar(path, accept, select):
    from .torch_tar import open_tar

    return open_tar(path, accept, select)


def _open_index(path, accept, select):
    from .sharded import open_index

    return open_index(path, accept, select)


def _open_dcp(path, accept, select):
    from .dcp import open_dcp

    return open_dcp(path, accept, select)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("safetensors", "safetensors file (.safetensors)", _open_safetensors, writable=True),
        Format("safetensors-index", "sharded checkpoint: *.index.json naming safetensors or torch shards", _open_index, writable=True),
        Format("torch-zip", "torch.save zip archive (.pt/.pth/.bin/.ckpt)", _open_zip, writable=True),
        Format("torchscript", "torch.jit.save archive: its weights, its code never run", _open_zip),
        Format("torch-legacy", "torch.save legacy pickle (torch < 1.6)", _open_legacy),
        Format("torch-tar", "torch.save tar archive (torch <= 0.1.10)", _open_tar),
        Format("torch-dcp", "torch.distributed.checkpoint folder (.metadata + *.distcp)", _open_dcp),
    )
}


def sniff(path: str | os.PathLike) -> tuple[str, Path]:
    """The format name and the path to open (a folder resolves to its index or .metadata)."""
    p = Path(path)
    try:
        p.stat()
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:  # too long, a loop of symlinks, a NUL in the name, no permission
        raise InputError(f"{str(p)[:200]}: cannot open: {getattr(e, 'strerror', None) or e}") from None
    if not p.exists():
        hint = " (it is a broken symlink)" if p.is_symlink() else ""
        raise InputError(f"{p}: no such file or folder{hint}")
    if p.is_dir():
        if (p / ".metadata").is_file():
            return "torch-dcp", p
        for name in INDEX_NAMES:
            if (p / name).is_file():
                return "safetensors-index", p / name
        indexes = sorted(p.glob("*.index.json"))
        if len(indexes) == 1:
            return "safetensors-index", indexes[0]
        singles = sorted([*p.glob("*.safetensors"), *p.glob("*.bin"), *p.glob("*.pt"), *p.glob("*.pth")])
        if len(singles) == 1:
            return sniff(singles[0])
        what = ", ".join(x.name for x in sorted(p.iterdir())[:8]) or "nothing"
        raise InputError(f"{p}: folder is not a checkpoint: no .metadata (torch DCP), no *.index.json "
                         f"(sharded) and not exactly one weights file (found: {what}); pass the file itself")
    if not p.is_file():
        raise InputError(f"{p}: not a regular file")
    size = p.stat().st_size
    if size == 0:
        raise FormatError(f"{p}: file is empty (0 bytes); the download or save did not finish")
    try:
        with open(p, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as e:
        raise InputError(f"{p}: cannot read: {e.strerror}") from None
    return sniff_bytes(head, size, p), p


def sniff_bytes(head: bytes, size: int, p: Path) -> str:
    from .torch_legacy import SIGNATURE

    if head.startswith(b"version https://git-lfs"):
        raise FormatError(f"{p}: this is a Git LFS pointer ({size} bytes), not the checkpoint; fetch the real file "
                          f"with 'git lfs pull' (or download it again with LFS enabled)")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "torch-zip"
    if head.startswith(SIGNATURE):
        return "torch-legacy"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    stripped = head.lstrip()
    if stripped.startswith(b"{"):
        return "safetensors-index"
    if head.startswith(b"\x80"):
        raise FormatError(f"{p}: a pickle file, but not one written by torch.save (no torch magic number); "
                          f"surgery only reads torch checkpoints and safetensors")
    if head[257:262] == b"ustar":
        return "torch-tar"  # torch <= 0.1.10; any other tar is refused by its reader, members named
    if head.startswith(b"\x1f\x8b"):
        raise FormatError(f"{p}: a gzip archive; extract it first")
    raise FormatError(f"{p}: unrecognised format (first bytes {head[:12].hex()}): not safetensors, a torch zip, "
                      f"a legacy torch pickle, a shard index or a DCP folder")


def open_checkpoint(path: str | os.PathLike, select: str | None = None,
                    allow_globals: tuple[str, ...] | list[str] | frozenset[str] = ()) -> Checkpoint:
    """Open any supported checkpoint for reading metadata; tensor bytes stay on disk.

    >>> ckpt = open_checkpoint("resnet.pth")  # doctest: +SKIP
    >>> ckpt.format, len(ckpt.tensors), ckpt.container
    """
    path = hub.resolve(path)  # ORG/NAME or hf:ORG/NAME: a model in the local Hugging Face cache
    fmt, real = sniff(path)
    ckpt = FORMATS[fmt].opener(real, frozenset(allow_globals), select)
    ckpt.path = Path(path)
    return ckpt


def read_json_index(path: Path) -> dict:
    try:
        # O_NONBLOCK: an index that is (or links to) a FIFO must not block the open forever
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InputError(f"{path}: not a regular file; a shard index must be a file")
        with open(fd, "rb") as f:
            data = json.loads(f.read(64 * 1024 * 1024).decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, a 5000-digit number, [[[[... nested
        raise FormatError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:120]})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    return data
