"""`surgery extract-lora BASE TUNED --rank R --out ADAPTER_DIR`: a fine-tune's difference as a peft LoRA adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import console, escaped, handles_errors, human_bytes, print_json, shared_option


def register(app: typer.Typer) -> None:
    app.command("extract-lora")(extract_lora)


@handles_errors
def extract_lora(
    base: Annotated[Path, typer.Argument(help="The base checkpoint, any format surgery reads.", show_default=False)],
    tuned: Annotated[Path, typer.Argument(help="The same model fine-tuned: same names, shapes and dtypes.",
                                          show_default=False)],
    rank: Annotated[int, typer.Option("--rank", "-r", help="The LoRA rank (tensors smaller keep their full rank).",
                                      show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="The adapter folder to write (adapter_config.json, "
                                                          "adapter_model.safetensors).", show_default=False)],
    fan_in_fan_out: Annotated[bool, typer.Option("--fan-in-fan-out", help="The linears are GPT-2's Conv1D "
                                                                          "(weights stored transposed, in by out).")] = False,
    embedding: Annotated[Optional[list[str]], typer.Option("--embedding", metavar="NAME",
                                                           help="An nn.Embedding weight (repeatable): factored as "
                                                                "peft's lora_embedding_A/B.")] = None,
    force: Annotated[bool, shared_option("force")] = False,
    allow_global: Annotated[Optional[list[str]], shared_option("allow_globals")] = None,
    as_json: Annotated[bool, shared_option("as_json")] = False,
) -> None:
    """Factor TUNED - BASE by a truncated SVD into a peft LoRA adapter (lora_alpha = r, scale 1) that
    PeftModel.from_pretrained loads and merge-lora merges; prints each tensor's relative residual. Changed
    biases, norms and buffers are listed: a LoRA cannot carry them."""
    from surgery.merging.lora_extract import extract_lora as run

    rep = run(base, tuned, out, rank, fan_in_fan_out=fan_in_fan_out, embeddings=tuple(embedding or ()), force=force,
              allow_globals=tuple(allow_global or ()))
    if as_json:
        print_json(rep.to_json())
        return
    c = console()
    for f in rep.factored:
        c.print(f"  {escaped(f.name)}  rank {f.rank}, residual {f.residual:.3g}" + ("" if f.layout == "linear" else f", {f.layout}"))
    for name, why in rep.not_representable.items():
        c.print(f"  not carried: {escaped(name)} ({escaped(why)}); merging keeps the base's")
    worst = max(f.residual for f in rep.factored)
    n = len(rep.factored)
    c.print(f"{n} tensor{'s' if n != 1 else ''} factored at rank {rep.rank} (largest residual {worst:.3g}), "
            f"{rep.unchanged} unchanged, {len(rep.not_representable)} not carried; wrote {escaped(rep.out)} "
            f"({human_bytes(rep.bytes_written)})")
