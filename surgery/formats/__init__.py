"""One registry of on-disk formats: sniffed from the bytes, never from the file name.

Each `Format` has a name, an opener that returns a `Checkpoint` with metadata only (`sniff`
tells the format from the first bytes or the folder's contents) and, where surgery writes it,
a writer and the output suffixes that choose it (`output_format`). The CLI's choices and the
tests' matrix come from `FORMATS`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import hub
from ..checkpoint import Checkpoint
from ..errors import FormatError, InputError, RuleError
from .writing import Payload

SNIFF_BYTES = 512  # a tar names its format at byte 257
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


FOLDER = "/"  # in `Format.suffixes`: an output path without a suffix, or an existing folder


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    opener: Callable[..., Checkpoint]
    writer: Callable[[Path, Payload], list[str]] | None = None  # (dst, payload) -> the files written
    suffixes: tuple[str, ...] = ()  # output paths with these suffixes are written in this format
    folder: bool = False  # written as a folder of files


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

    return open_index(path, accept, select, open_shard=_sniffed)


def _sniffed(path: Path, accept: frozenset) -> tuple[str, Callable[[], Checkpoint]]:
    """A shard's format, and a function that opens it."""
    fmt, real = sniff(path)
    return fmt, lambda: FORMATS[fmt].opener(real, accept, None)


def _open_dcp(path, accept, select):
    from .dcp import open_dcp

    return open_dcp(path, accept, select)


def _open_zero(path, accept, select):
    from .zero import open_zero

    return open_zero(path, accept, select)


def _open_per_rank(path, accept, select):
    from .per_rank import open_per_rank

    return open_per_rank(path, accept, select)


def _write_safetensors(dst: Path, payload: Payload) -> list[str]:
    from .safetensors_fmt import write

    return write(dst, payload)


def _write_sharded(dst: Path, payload: Payload) -> list[str]:
    from .sharded import write

    return write(dst, payload)


def _open_dcp_hf(path, accept, select):
    from .dcp_hf import open_hf_dcp

    return open_hf_dcp(path, accept, select)


def _write_dcp(dst: Path, payload: Payload) -> list[str]:
    from .dcp_write import write

    return write(dst, payload)


def _write_zip(dst: Path, payload: Payload) -> list[str]:
    from .torch_zip import write

    return write(dst, payload)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("safetensors", "safetensors file (.safetensors)", _open_safetensors, _write_safetensors, (".safetensors",)),
        Format("safetensors-index", "sharded checkpoint: *.index.json naming safetensors or torch shards", _open_index,
               _write_sharded, (FOLDER,), folder=True),
        Format("torch-zip", "torch.save zip archive (.pt/.pth/.bin/.ckpt)", _open_zip, _write_zip, (".pt", ".pth", ".bin", ".ckpt")),
        Format("torchscript", "torch.jit.save archive: its weights, its code never run", _open_zip),
        Format("torch-legacy", "torch.save legacy pickle (torch < 1.6)", _open_legacy),
        Format("torch-tar", "torch.save tar archive (torch <= 0.1.10)", _open_tar),
        Format("torch-dcp", "torch.distributed.checkpoint folder (.metadata + *.distcp)", _open_dcp, _write_dcp,
               folder=True),
        Format("torch-dcp-hf", "torch.distributed.checkpoint's Hugging Face layout: each rank's safetensors "
               "pieces (shard-R-model-K-of-N.safetensors)", _open_dcp_hf),
        Format("deepspeed-zero", "DeepSpeed ZeRO 1/2/3 folder (latest + global_step*/): its fp32 master weights",
               _open_zero),
        Format("torch-per-rank", "per-rank torch.save files of a sharded model's DTensors (FSDP2, model_world_size_N_rank_K.pt) "
               "or ShardedTensors (FSDP1, pytorch_model_fsdp_0_rankK.bin)",
               _open_per_rank),
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
        from .zero import is_zero_folder

        if is_zero_folder(p):
            return "deepspeed-zero", p
        for name in INDEX_NAMES:
            if (p / name).is_file():
                return "safetensors-index", p / name
        from .dcp_hf import shard_files

        if shard_files(p):
            return "torch-dcp-hf", p
        from .per_rank import is_per_rank

        if is_per_rank(p):
            return "torch-per-rank", p
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
    fmt = sniff_bytes(head, size, p)
    if fmt == "torch-zip":
        from .per_rank import is_per_rank

        if is_per_rank(p):  # one of a sharded model's per-rank files: the set opens as one checkpoint
            return "torch-per-rank", p
    return fmt, p


def sniff_bytes(head: bytes, size: int, p: Path) -> str:
    from .torch_legacy import SIGNATURE

    if head.startswith(b"version https://git-lfs"):
        raise FormatError(f"{p}: this is a Git LFS pointer ({size} bytes), not the checkpoint; fetch the real file "
                          f"with 'git lfs pull' (or download it again with LFS enabled)")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "torch-zip"
    if head.startswith(SIGNATURE):
        from .torch_tar import tarfile_takes

        if tarfile_takes(head):  # torch.load tries tar first: it would not read the pickles surgery reads
            raise FormatError(f"{p}: a legacy torch file whose first 512 bytes are also a valid tar header; torch.load "
                              f"reads it as a tar archive, not as the pickles surgery would show, refusing it")
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


# What ``--format`` takes: the formats surgery writes, by a short name.
OUTPUT_NAMES = {"safetensors": "safetensors", "folder": "safetensors-index", "pt": "torch-zip", "dcp": "torch-dcp"}


def output_format(dst: Path, name: str = "") -> Format:
    """The format a path is written in: ``name`` (``--format``) when given, else chosen by its
    suffix: a `Format` whose ``suffixes`` hold it, or the folder format for a path without one (or
    an existing folder)."""
    if name:
        if name not in OUTPUT_NAMES:
            raise RuleError(f"--format {name!r}: choose one of {', '.join(OUTPUT_NAMES)}")
        return FORMATS[OUTPUT_NAMES[name]]
    suffix = dst.suffix.lower()
    if dst.is_dir() or not suffix or str(dst).endswith(os.sep):
        suffixes = [suffix, FOLDER]
    else:
        suffixes = [suffix]
    for s in suffixes:  # a folder named like a file ("out.pt/") is that file's format
        for f in FORMATS.values():
            if s in f.suffixes:
                return f
    known = [s for f in FORMATS.values() for s in f.suffixes if s != FOLDER]
    raise RuleError(f"{dst}: cannot tell the output format from the suffix {suffix!r}; use {', '.join(known)}, "
                    f"a folder name for sharded safetensors, or --format {'|'.join(OUTPUT_NAMES)}")
