"""`surgery merge-lora BASE ADAPTER --out OUT`: a LoRA adapter folded into its base checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import console, escaped, handles_errors, human_bytes, print_json, shared_option


def register(app: typer.Typer) -> None:
    app.command("merge-lora")(merge_lora)


@handles_errors
def merge_lora(
    base: Annotated[Path, typer.Argument(help="The base checkpoint: a file or a Hugging Face folder, any format "
                                              "surgery reads.", show_default=False)],
    adapter: Annotated[Path, typer.Argument(help="A peft adapter folder (adapter_config.json + adapter_model."
                                                 "safetensors or .bin) or a kohya/diffusers LoRA .safetensors file.",
                                            show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output: .safetensors, .pt, or a folder (sharded).",
                                      show_default=False)],
    force: Annotated[bool, shared_option("force")] = False,
    allow_global: Annotated[Optional[list[str]], shared_option("allow_globals")] = None,
    as_json: Annotated[bool, shared_option("as_json")] = False,
) -> None:
    """Merge a LoRA adapter into its base as peft's merge_and_unload() does: W + scale * B @ A per target
    (Linear, Conv1D, Embedding, Conv), in float32, cast back; modules_to_save copies replace theirs.
    Every adapter key must land on a base tensor of the right shape. Streamed."""
    from surgery.merging.lora import merge_lora as run

    rep = run(base, adapter, out, force=force, allow_globals=tuple(allow_global or ()))
    if as_json:
        print_json(rep.to_json())
        return
    c = console()
    for t in rep.merged[:8]:
        c.print(f"  {escaped(t.name)}  rank {t.rank}, scale {t.scale:g}" + ("" if t.layout == "linear" else f", {t.layout}"))
    if len(rep.merged) > 8:
        c.print(f"  ... {len(rep.merged) - 8} more")
    replaced = f", {len(rep.replaced)} replaced by the adapter's copies" if rep.replaced else ""
    n = len(rep.merged)
    c.print(f"{n} tensor{'s' if n != 1 else ''} merged{replaced}, {rep.copied} copied; wrote {rep.format} {escaped(rep.out)} "
            f"({human_bytes(rep.bytes_written)})")
