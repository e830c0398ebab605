"""``adapt()``, ``load_adapted()``, ``param_groups()``: the library entry points of adapt."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from ..keys import collapse_keys
from ..errors import OutputError
from ..preprocess import resize_for
from . import arch as arch_mod
from .align import Alignment, align_keys
from .errors import AdaptError, AlignError, ManifestError
from .freeze import FreezeOptions, apply_bn_policy, apply_schedule, plan_freeze
from .manifest import MANIFEST_NAME, REPORT_NAME, SCHEMA, WEIGHTS_NAME, Manifest, read_manifest, validate, write_json

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

_IGNORED = "num_batches_tracked"
_POS_EMBED = re.compile(r"(^|\.)(pos_embed|pos_embedding|position_embeddings?|absolute_pos_embed)$")


# ----------------------------------------------------------------------------- reports

ADAPT_SCHEMA = "surgery.adapt/1"  # of AdaptReport.to_json, what `surgery adapt --json` prints


@dataclass
class LoadReport:
    """What loaded. Model names unless said otherwise; ``mismatched`` rows are
    (checkpoint name, model name, checkpoint shape, model shape)."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, str, tuple, tuple]] = field(default_factory=list)
    head_new: list[str] = field(default_factory=list)
    head_dropped: list[str] = field(default_factory=list)  # checkpoint names of the old head
    renamed: dict[str, str] = field(default_factory=dict)  # checkpoint name -> model name
    adapted: list[str] = field(default_factory=list)  # first conv reshaped for --in-chans
    resized: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # interpolated pos embeds
    coverage: float = 0.0  # share of the model's parameter elements that came from the checkpoint
    backbone_coverage: float = 0.0  # the same, head excluded
    alignment: Alignment | None = None

    def to_json(self) -> dict:
        def part(keys: list[str]) -> dict:
            return {"count": len(keys), "grouped": collapse_keys(keys), "keys": list(keys)}

        return {
            "coverage": self.coverage,
            "backbone_coverage": self.backbone_coverage,
            "alignment": self.alignment.to_json() if self.alignment else None,
            "loaded": part(self.loaded),
            "missing": part(self.missing),
            "unexpected": part(self.unexpected),
            "mismatched": [{"name": m, "checkpoint_name": c, "checkpoint_shape": list(cs), "model_shape": list(ms)}
                           for c, m, cs, ms in self.mismatched],
            "head_new": part(self.head_new),
            "head_dropped": part(self.head_dropped),
            "renamed": dict(self.renamed),
            "adapted": list(self.adapted),
            "resized": [{"name": n, "checkpoint_shape": list(a), "model_shape": list(b)} for n, a, b in self.resized],
        }


@dataclass
class AdaptReport:
    load: LoadReport
    manifest: Manifest
    out: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def groups(self) -> list[dict]:
        return self.manifest.groups

    def to_json(self) -> dict:
        return {"schema": ADAPT_SCHEMA, "out": self.out, "warnings": list(self.warnings), "load_report": self.load.to_json(),
                "groups": self.manifest.groups, "head": self.manifest.head, "arch": self.manifest["arch"],
                "bn": {"policy": self.manifest["bn"]["policy"], "frozen_modules": len(self.frozen_bn())},
                "schedule": self.manifest["schedule"]}

    def frozen_bn(self) -> list[str]:
        groups = {g["name"]: g for g in self.manifest.groups}
        bn = self.manifest["bn"]
        if bn["policy"] != "frozen":
            return []
        return [m for m, g in bn["modules"].items() if not groups[g]["trainable"]]


# ----------------------------------------------------------------------------- the source

@dataclass
class _Source:
    shapes: dict[str, tuple[int, ...]]  # after rules, before wrapper stripping
    get: Callable[[str], "torch.Tensor"]  # by name after rules
    info: dict


def _open_source(ckpt: Any, weights: str | None, spec: arch_mod.ArchSpec, rules: Any, select: str | None,
                 allow_globals: Iterable[str]) -> _Source:
    from ..remapping import Rules, plan_names

    rules = Rules.coerce(rules)
    if select is not None:
        rules.select = select
    info: dict[str, Any] = {"path": None, "sha256": None, "format": None, "container": None, "weights": None,
                            "rules": rules.to_json()}
    if weights is not None:
        if ckpt is not None:
            raise AdaptError("give either a checkpoint or --weights, not both")
        if spec.kind != "torchvision":
            raise AdaptError(f"--weights names torchvision weights; {spec.display} is not a torchvision model")
        import torch

        w = arch_mod.torchvision_weights(spec.name, weights)
        cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
        try:
            sd = w.get_state_dict(progress=False, weights_only=True)
        except Exception as e:  # noqa: BLE001 - network or cache problems are the user's to fix
            raise AdaptError(f"--weights {weights}: cannot get {w.url} ({type(e).__name__}: {e}); "
                             f"without internet, place the file at {cache}") from None
        from ..io import sha256_file

        info.update(path=str(cache), format="torchvision-weights", weights=f"{type(w).__name__}.{w.name}",
                    url=w.url, sha256=sha256_file(cache) if cache.is_file() else None)
        raw_get: Callable[[str], Any] = sd.__getitem__
        raw_shapes = {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}
    elif isinstance(ckpt, Mapping):
        sd = dict(ckpt)
        info.update(format="state_dict")
        raw_get = sd.__getitem__
        raw_shapes = {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}
    elif ckpt is None:
        raise AdaptError("nothing to load: give a checkpoint path or --weights NAME")
    else:
        from ..formats import open_checkpoint
        from ..hub import resolve
        from ..io import sha256_file

        path = resolve(ckpt)  # a local path, or ORG/NAME in the Hugging Face cache
        c = open_checkpoint(path, select=rules.select, allow_globals=tuple(allow_globals))
        if path.is_file():
            digest = sha256_file(path)
        else:
            import hashlib

            h = hashlib.sha256()
            for f in sorted(set(c.files) or {str(path)}):
                if os.path.isfile(f):
                    h.update(sha256_file(f).encode())
            digest = h.hexdigest()
        info.update(path=str(path.resolve()), sha256=digest, format=c.format, container=c.container)
        raw_get = c.tensor
        raw_shapes = {k: tuple(t.shape) for k, t in c.tensors.items()}
    plan = plan_names(raw_shapes, rules.ops)
    kept = plan.kept
    shapes = {new: raw_shapes[old] for old, new in kept.items()}
    back = {new: old for old, new in kept.items()}
    if not shapes:
        raise AdaptError(f"{info['path'] or 'checkpoint'}: no tensors left to load" +
                         (" after the rules" if rules.ops else ""))
    return _Source(shapes, lambda name: raw_get(back[name]), info)


# ----------------------------------------------------------------------------- helpers

def _under(name: str, paths: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in paths)


def _grid_prefix(a: int, b: int) -> int | None:
    for p in range(0, 9):
        if a - p > 0 and b - p > 0 and math.isqrt(a - p) ** 2 == a - p and math.isqrt(b - p) ** 2 == b - p:
            return p
    return None


def interpolate_pos_embed(t: "torch.Tensor", shape: tuple[int, ...]) -> "torch.Tensor | None":
    """(1, P + g*g, D) -> (1, P + G*G, D): prefix tokens kept, the grid resized bicubically.
    None when the shapes are not two square grids with the same prefix and width."""
    import torch

    if t.ndim != 3 or len(shape) != 3 or t.shape[0] != shape[0] or t.shape[2] != shape[2]:
        return None
    p = _grid_prefix(t.shape[1], shape[1])
    if p is None:
        return None
    g, G = math.isqrt(t.shape[1] - p), math.isqrt(shape[1] - p)
    prefix, grid = t[:, :p], t[:, p:]
    d = t.shape[2]
    grid = grid.float().reshape(t.shape[0], g, g, d).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(G, G), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(t.shape[0], G * G, d).to(t.dtype)
    return torch.cat([prefix, grid], 1)


def _channels(values: list[float], c: int) -> list[float]:
    if c == len(values):
        return list(values)
    if c == 1:
        return [sum(values) / len(values)]
    return [values[i % len(values)] for i in range(c)]


def _build(spec: arch_mod.ArchSpec, num_classes: int, head: Any, seed: int, meta: bool = False) -> "nn.Module":
    import torch

    from .heads import apply_head

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = arch_mod.build(spec, num_classes, meta=meta)
        return apply_head(model, head, num_classes)


def _meta_build(spec: arch_mod.ArchSpec, num_classes: int, seed: int,
                input_size: int | None) -> tuple[arch_mod.ArchSpec, "nn.Module"]:
    """The model on the meta device. A torchvision ViT built for another image size than
    ``input_size`` is rebuilt for it (``image_size``), so its position embedding is interpolated."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = arch_mod.build(spec, num_classes, meta=True)
        built = getattr(model, "image_size", None)
        if (spec.kind == "torchvision" and input_size is not None and isinstance(built, int)
                and built != input_size and "image_size" not in spec.kwargs):
            patch = int(getattr(model, "patch_size", 1))
            if input_size % patch:
                raise AdaptError(f"--input-size {input_size}: {spec.name} cuts images into {patch}x{patch} "
                                 f"patches; use a multiple of {patch}")
            spec = arch_mod.ArchSpec(spec.kind, spec.name, {**spec.kwargs, "image_size": input_size})
            model = arch_mod.build(spec, num_classes, meta=True)
    return spec, model


# ----------------------------------------------------------------------------- adapt

def adapt(ckpt: Any = None, *, arch: str, num_classes: int, out: str | os.PathLike | None = None,
          weights: str | None = None, arch_kwargs: dict | str | None = None, rules: Any = None,
          select: str | None = None, allow_globals: Iterable[str] = (), head: str = "linear",
          hidden: int = 512, dropout: float = 0.5, in_chans: int = 3, input_size: int | None = None,
          freeze: str | None = None, freeze_until: str | None = None, freeze_first: int | None = None,
          freeze_regex: str | None = None, train_regex: str | None = None, preset: str | None = None,
          backbone_lr_mult: float | None = None, layer_decay: float | None = None,
          unfreeze_at: int | None = None, gradual: bool = False, bn: str | None = None, strict: bool = False,
          min_coverage: float = 0.5, interpolate: bool = True, class_names: list[str] | None = None,
          force: bool = False, seed: int = 0) -> tuple["nn.Module", AdaptReport]:
    """Load ``ckpt`` (a path, a state dict, or None with ``weights``) into ``arch`` with a new
    ``num_classes`` head, freeze by policy, and (with ``out``) write model.safetensors,
    manifest.json and load_report.json there. Returns (model, report); nothing is written when
    anything fails.

    >>> model, report = adapt("resnet18.pth", arch="resnet18", num_classes=4,
    ...                       freeze="head-only", out="adapted/")  # doctest: +SKIP
    >>> report.load.coverage
    0.9956
    """
    import torch

    from .heads import HEAD_KINDS, adapt_input_conv, plan_head, probe

    # ---- every option checked before any work
    problems = []
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        problems.append(f"--num-classes must be a positive integer, got {num_classes!r}")
    if head not in HEAD_KINDS:
        problems.append(f"--head {head!r}: choose one of {', '.join(HEAD_KINDS)}")
    if in_chans < 1:
        problems.append(f"--in-chans must be >= 1, got {in_chans}")
    if head == "mlp" and (hidden < 1 or not 0 <= dropout < 1):
        problems.append(f"--hidden must be >= 1 and --dropout in [0, 1) (got {hidden}, {dropout})")
    if not 0 <= min_coverage <= 1:
        problems.append(f"--min-coverage must be in [0, 1], got {min_coverage}")
    if class_names is not None and len(class_names) != num_classes:
        problems.append(f"{len(class_names)} class names for --num-classes {num_classes}")
    if problems:
        raise AdaptError("; ".join(problems))
    opts = FreezeOptions(freeze=freeze, freeze_until=freeze_until, freeze_first=freeze_first,
                         freeze_regex=freeze_regex, train_regex=train_regex, preset=preset,
                         backbone_lr_mult=backbone_lr_mult, layer_decay=layer_decay, unfreeze_at=unfreeze_at,
                         gradual=gradual, bn=bn)
    opts.resolved()  # conflicts fail now, before the model is built
    out_p = Path(out) if out is not None else None
    if out_p is not None:
        from ..io import OUTPUTS, check_destination

        inputs = [Path(ckpt)] if ckpt is not None and not isinstance(ckpt, Mapping) else []
        check_destination(out_p, inputs, force=force, in_place=None, kind="folder", owned=OUTPUTS["adapt"])

    spec = arch_mod.resolve_arch(arch, arch_kwargs)
    src = _open_source(ckpt, weights, spec, rules, select, allow_globals)
    weights_obj = arch_mod.torchvision_weights(spec.name, weights) if weights else None

    took = arch_mod.accepts_num_classes(spec)
    spec, meta_model = _meta_build(spec, num_classes, seed, input_size)
    inp = arch_mod.input_config(spec, meta_model, weights_obj)
    if input_size is not None:
        inp["size"], inp["resize"] = [input_size, input_size], resize_for(input_size)
        probe(meta_model, 3, input_size)  # a model fixed to another size is refused here, not in train
    plan = plan_head(spec, meta_model, num_classes=num_classes, kind=head, took_num_classes=took,
                     in_chans=in_chans, size=tuple(inp["size"]), hidden=hidden, dropout=dropout)
    del meta_model
    model = _build(spec, num_classes, plan, seed)

    # ---- match names and shapes (no tensor bytes read yet)
    msd = model.state_dict()
    mshapes = {k: tuple(v.shape) for k, v in msd.items()}
    head_keys = [k for k in mshapes if _under(k, plan.modules)]
    align = align_keys(src.shapes, mshapes, ignore=head_keys)
    rep = LoadReport(alignment=align)
    rep.head_new = head_keys
    to_load: dict[str, tuple[str, str]] = {}  # model name -> (ckpt name, how)
    for ck, target in align.mapping.items():
        if ck != target:
            rep.renamed[ck] = target
        if _under(target, plan.modules):
            rep.head_dropped.append(ck)
            continue
        if target not in mshapes:
            rep.unexpected.append(ck)
            continue
        cs, ms = src.shapes[ck], mshapes[target]
        if target in to_load:
            rep.unexpected.append(ck)
        elif cs == ms:
            to_load[target] = (ck, "copy")
        elif plan.first_conv and target == f"{plan.first_conv}.weight" and cs[:1] + cs[2:] == ms[:1] + ms[2:]:
            to_load[target] = (ck, "in_chans")
        elif interpolate and _POS_EMBED.search(target) and len(cs) == 3 and _grid_prefix(cs[1], ms[1]) is not None \
                and cs[0] == ms[0] and cs[2] == ms[2]:
            to_load[target] = (ck, "interpolate")
        else:
            rep.mismatched.append((ck, target, cs, ms))
    rep.missing = [k for k in mshapes if k not in to_load and k not in head_keys and not k.endswith(_IGNORED)]
    pnames = dict(model.named_parameters())
    total = sum(p.numel() for p in pnames.values()) or 1
    head_numel = sum(p.numel() for n, p in pnames.items() if _under(n, plan.modules))
    got = sum(pnames[n].numel() for n in to_load if n in pnames)
    rep.coverage = got / total
    rep.backbone_coverage = got / max(total - head_numel, 1)
    where = src.info["path"] or src.info["weights"] or "checkpoint"
    if rep.backbone_coverage < min_coverage:
        from ..archsig import guess_architecture

        guess = guess_architecture(src.shapes, top=1)
        hint = ""
        if guess and guess[0].score > 0.5 and guess[0].arch != spec.name:
            hint = f"; `surgery inspect` guesses it is {guess[0].arch} (score {guess[0].score:.2f}): try --arch {guess[0].arch}"
        mm = f", {len(rep.mismatched)} with other shapes" if rep.mismatched else ""
        raise AlignError(f"{where}: matches almost nothing of {spec.display}: {rep.backbone_coverage:.1%} of its "
                         f"backbone parameters ({len(to_load)} of {len(mshapes) - len(head_keys)} tensors{mm}){hint}; "
                         f"use --rename/--strip-prefix if the names differ, or --min-coverage 0 to load anyway")
    if strict and (rep.missing or rep.mismatched):
        parts = []
        if rep.missing:
            parts.append(f"missing {', '.join(collapse_keys(rep.missing)[:6])}")
        if rep.mismatched:
            parts.append("shape-mismatched " + ", ".join(f"{m} {list(cs)} vs {list(ms)}" for _, m, cs, ms in rep.mismatched[:4]))
        raise AlignError(f"{where}: --strict: {'; '.join(parts)}; drop --strict to load the rest")

    # ---- load
    new_sd = {}
    for target, (ck, how) in to_load.items():
        t = src.get(ck)
        if how == "in_chans":
            t = adapt_input_conv(t, in_chans)
            rep.adapted.append(target)
        elif how == "interpolate":
            t2 = interpolate_pos_embed(t, mshapes[target])
            if t2 is None:
                rep.mismatched.append((ck, target, src.shapes[ck], mshapes[target]))
                continue
            rep.resized.append((target, src.shapes[ck], mshapes[target]))
            t = t2
        new_sd[target] = t
        rep.loaded.append(target)
    with torch.no_grad():
        for k, t in new_sd.items():
            msd[k].copy_(t)
    del new_sd

    # ---- freeze plan and manifest
    fp = plan_freeze(model, plan.modules, opts)
    head_json = {**plan.to_json(), "num_classes": num_classes, "class_names": class_names}
    inp["channels"] = in_chans
    inp["mean"], inp["std"] = _channels(inp["mean"], in_chans), _channels(inp["std"], in_chans)
    from .. import __version__

    data = {
        "schema": SCHEMA,
        "created_by": f"surgery {__version__}",
        "source": {**src.info, **(align.to_json())},
        "arch": {**spec.to_json(out_p), "num_classes_kwarg": took},
        "num_classes": num_classes,
        "class_names": class_names,
        "head": head_json,
        "input": inp,
        "freeze": fp["options"],
        "stages": fp["stages"],
        "schedule": fp["schedule"],
        "groups": fp["groups"],
        "params": fp["params"],
        "bn": fp["bn"],
        "files": {"weights": WEIGHTS_NAME, "weights_sha256": None, "load_report": REPORT_NAME},
        "coverage": rep.coverage,
        "seed": seed,
    }
    manifest = validate(data)
    model.train()
    apply_schedule(model, manifest, 0)
    report = AdaptReport(rep, manifest, str(out_p) if out_p else None)
    if rep.mismatched:
        report.warnings.append(f"{len(rep.mismatched)} tensors skipped for their shape: "
                               + ", ".join(m for _, m, _, _ in rep.mismatched[:5]))
    if out_p is not None:
        _write(out_p, model, manifest, rep, force)
    return model, report


def _write(out: Path, model: "nn.Module", manifest: Manifest, rep: LoadReport, force: bool) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from ..io import atomic_dir, sha256_file

    seen: set[int] = set()
    tensors = {}
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        if t.data_ptr() in seen and t.numel():
            t = t.clone()  # safetensors refuses shared storage
        seen.add(t.data_ptr())
        tensors[k] = t
    try:
        with atomic_dir(out) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "schema": SCHEMA})
            manifest.data["files"]["weights_sha256"] = sha256_file(tmp / WEIGHTS_NAME)
            write_json(tmp / MANIFEST_NAME, manifest.data)
            write_json(tmp / REPORT_NAME, rep.to_json())
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
        raise OutputError(f"{out}: cannot write: {' '.join(str(e).split())}; is the disk full? "
                          f"nothing was left at the destination") from None


# ----------------------------------------------------------------------------- reading back

def _manifest(m: Any) -> Manifest:
    if isinstance(m, Manifest):
        return m
    if isinstance(m, dict):
        return validate(m)
    return read_manifest(m)


def build_from_manifest(manifest: Any, *, meta: bool = False, trust_code: bool = False) -> "nn.Module":
    """The adapted model's structure (freshly initialised) from the manifest's spec. A factory
    named there is code: it runs only with ``trust_code`` and only with its pinned sha256."""
    from .heads import HeadPlan

    m = _manifest(manifest)
    spec = arch_mod.check_trust(arch_mod.ArchSpec.from_json(m["arch"]), m.path or "manifest", trust_code)
    plan = HeadPlan.from_json(m.head)
    return _build(spec, m.num_classes, plan, int(m.data.get("seed", 0)), meta=meta)


def load_weights(model: "nn.Module", state: Mapping[str, Any], *, strict: bool = True) -> Any:
    """``model.load_state_dict(state)`` whatever ``state`` carries: a safetensors dict has no
    ``_metadata``, and modules with a versioned ``_load_from_state_dict`` (MNASNet) need the
    version. The weights were written from this same model code, so its own versions apply."""
    from collections import OrderedDict

    sd = OrderedDict(state)
    sd._metadata = getattr(model.state_dict(keep_vars=True), "_metadata", OrderedDict())  # type: ignore[attr-defined]
    return model.load_state_dict(sd, strict=strict)


def load_adapted(folder: str | os.PathLike, *, device: Any = None, epoch: int = 0, verify: bool = True,
                 trust_code: bool = False) -> "nn.Module":
    """The model written by ``surgery adapt``, ready to train: weights loaded strictly, in train
    mode, ``requires_grad`` and BatchNorm modes as the manifest's schedule says at ``epoch``.

    The folder is data: torchvision and timm models are rebuilt by name. A file or module
    factory in its manifest is code and runs only with ``trust_code=True`` (a file factory
    only while its sha256 is the one adapt pinned).

    >>> model = load_adapted("adapted/")  # doctest: +SKIP
    """
    from safetensors.torch import load_file

    from ..io import sha256_file

    m = read_manifest(folder)
    folder = m.path  # type: ignore[assignment]
    wpath = Path(folder) / m["files"]["weights"]
    if not wpath.is_file():
        raise ManifestError(f"{wpath}: weights file named by the manifest is missing")
    want = m["files"].get("weights_sha256")
    if verify and want and sha256_file(wpath) != want:
        raise ManifestError(f"{wpath}: sha256 differs from the manifest's; the weights were changed after adapt")
    _check_shapes(build_from_manifest(m, meta=True, trust_code=trust_code), m, wpath)  # before any allocation
    model = build_from_manifest(m, trust_code=trust_code)
    sd = load_file(str(wpath))
    try:
        load_weights(model, sd, strict=True)
    except RuntimeError as e:
        raise ManifestError(f"{wpath}: does not fit the rebuilt model: {' '.join(str(e).split())[:300]}") from None
    if device is not None:
        model.to(device)
    model.train()
    apply_schedule(model, m, epoch)
    return model


def _check_shapes(meta_model: "nn.Module", m: Manifest, wpath: Path) -> None:
    """The model the manifest describes, built on the meta device, against the manifest's
    parameters and the weights file's header: a manifest cannot make surgery allocate more than
    its weights file holds."""
    from safetensors import SafetensorError, safe_open

    names = {n: list(p.shape) for n, p in meta_model.named_parameters()}
    diff = sorted(set(names) ^ set(m.params))
    if diff:
        raise ManifestError(f"{wpath.parent}: the rebuilt model's parameters differ from the manifest's "
                            f"({', '.join(diff[:5])}); the architecture code changed since adapt")
    try:
        with safe_open(str(wpath), "pt", device="cpu") as f:  # the header only: get_slice reads no data
            stored = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ManifestError(f"{wpath}: not a readable safetensors file ({' '.join(str(e).split())[:200]})") from None
    wrong = [f"{k} {v} vs {stored.get(k)}" for k, v in {**names, **{k: list(t.shape) for k, t in
             meta_model.named_buffers() if k in stored}}.items() if stored.get(k) != v]
    if wrong:
        raise ManifestError(f"{wpath}: does not fit the model the manifest describes ({'; '.join(wrong[:3])})")


def param_groups(model: "nn.Module", manifest: Any, lr: float, weight_decay: float | None = None) -> list[dict]:
    """Optimizer groups, one per manifest group, ``lr * lr_mult`` each. Frozen groups are
    included (their parameters get no grad, so optimizers skip them) so that unfreezing later
    needs no new groups: adding groups mid-run breaks LR schedulers.

    >>> opt = torch.optim.AdamW(param_groups(model, "adapted/", lr=1e-3))  # doctest: +SKIP
    """
    m = _manifest(manifest)
    by_group: dict[str, list] = {g["name"]: [] for g in m.groups}
    unknown = []
    for n, p in model.named_parameters():
        meta = m.params.get(n)
        if meta is None:
            unknown.append(n)
        else:
            by_group[meta["group"]].append(p)
    if unknown:
        raise ManifestError(f"parameters not in the manifest: {', '.join(unknown[:5])}; is this the adapted model?")
    out = []
    for g in m.groups:
        if not by_group[g["name"]]:
            continue
        d = {"params": by_group[g["name"]], "lr": lr * g["lr_mult"], "name": g["name"], "lr_mult": g["lr_mult"]}
        if weight_decay is not None:
            d["weight_decay"] = weight_decay
        out.append(d)
    return out


__all__ = ["adapt", "load_adapted", "param_groups", "build_from_manifest", "AdaptReport", "LoadReport",
           "apply_bn_policy", "apply_schedule"]
