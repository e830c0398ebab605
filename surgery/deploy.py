"""Export an adapted or trained folder for deployment: ONNX, TorchScript or ``torch.export``.

The model is rebuilt by ``load_adapted`` from the folder's manifest and weights. The manifest's
preprocessing (input size, channels, mean/std, interpolation, class names) goes beside the file
as ``FILE.preprocess.json`` and inside it where the format keeps metadata (ONNX metadata_props
``surgery.preprocess``, the ``preprocess.json`` extra file of TorchScript and ``.pt2`` archives).
Each export is checked: the written file is loaded back and run on a random batch, and its
outputs compared with the model's.

    >>> report = export("run/", "onnx")  # doctest: +SKIP
    >>> report.out, report.max_abs_diff
    ('run/model.onnx', 1.2e-06)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .errors import ExportError
from .preprocess import input_pipeline

SCHEMA = "surgery.export/1"
PREPROCESS_SCHEMA = "surgery.preprocess/1"
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "exported": ".pt2"}
EXTRA = "pip install 'surgery[export]'"


@dataclass
class ExportReport:
    folder: str
    format: str
    out: str
    preprocess_file: str
    bytes: int
    input_shape: list[int]
    output_shape: list[int]
    dynamic_batch: bool
    max_abs_diff: float | None
    preprocess: dict

    def to_json(self) -> dict:
        return {"schema": SCHEMA, **asdict(self)}


def preprocess_info(manifest: Any) -> dict:
    """What a deployment must do to an image before the model sees it, from the manifest."""
    pipe = input_pipeline(manifest)
    names = manifest.data.get("class_names") or manifest.head.get("class_names") or [str(i) for i in range(manifest.num_classes)]
    size = list(pipe.size)
    return {"schema": PREPROCESS_SCHEMA, "input_name": "input", "output_name": "logits", "layout": "NCHW",
            "dtype": "float32", "shape": ["batch", pipe.channels, *size],
            "resize": pipe.resize, "crop": size, "interpolation": pipe.interpolation,
            "scale": "pixel values / 255, then (x - mean) / std per channel",
            "mean": list(pipe.mean), "std": list(pipe.std), "channels": pipe.channels,
            "num_classes": manifest.num_classes, "class_names": [str(n) for n in names],
            "output": "logits; softmax over dim 1 for probabilities",
            "weights_sha256": manifest["files"].get("weights_sha256"), "created_by": f"surgery {__version__}"}


def export(folder: str | os.PathLike, format: str = "onnx", out: str | os.PathLike | None = None, *,
           force: bool = False, verify: bool = True, trust_code: bool = False) -> ExportReport:
    """Write ``folder``'s model as ``format`` (onnx, torchscript or exported) to ``out`` (default
    ``FOLDER/model.onnx``, ``model.torchscript.pt`` or ``model.pt2``), with a dynamic batch size,
    and its preprocessing beside it. Nothing is written when anything fails. A factory the
    manifest names is code: it runs only with ``trust_code`` and its pinned sha256, as in
    ``load_adapted``."""
    from .adapter.manifest import read_manifest
    from .io import atomic_file, check_destination

    if format not in SUFFIXES:
        raise ExportError(f"--format {format!r}: choose one of {', '.join(SUFFIXES)}")
    exporter = _EXPORTERS[format]
    _require(format, verify)
    m = read_manifest(folder)
    base = Path(m.path or folder)
    out_p = Path(out) if out is not None else base / f"model{SUFFIXES[format]}"
    side = out_p.with_name(out_p.name + ".preprocess.json")
    inputs = [base / m["files"]["weights"], base / "manifest.json"]
    for dst in (out_p, side):
        check_destination(dst, inputs, force=force, in_place=None)
    model, example = _model(folder, m, trust_code)
    pre = preprocess_info(m)
    text = json.dumps(pre, indent=2) + "\n"
    with atomic_file(out_p) as tmp, _quiet():
        exporter(model, example, tmp, text)
        diff, out_shape = _check(format, tmp, model, example) if verify else (None, None)
        with atomic_file(side) as tmp_side:
            tmp_side.write_text(text, encoding="utf-8")
    if out_shape is None:
        import torch

        with torch.no_grad():
            out_shape = list(model(example).shape)
    return ExportReport(str(base), format, str(out_p), str(side), out_p.stat().st_size, list(example.shape),
                        out_shape, True, diff, pre)


def _require(format: str, verify: bool) -> None:
    import importlib.util

    need = {"onnx": ["onnx", "onnxscript"] + (["onnxruntime"] if verify else [])}.get(format, [])
    missing = [n for n in need if importlib.util.find_spec(n) is None]
    if missing:
        raise ExportError(f"--format {format} needs {', '.join(missing)}, which is not installed: {EXTRA}")


def _model(folder, m, trust_code: bool) -> tuple[Any, Any]:
    import torch

    from .adapter.core import load_adapted

    model = load_adapted(folder, trust_code=trust_code).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    pipe = input_pipeline(m)
    example = torch.randn(2, pipe.channels, *pipe.size, generator=g)
    return model, example


@contextlib.contextmanager
def _quiet():
    """Exporters print progress and warn about their own internals; a library stays silent."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _batch_dim():
    import torch

    return ({0: torch.export.Dim("batch", min=1, max=65536)},)


def _onnx(model, example, path: Path, text: str) -> None:
    import torch

    try:
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=_batch_dim(),
                                    input_names=["input"], output_names=["logits"], verbose=False)
    except Exception as e:  # noqa: BLE001 - the exporter's failure on this model is the user's answer
        raise ExportError(f"torch.onnx could not export this model: {type(e).__name__}: {_short(e)}") from None
    program.model.metadata_props["surgery.preprocess"] = text
    program.save(str(path))


def _torchscript(model, example, path: Path, text: str) -> None:
    import torch

    try:
        traced = torch.jit.trace(model, example)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"torch.jit.trace could not trace this model: {type(e).__name__}: {_short(e)}") from None
    torch.jit.save(traced, str(path), _extra_files={"preprocess.json": text})


def _exported(model, example, path: Path, text: str) -> None:
    import torch

    try:
        program = torch.export.export(model, (example,), dynamic_shapes=_batch_dim())
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"torch.export could not export this model: {type(e).__name__}: {_short(e)}") from None
    with open(path, "wb") as f:  # a file object: torch.export wants a name ending in .pt2, not our temp name
        torch.export.save(program, f, extra_files={"preprocess.json": text})


_EXPORTERS: dict[str, Callable[..., None]] = {"onnx": _onnx, "torchscript": _torchscript, "exported": _exported}


def load_runner(format: str, path: str | os.PathLike) -> Callable[[Any], Any]:
    """A callable ``tensor -> tensor`` over an exported file, through the format's own runtime
    (onnxruntime, ``torch.jit.load``, ``torch.export.load``): what a deployment would run."""
    import torch

    if format == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    if format == "torchscript":
        return torch.jit.load(str(path), map_location="cpu")
    with open(path, "rb") as f:
        return torch.export.load(f).module()


def _check(format: str, path: Path, model, example) -> tuple[float, list[int]]:
    """Run the written file on a batch of another size than the example's (the batch dimension
    is dynamic) and compare with the model; a difference past float32 noise is an error."""
    import torch

    x = torch.randn(3, *example.shape[1:], generator=torch.Generator().manual_seed(1))
    try:
        got = load_runner(format, path)(x)
    except Exception as e:  # noqa: BLE001 - the runtime refusing the file is an export failure
        raise ExportError(f"the exported {format} file does not run: {type(e).__name__}: {_short(e)}") from None
    with torch.no_grad():
        want = model(x)
    diff = float((got.float() - want.float()).abs().max())
    try:
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-3, atol=1e-4)
    except AssertionError:
        raise ExportError(f"the exported {format} model's outputs differ from the model's by up to {diff:.3g}; "
                          f"nothing was written") from None
    return diff, list(got.shape)


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]
