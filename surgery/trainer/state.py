"""Training checkpoints: ``last.pt`` / ``best.pt``, their fingerprint, RNG states, resume.

A checkpoint is a plain dict of tensors and plain containers, written by ``torch.save`` through
a temp file (``surgery.io.atomic_file``) and read back with ``torch.load(weights_only=True)``:
nothing in it needs unpickling of arbitrary objects. RNG states are stored as tensors and lists.

    {"format": "surgery.train/1", "epoch": epochs completed, "model": state dict (clean keys),
     "optimizer", "scheduler", "scaler", "best": {"epoch", "val_acc", "val_loss"},
     "bad_epochs": early-stopping counter, "rng": {...}, "fingerprint": {...},
     "history": [per-epoch metrics], "args": {train arguments}}
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FormatError, ResumeError, TrainError, TrainInterrupted, UnsafeCheckpointError
from ..formats.pickle_scan import Truncated, scan
from ..formats.torch_zip import MAX_PICKLE_BYTES, read_zip
from ..io import atomic_file

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

FORMAT = "surgery.train/1"
CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"


# ----------------------------------------------------------------------------- fingerprint

def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(manifest: Any, model: "nn.Module", classes: list[str]) -> dict:
    """What must match for a checkpoint to continue this run: the model's structure (arch, head,
    groups and schedule from the manifest; parameter names and shapes) and the data's classes."""
    data = manifest.data if hasattr(manifest, "data") else manifest
    structure = {k: data.get(k) for k in ("arch", "head", "num_classes", "groups", "schedule", "bn")}
    structure["head"] = {k: v for k, v in (structure["head"] or {}).items() if k != "class_names"}
    pinned = _sha(structure)  # what checkpoints recorded before a re-pin could keep a run going
    if isinstance(structure["arch"], dict):  # a factory's pin (`surgery trust --repin`) is not its structure
        structure["arch"] = {k: v for k, v in structure["arch"].items() if k != "sha256"}
    params = [[n, list(p.shape)] for n, p in model.named_parameters()]
    return {"manifest_sha256": _sha(structure), "manifest_sha256_pinned": pinned, "params_sha256": _sha(params),
            "num_params": len(params), "classes": list(classes)}


def check_fingerprint(saved: dict, current: dict, where: str) -> None:
    """Raise ResumeError naming every difference between two fingerprints."""
    if not isinstance(saved, dict):
        raise ResumeError(f"{where}: cannot resume from this checkpoint: its fingerprint is not a record "
                          f"({type(saved).__name__}); it was not written by surgery train")
    problems = []
    if saved.get("params_sha256") != current["params_sha256"]:
        problems.append(f"the model's parameters differ ({saved.get('num_params')} tensors saved, "
                        f"{current['num_params']} now)")
    elif saved.get("manifest_sha256") not in (current["manifest_sha256"], current["manifest_sha256_pinned"]):
        problems.append("the adapted model's manifest differs (architecture, head, groups or schedule)")
    if list(saved.get("classes") or []) != current["classes"]:
        old, new = saved.get("classes") or [], current["classes"]
        problems.append(f"the data's classes differ ({len(old)} saved: {', '.join(map(str, old[:6]))}; "
                        f"{len(new)} now: {', '.join(new[:6])})")
    if problems:
        raise ResumeError(f"{where}: cannot resume from this checkpoint: {'; '.join(problems)}; resume with "
                          f"the same adapted folder and data, or start a new run without --resume")


# ----------------------------------------------------------------------------- RNG

def rng_state(extra: dict[str, "torch.Generator"] | None = None) -> dict:
    """Python, numpy, torch CPU and CUDA generators (plus ``extra`` named torch generators) as
    tensors and lists, so ``weights_only`` loading accepts them."""
    import torch

    version, internal, gauss = random.getstate()
    out: dict[str, Any] = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        out["numpy"] = [name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    except ImportError:  # pragma: no cover - numpy is optional
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = list(torch.cuda.get_rng_state_all())
    out["generators"] = {k: g.get_state() for k, g in (extra or {}).items()}
    return out


def set_rng_state(state: dict, extra: dict[str, "torch.Generator"] | None = None) -> None:
    import torch

    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        try:
            import numpy as np

            name, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((name, keys.numpy().astype("uint32"), int(pos), int(has_gauss), float(cached)))
        except ImportError:  # pragma: no cover
            pass
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    for k, g in (extra or {}).items():
        if k in state.get("generators", {}):
            g.set_state(state["generators"][k])


# ----------------------------------------------------------------------------- files

def clean_state_dict(model: "nn.Module", keys: "set[str] | None" = None, copy: bool = True) -> dict:
    """The model's state dict on the CPU with no ``module.``/``_orig_mod.`` wrappers; only
    ``keys`` when given. ``copy=False`` for an immediate ``torch.save``, which copies anyway."""
    inner = unwrap(model)
    out = {}
    for k, v in inner.state_dict().items():
        if keys is None or k in keys:
            v = v.detach().cpu()
            out[k] = v.clone() if copy else v
    return out


def changing_keys(model: "nn.Module", manifest: Any) -> set[str]:
    """State-dict keys that this run can change. Every other tensor stays bit-identical to the
    adapted weights the run starts from (frozen groups that never unfreeze, and the statistics
    of BatchNorm layers frozen with them), so checkpoints need not carry them: a head-only run on
    a large backbone then saves kilobytes per epoch instead of the whole model.
    """
    data = manifest.data if hasattr(manifest, "data") else manifest
    groups = {g["name"]: g for g in data["groups"]}

    def ever_trains(group_name: str) -> bool:
        g = groups[group_name]
        return bool(g["trainable"]) or g.get("unfreeze_at") is not None

    fixed = {name for name, meta in data["params"].items() if not ever_trains(meta["group"])}
    bn = data["bn"]
    if bn["policy"] == "frozen":
        fixed_bn = {path for path, g in bn["modules"].items() if not ever_trains(g)}
    else:
        fixed_bn = set()
    keys = set()
    for k in unwrap(model).state_dict():
        owner = k.rsplit(".", 1)[0] if "." in k else ""
        if k in fixed or (owner in fixed_bn and k not in data["params"]):
            continue
        keys.add(k)
    return keys


def unwrap(model: "nn.Module") -> "nn.Module":
    """The user's module inside DDP/DataParallel/torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(model, "module"):
            model = model.module  # type: ignore[assignment]
        else:
            return model


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """``torch.save`` through a temp file in the same folder, fsynced and renamed into place."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)
    return path


def _prescan(path: Path) -> None:
    """Bound the file's pickles before torch's unpickler sees them: a 1M-deep tuple in data.pkl
    crashes torch.load with SIGSEGV, a memo bomb stalls it. Every entry named ``*.pkl`` is
    scanned (whichever torch picks), then the checkpoint is read once with surgery's own reader;
    globals that reader does not know are left to ``weights_only``'s allowlist."""
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.filename.endswith(".pkl"):
                    if info.file_size > MAX_PICKLE_BYTES:
                        raise FormatError(f"{info.filename} declares {info.file_size} bytes")
                    scan(zf.read(info), f"{path}:{info.filename}")
        read_zip(path)
    except UnsafeCheckpointError:
        pass
    except (FormatError, Truncated) as e:
        raise ResumeError(f"{path}: not a readable training checkpoint ({e.one_line() if isinstance(e, FormatError) else 'truncated pickle'})") from None
    except Exception as e:  # noqa: BLE001 - zipfile and zlib raise a dozen types on a corrupt archive
        raise ResumeError(f"{path}: not a readable training checkpoint ({type(e).__name__}: {str(e)[:160]})") from None


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; ``weights_only=True`` always."""
    import torch

    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_DIR / LAST if (path / CHECKPOINT_DIR / LAST).is_file() else path / LAST
    if not path.is_file():
        raise ResumeError(f"{path}: no checkpoint here; --resume continues OUT/checkpoints/last.pt of an "
                          f"earlier run (or give --resume PATH to a last.pt/best.pt)")
    _prescan(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise ResumeError(f"{path}: not a readable training checkpoint ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ResumeError(f"{path}: not a surgery training checkpoint (format {state.get('format') if isinstance(state, dict) else None!r}, "
                          f"expected {FORMAT!r})")
    state["path"] = str(path)
    return state


__all__ = ["TrainError", "ResumeError", "TrainInterrupted", "fingerprint", "check_fingerprint", "rng_state",
           "set_rng_state", "save_checkpoint", "load_checkpoint", "clean_state_dict", "changing_keys", "unwrap", "CHECKPOINT_DIR",
           "LAST", "BEST"]
