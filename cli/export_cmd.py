"""`surgery export DIR --format onnx|torchscript|exported`: a deployable file and its preprocessing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import console, handles_errors, human_bytes, print_json, shared_option


def register(app: typer.Typer) -> None:
    app.command("export")(export)


@handles_errors
def export(
    folder: Annotated[Path, typer.Argument(help="A trained run or an adapted folder (manifest.json + model.safetensors).", show_default=False)],
    format: Annotated[str, typer.Option("--format", "-f", metavar="onnx|torchscript|exported", help="ONNX (onnxruntime), TorchScript (torch.jit.load) or torch.export (.pt2, torch.export.load).")] = "onnx",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output file (default: DIR/model.onnx, model.torchscript.pt or model.pt2).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Run the written file and compare its outputs with the model's.")] = True,
    trust_code: Annotated[bool, typer.Option("--trust-code", help="Run the file or module factory the folder's manifest names (it is code; torchvision and timm models need no flag).")] = False,
    as_json: Annotated[bool, shared_option("as_json")] = False,
) -> None:
    """Export the model for deployment, with its preprocessing in FILE.preprocess.json.

    The batch size stays dynamic. The written file is loaded back with its own runtime and its
    outputs compared with the model's before it replaces anything.

    Example: surgery export run/ --format onnx
    """
    from surgery.deploy import export as run_export

    rep = run_export(folder, format, out, force=force, verify=verify, trust_code=trust_code)
    if as_json:
        print_json(rep.to_json())
        return
    c = console()
    pre = rep.preprocess
    c.print(f"wrote {rep.out} ({rep.format}, {human_bytes(rep.bytes)}), input {'x'.join(map(str, rep.input_shape[1:]))} "
            f"with a dynamic batch, {pre['num_classes']} classes", markup=False)
    c.print(f"preprocess: {rep.preprocess_file} (resize {pre['resize']}, crop {'x'.join(map(str, pre['crop']))}, "
            f"{pre['interpolation']}, mean {pre['mean']}, std {pre['std']})", markup=False)
    if rep.max_abs_diff is not None:
        c.print(f"checked: the file's outputs match the model's (max |diff| {rep.max_abs_diff:.2g})", markup=False)
