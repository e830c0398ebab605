"""Writing a torch distributed checkpoint (DCP) folder, as ``torch_save_to_dcp`` does: every tensor
whole, ``torch.save``d one after another into ``__0_0.distcp``, and ``.metadata`` naming where each
lies. ``dcp.load`` then reshards it onto any mesh: an adapted model seeds an FSDP2 run.

Streamed: one tensor in memory at a time. The metadata is built from torch's own classes and
pickled as torch pickles it, since torch reads it with plain ``pickle.load``.
"""

from __future__ import annotations

import errno
import pickle
from pathlib import Path

from ..io import atomic_dir
from .writing import Payload

DATA_FILE = "__0_0.distcp"


def write(dst: Path, payload: Payload) -> list[str]:
    """``payload``'s tensors as a DCP folder at ``dst`` (built beside it, renamed into place)."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                       TensorProperties, TensorStorageMetadata)

    entries = {e.name: e for e in payload.entries}
    tensors, storage = {}, {}
    with atomic_dir(dst, keep=payload.keep) as tmp:
        with open(tmp / DATA_FILE, "wb") as f:
            for name in payload.names:  # a tied name is stored again under its own name, as DCP does
                e = entries[payload.aliases.get(name, name)]
                t = e.tensor()
                start = f.tell()
                try:
                    torch.save(t, f)
                except RuntimeError as e:  # torch's writer reports a failed write (ENOSPC) as RuntimeError
                    first = (str(e).strip().splitlines() or [""])[0][:160]
                    raise OSError(errno.EIO, f"torch.save could not finish writing ({first}); is the disk full?") from None
                zeros = torch.Size([0] * t.dim())
                storage[MetadataIndex(name, zeros, 0)] = _StorageInfo(DATA_FILE, start, f.tell() - start)
                tensors[name] = TensorStorageMetadata(TensorProperties(dtype=t.dtype), t.shape,
                                                      [ChunkStorageMetadata(zeros, t.shape)])
        payload.finish()  # a DCP folder keeps no metadata of its own
        md = Metadata(state_dict_metadata=tensors, planner_data={n: (n,) for n in tensors}, storage_data=storage)
        (tmp / ".metadata").write_bytes(pickle.dumps(md))
    return [str(dst / ".metadata"), str(dst / DATA_FILE)]
