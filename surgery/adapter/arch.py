"""ARCH -> a model factory: torchvision names, ``timm:NAME``, ``file.py:fn``, ``package.module:fn``.

A resolved :class:`ArchSpec` is plain data (kind, name, kwargs) that the manifest stores, so
``load_adapted`` rebuilds the very same model later. torchvision and timm models are rebuilt by
name and run no other code; a file or module factory is code: when it comes from a folder's
manifest it runs only with ``trust_code`` (:func:`check_trust`), and a file factory only while
its bytes still have the sha256 that adapt pinned.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect as pyinspect
import json
import os
import shlex
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import AdaptError, ArchError, TrustError
from ..io import sha256_file
from ..metabuild import meta_build
from ..preprocess import CROP_PCT, resize_for
from .manifest import ARCH_KINDS, FETCHING_KWARGS

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ArchSpec:
    """What to build: ``kind`` is torchvision, timm, file or module; ``name`` what the user typed
    without the ``timm:`` prefix (a file factory's path is made absolute)."""

    kind: str
    name: str
    kwargs: dict = field(default_factory=dict)
    sha256: str | None = None  # a file factory's bytes, pinned when adapt ran it
    relative: str | None = None  # a file factory's path relative to the folder holding the manifest

    @property
    def display(self) -> str:
        return f"timm:{self.name}" if self.kind == "timm" else self.name

    @property
    def is_code(self) -> bool:
        """Whether building runs code the user wrote (a factory), or kwargs reach timm's loaders."""
        return self.kind in ("file", "module") or (self.kind == "timm" and bool(LOADER_KWARGS & set(self.kwargs)))

    def to_json(self, folder: str | os.PathLike | None = None) -> dict:
        """The manifest's ``arch``; ``folder``: where the manifest goes (a file factory's path is
        also stored relative to it, so the pair moves together)."""
        data = {"kind": self.kind, "name": self.name, "kwargs": dict(self.kwargs)}
        if self.kind == "file":
            data["sha256"] = self.sha256
            if folder is not None:
                with contextlib.suppress(ValueError):  # another drive: the absolute path only
                    data["relative"] = os.path.relpath(self.name.rpartition(":")[0], Path(folder).resolve())
        return data

    def moved(self, src_folder: str | os.PathLike, dst_folder: str | os.PathLike) -> dict:
        """The manifest's ``arch`` for a copy of ``src_folder``'s manifest written to ``dst_folder``
        (a trained run): a file factory's relative path is made from the new folder, starting
        from the file as ``src_folder`` finds it."""
        if self.kind != "file":
            return self.to_json()
        path, _, fn = self.name.rpartition(":")
        here = Path(src_folder) / self.relative if self.relative else None
        if here is not None and here.is_file():
            path = str(here.resolve())
        return replace(self, name=f"{path}:{fn}").to_json(dst_folder)

    @classmethod
    def from_json(cls, data: dict) -> "ArchSpec":
        return cls(data["kind"], data["name"], dict(data.get("kwargs") or {}), data.get("sha256"), data.get("relative"))


KINDS = ARCH_KINDS
# timm.create_model kwargs that read files or the network (checkpoint_path goes through
# torch.load): from a manifest they need the same consent as a factory
LOADER_KWARGS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir"})


def check_trust(spec: ArchSpec, folder: str | os.PathLike, trust_code: bool) -> ArchSpec:
    """The spec to build from a folder's manifest: torchvision and timm names always; a factory
    only with ``trust_code``, and a file factory only while its sha256 is the pinned one (the
    file is looked for beside the folder first, then at its absolute path). Runs nothing."""
    if spec.kind not in KINDS:
        raise ArchError(f"{folder}: manifest arch.kind {spec.kind!r} is not one of {', '.join(KINDS)}")
    if spec.kind == "timm" and not spec.is_code and not _timm_is_model(spec.name):
        raise ArchError(f"{folder}: manifest names timm model {spec.name!r}, which timm does not list; "
                        f"surgery rebuilds only listed models from a folder")
    if not spec.is_code:
        return spec
    what = (f"{spec.kind} factory {spec.name}" if spec.kind != "timm"
            else f"timm:{spec.name} with {', '.join(sorted(LOADER_KWARGS & set(spec.kwargs)))}")
    if not trust_code:
        raise TrustError(f"{folder}: its manifest builds the model with code ({what}); surgery ran nothing. "
                         f"If you trust this folder, pass --trust-code (trust_code=True in Python)")
    if spec.kind != "file":
        return spec
    return _pinned_file(spec, Path(folder))


def factory_candidates(spec: ArchSpec, folder: str | os.PathLike) -> list[Path]:
    """Where a folder's file factory is looked for, in order: beside the folder (the path adapt
    stored relative to it, so the pair may move together), then at its absolute path."""
    candidates = [Path(folder) / spec.relative] if spec.relative else []
    candidates.append(Path(spec.name.rpartition(":")[0]))
    return candidates


def repin_hint(folder: str | os.PathLike) -> str:
    """The explicit way to accept a factory file as it is now (never done automatically)."""
    return f"surgery trust {shlex.quote(str(folder))} --repin"


def _pinned_file(spec: ArchSpec, folder: Path) -> ArchSpec:
    target, _, fn = spec.name.rpartition(":")
    if not spec.sha256:
        raise TrustError(f"{folder}: the manifest's file factory {target} has no pinned sha256; review the file "
                         f"and pin it with `{repin_hint(folder)}`, or re-run surgery adapt")
    candidates = factory_candidates(spec, folder)
    found = []
    for c in candidates:
        if c.is_file():
            digest = sha256_file(c)
            if digest == spec.sha256:
                return replace(spec, name=f"{c.resolve()}:{fn}")
            found.append(f"{c} has sha256 {digest}")
    if not found:
        raise TrustError(f"{folder}: the manifest's factory file {target} is not there "
                         f"({' or '.join(map(str, candidates))})")
    raise TrustError(f"{folder}: the factory file changed since adapt: the manifest pins sha256 {spec.sha256}, "
                     f"{'; '.join(found)}; if the change is yours, review it and re-pin with `{repin_hint(folder)}` "
                     f"(it shows both hashes), or re-run surgery adapt")


def _timm_is_model(name: str) -> bool:
    return bool(_import_timm().is_model(name))


def parse_arch_kwargs(text: str | dict | None) -> dict:
    """``--arch-kwargs '{"width_mult": 0.5}'`` -> dict; refuses anything but a JSON object."""
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        return dict(text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ArchError(f"--arch-kwargs {text!r} is not valid JSON ({e}); pass an object like '{{\"dropout\": 0.2}}'") from None
    if not isinstance(data, dict):
        raise ArchError(f"--arch-kwargs must be a JSON object (got {type(data).__name__}), e.g. '{{\"dropout\": 0.2}}'")
    return data


@functools.lru_cache(maxsize=1)
def torchvision_models() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def resolve_arch(arch: str, kwargs: dict | str | None = None) -> ArchSpec:
    """Check that ``arch`` names something buildable and return its spec (imports nothing heavy
    for torchvision names beyond torchvision itself).

    >>> resolve_arch("resnet18").kind
    'torchvision'
    """
    kw = parse_arch_kwargs(kwargs)
    if not arch or not arch.strip():
        raise ArchError("--arch is empty; name a torchvision model (e.g. resnet18), timm:NAME, or file.py:fn")
    arch = arch.strip()
    fetching = sorted(k for k, v in kw.items() if k in FETCHING_KWARGS and v not in (None, False))
    if fetching and ":" not in arch.replace("timm:", "", 1):
        # the weights come from CKPT; a folder built with these would fetch at every load, and is refused
        raise ArchError(f"--arch-kwargs {', '.join(fetching)}: surgery takes the weights from the checkpoint "
                        f"(or --weights DEFAULT for torchvision's own), never from the network or a file named in "
                        f"kwargs; drop {'them' if len(fetching) > 1 else 'it'}")
    if arch.startswith("timm:"):
        name = arch[5:]
        timm = _import_timm()
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
            raise ArchError(f"unknown timm model {name!r}{hint}")
        return ArchSpec("timm", name, kw)
    if ":" in arch:
        target, _, fn = arch.rpartition(":")
        if not target or not fn or not fn.isidentifier():
            raise ArchError(f"--arch {arch!r}: a factory is 'path/to/file.py:function' or 'package.module:function'")
        if target.endswith(".py") or os.sep in target or "/" in target:
            path = Path(target).expanduser().resolve()
            digest = sha256_file(path) if path.is_file() else None
            spec = ArchSpec("file", f"{path}:{fn}", kw, digest)
        else:
            spec = ArchSpec("module", arch, kw)
        factory(spec)  # import now: a broken factory fails before any work
        return spec
    names = torchvision_models()
    if arch not in names:
        close = difflib.get_close_matches(arch.lower(), names, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ArchError(f"unknown architecture {arch!r}: not a torchvision classification model{hint} "
                        f"(also accepted: timm:NAME, path/to/file.py:fn, package.module:fn)")
    return ArchSpec("torchvision", arch, kw)


def _import_timm():
    try:
        import timm
    except ImportError:
        raise ArchError("timm is not installed; `pip install timm` to use timm:NAME architectures") from None
    return timm


def _load_file(path: Path, sha256: str | None = None):
    """Import the factory file; with ``sha256`` the bytes executed are the bytes hashed."""
    if not path.is_file():
        raise ArchError(f"{path}: factory file not found")
    source = path.read_bytes()
    digest = hashlib.sha256(source).hexdigest()
    if sha256 is not None and digest != sha256:
        raise TrustError(f"{path}: the factory file changed: expected sha256 {sha256}, found {digest}")
    mod_name = f"surgery_user_factory_{digest[:16]}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None:
        raise ArchError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 - the user named this file
    except Exception as e:  # noqa: BLE001 - user code: any failure is bad input, reported in one line
        del sys.modules[mod_name]
        raise ArchError(f"{path}: importing the factory file failed: {type(e).__name__}: {e}") from None
    return module


def factory(spec: ArchSpec) -> Callable[..., "nn.Module"]:
    """A callable ``(**kwargs) -> nn.Module`` for ``spec`` (weights never downloaded here)."""
    if spec.kind == "torchvision":
        import torchvision

        return functools.partial(torchvision.models.get_model, spec.name, weights=None)
    if spec.kind == "timm":
        timm = _import_timm()
        return functools.partial(timm.create_model, spec.name, pretrained=False)
    if spec.kind not in KINDS:
        raise ArchError(f"arch kind {spec.kind!r} is not one of {', '.join(KINDS)}")
    target, _, fn = spec.name.rpartition(":")
    if spec.kind == "file":
        module = _load_file(Path(target), spec.sha256)
        where = target
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:  # noqa: BLE001
            raise ArchError(f"--arch {spec.name!r}: cannot import module {target!r}: {type(e).__name__}: {e}") from None
        where = target
    obj = getattr(module, fn, None)
    if obj is None or not callable(obj):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))[:10]
        raise ArchError(f"{where}: has no callable {fn!r}; callables there: {', '.join(public) or 'none'}")
    return obj


def accepts_num_classes(spec: ArchSpec) -> bool:
    """Whether the factory takes ``num_classes`` itself (torchvision and timm always do)."""
    if spec.kind in ("torchvision", "timm"):
        return True
    try:
        params = pyinspect.signature(factory(spec)).parameters
    except (TypeError, ValueError):
        return False
    return "num_classes" in params


def build(spec: ArchSpec, num_classes: int | None = None, *, meta: bool = False) -> "nn.Module":
    """Build the model; with ``num_classes`` when the factory accepts it. ``meta``: no memory."""
    from torch import nn

    fn = factory(spec)
    kwargs = dict(spec.kwargs)
    if num_classes is not None and accepts_num_classes(spec):
        kwargs["num_classes"] = num_classes
    try:
        model = meta_build(fn, kwargs) if meta else fn(**kwargs)
    except AdaptError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's factory or kwargs: bad input
        raise ArchError(f"building {spec.display} with {kwargs or 'no arguments'} failed: "
                        f"{type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ArchError(f"{spec.display}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def torchvision_weights(arch: str, name: str):
    """torchvision's weights enum member ``name`` (``DEFAULT``, ``IMAGENET1K_V2``) for ``arch``."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise AdaptError(f"torchvision has no weights for {arch!r}") from None
    members = [m.name for m in enum]
    key = name.split(".")[-1]
    if key == "DEFAULT":
        return enum.DEFAULT
    if key not in members:
        raise AdaptError(f"--weights {name!r}: {arch} has weights {', '.join(['DEFAULT', *members])}")
    return enum[key]


def timm_sized_for(spec: ArchSpec, model: "nn.Module", input_size: int | None) -> ArchSpec | None:
    """The spec of a timm model whose patch embedding is built for one image size (ViT, DeiT,
    BEiT, ...) rebuilt for ``input_size`` (``img_size``, so its position embedding is
    interpolated); None when nothing needs rebuilding or ``--arch-kwargs`` already sets it."""
    embed = getattr(model, "patch_embed", None)
    built = getattr(embed, "img_size", None)
    if (spec.kind != "timm" or input_size is None or "img_size" in spec.kwargs
            or not isinstance(built, (tuple, list)) or tuple(built) == (input_size, input_size)):
        return None
    patch = getattr(embed, "patch_size", 1)
    patch = int(patch[-1]) if isinstance(patch, (tuple, list)) else int(patch)
    if input_size % patch:
        raise AdaptError(f"--input-size {input_size}: {spec.display} cuts images into {patch}x{patch} patches; "
                         f"use a multiple of {patch}")
    return ArchSpec(spec.kind, spec.name, {**spec.kwargs, "img_size": input_size})


def input_config(spec: ArchSpec, model: "nn.Module | None" = None, weights: Any = None) -> dict:
    """Input size, channels and normalisation: torchvision's weights meta where known, timm's
    pretrained_cfg for timm, else ImageNet defaults at 224."""
    size, resize, mean, std, interp = 224, 256, IMAGENET_MEAN, IMAGENET_STD, "bilinear"
    source = "imagenet-default"
    if spec.kind == "torchvision":
        if weights is None:
            try:
                weights = torchvision_weights(spec.name, "DEFAULT")
            except AdaptError:
                weights = None
        if weights is not None:
            tf = weights.transforms
            kw = dict(getattr(tf, "keywords", {}) or {})
            size = kw.get("crop_size", size)
            resize = kw.get("resize_size", resize)
            mean = tuple(kw.get("mean", mean))
            std = tuple(kw.get("std", std))
            if "interpolation" in kw:
                interp = getattr(kw["interpolation"], "value", str(kw["interpolation"]))
            source = f"torchvision:{type(weights).__name__}.{weights.name}"
        if "image_size" in spec.kwargs:
            size = int(spec.kwargs["image_size"])
            resize = resize_for(size)
    elif spec.kind == "timm" and model is not None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if cfg.get("input_size"):
            size = int(cfg["input_size"][-1])
            resize = resize_for(size, cfg.get("crop_pct", CROP_PCT))
        mean = tuple(cfg.get("mean", mean))
        std = tuple(cfg.get("std", std))
        interp = cfg.get("interpolation", interp)
        source = f"timm:{spec.name}"
        built = getattr(getattr(model, "patch_embed", None), "img_size", None)  # img_size=... overrides the cfg
        if isinstance(built, (tuple, list)) and built and int(built[-1]) != size:
            size = int(built[-1])
            resize = resize_for(size, cfg.get("crop_pct", CROP_PCT))
    elif "image_size" in spec.kwargs:
        size = int(spec.kwargs["image_size"])
        resize = resize_for(size)
    fixed = getattr(model, "image_size", None)  # torchvision ViT accepts only the size it was built for
    if isinstance(fixed, int) and fixed != size:
        size, resize = fixed, resize_for(fixed)
    if isinstance(resize, (list, tuple)):
        resize = resize[0]
    return {"size": [int(size), int(size)], "resize": int(resize), "channels": 3, "mean": [float(m) for m in mean],
            "std": [float(s) for s in std], "interpolation": interp, "source": source}


def with_normalisation(inp: dict, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> dict:
    """The input section with the caller's mean/std (``--mean/--std``) where given, its source saying so."""
    if mean is None and std is None:
        return inp
    given = " and ".join(n for n, v in (("mean", mean), ("std", std)) if v is not None)
    return {**inp, "mean": [float(m) for m in mean] if mean is not None else inp["mean"],
            "std": [float(s) for s in std] if std is not None else inp["std"],
            "source": f"{inp['source']}; {given} given to adapt"}


def assumed_input(spec: ArchSpec, inp: dict, input_size: int | None, mean: Any, std: Any) -> str | None:
    """What adapt assumed about the input for want of metadata (no torchvision weights, no timm
    config: a factory), in one sentence; None when nothing was assumed."""
    if not inp["source"].startswith("imagenet-default"):
        return None
    guessed = [] if input_size is not None or "image_size" in spec.kwargs else [f"{inp['size'][0]}x{inp['size'][1]} px"]
    norms = [n for n, v in (("mean", mean), ("std", std)) if v is None]
    if norms:
        guessed.append(f"ImageNet {'/'.join(norms)}")
    if not guessed:
        return None
    return (f"{spec.display} carries no input metadata: assumed {' and '.join(guessed)}; if it was trained "
            f"otherwise, pass --input-size and --mean/--std")

