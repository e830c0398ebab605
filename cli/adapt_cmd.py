"""`surgery adapt CKPT --arch ARCH --num-classes N --out DIR`: load, swap the head, freeze."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from surgery.errors import AdaptError

from .common import console, escaped, handles_errors, human_count, print_json
from .remap_cmd import _KeepsArgOrder, ops_in_order


def register(app: typer.Typer) -> None:
    app.command("adapt", cls=_KeepsArgOrder)(adapt)


@handles_errors
def adapt(
    ctx: typer.Context,
    ckpt: Annotated[Optional[Path], typer.Argument(help="Checkpoint to load (any format surgery reads); omit with --weights.", show_default=False)] = None,
    arch: Annotated[str, typer.Option("--arch", help="torchvision model name, timm:NAME, path/to/file.py:fn or package.module:fn.", show_default=False)] = "",
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", help="Outputs of the new head.", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder to write model.safetensors, manifest.json, load_report.json.", show_default=False)] = None,
    weights: Annotated[Optional[str], typer.Option("--weights", metavar="NAME", help="Start from torchvision's weights (DEFAULT, IMAGENET1K_V2, ...) instead of CKPT.")] = None,
    arch_kwargs: Annotated[Optional[str], typer.Option("--arch-kwargs", metavar="JSON", help="Keyword arguments for the model factory, a JSON object.")] = None,
    head: Annotated[str, typer.Option("--head", help="linear, or mlp (concat pool + BN/dropout/linear x2, CNN backbones).")] = "linear",
    hidden: Annotated[int, typer.Option("--hidden", help="Hidden width of the mlp head.")] = 512,
    dropout: Annotated[float, typer.Option("--dropout", help="Dropout of the mlp head (the first layer uses half).")] = 0.5,
    in_chans: Annotated[int, typer.Option("--in-chans", help="Input channels; the first conv's weights are adapted.")] = 3,
    input_size: Annotated[Optional[int], typer.Option("--input-size", help="Input size for the probe and the manifest (default: the weights' or 224); a timm ViT is rebuilt for it (img_size).")] = None,
    mean: Annotated[Optional[str], typer.Option("--mean", metavar="M,M,M", help="Normalisation mean per input channel, recorded in the manifest (default: the weights' metadata, else ImageNet's); one value for --in-chans 1.", show_default=False)] = None,
    std: Annotated[Optional[str], typer.Option("--std", metavar="S,S,S", help="Normalisation std per input channel, as --mean.", show_default=False)] = None,
    freeze: Annotated[Optional[str], typer.Option("--freeze", metavar="head-only|none", help="Base freeze policy.")] = None,
    freeze_until: Annotated[Optional[str], typer.Option("--freeze-until", metavar="MODULE", help="Freeze everything before MODULE (e.g. layer3).")] = None,
    freeze_first: Annotated[Optional[int], typer.Option("--freeze-first", metavar="N", help="Freeze the first N top-level children that have parameters.")] = None,
    freeze_regex: Annotated[Optional[str], typer.Option("--freeze-regex", metavar="REGEX", help="Also freeze parameters matching REGEX.")] = None,
    train_regex: Annotated[Optional[str], typer.Option("--train-regex", metavar="REGEX", help="Keep parameters matching REGEX trainable (applied last).")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", metavar="small-similar|small-different|large-similar|large-different", help="Data-regime preset.")] = None,
    backbone_lr_mult: Annotated[Optional[float], typer.Option("--backbone-lr-mult", help="LR multiplier of pretrained layers (default 0.1).")] = None,
    layer_decay: Annotated[Optional[float], typer.Option("--layer-decay", help="Multiply the LR by this per stage, going down from the top.")] = None,
    unfreeze_at: Annotated[Optional[int], typer.Option("--unfreeze-at", metavar="EPOCH", help="Everything trains after EPOCH epochs (from epoch EPOCH+1, as train counts them).")] = None,
    gradual: Annotated[bool, typer.Option("--gradual", help="Unfreeze one stage more per epoch, from the top.")] = False,
    bn: Annotated[Optional[str], typer.Option("--bn", metavar="frozen|train", help="Frozen BatchNorm layers stay in eval mode (default frozen).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Anything missing besides the new head is an error.")] = False,
    min_coverage: Annotated[float, typer.Option("--min-coverage", help="Refuse when less of the backbone than this loads.")] = 0.5,
    strip_prefix: Annotated[Optional[list[str]], typer.Option("--strip-prefix", metavar="P", help="Remove prefix P from checkpoint keys first.")] = None,
    rename: Annotated[Optional[list[str]], typer.Option("--rename", metavar="'REGEX=>REPL'", help="re.sub on checkpoint keys first.")] = None,
    drop: Annotated[Optional[list[str]], typer.Option("--drop", metavar="REGEX", help="Ignore checkpoint keys matching REGEX.")] = None,
    rules_file: Annotated[Optional[Path], typer.Option("--rules", help="Rules file (as for remap); its ops run first.")] = None,
    select: Annotated[Optional[str], typer.Option("--select", metavar="PATH", help="Container inside the checkpoint, e.g. state_dict_ema.")] = None,
    allow_global: Annotated[Optional[list[str]], typer.Option("--allow-global", metavar="module.Class", help="Accept this pickled global as opaque data.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and the folder written.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Load a checkpoint into ARCH with a new N-class head, frozen by policy, ready to train.

    Writes DIR/model.safetensors, DIR/manifest.json and DIR/load_report.json.

    Example: surgery adapt ddp.pth --arch resnet18 --num-classes 4 --freeze head-only --out adapted/
    """
    # imported here, not at the top: every command's start (and `surgery --help`) would pay for them
    from surgery.adapter.core import adapt_with
    from surgery.adapter.options import AdaptOptions

    options = AdaptOptions.create(
        arch=arch, num_classes=num_classes, out=out, weights=weights, arch_kwargs=arch_kwargs,
        rules=_rules(ctx, rules_file, strip_prefix, rename, drop), select=select, allow_globals=allow_global or (),
        head=head, hidden=hidden, dropout=dropout, in_chans=in_chans, input_size=input_size, mean=mean, std=std,
        freeze=freeze,
        freeze_until=freeze_until, freeze_first=freeze_first, freeze_regex=freeze_regex, train_regex=train_regex,
        preset=preset, backbone_lr_mult=backbone_lr_mult, layer_decay=layer_decay, unfreeze_at=unfreeze_at,
        gradual=gradual, bn=bn, strict=strict, min_coverage=min_coverage, force=force)
    if out is None:  # the library may adapt in memory only; the command always writes
        raise AdaptError("--out DIR is required: where to write the adapted model")
    _, report = adapt_with(str(ckpt) if ckpt is not None else None, options)
    if as_json:
        print_json(report.to_json())
        return
    render(report, quiet=quiet)


def _rules(ctx: typer.Context, rules_file: Optional[Path], strip_prefix: Optional[list[str]],
           rename: Optional[list[str]], drop: Optional[list[str]]):
    """The rules file's ops, then the flags' ops in the order they were typed."""
    from surgery.remapping import Rules

    rules = Rules.from_file(rules_file) if rules_file else Rules()
    values = {"strip_prefix": strip_prefix or [], "add_prefix": [], "rename": rename or [], "drop": drop or [],
              "keep": [], "dtype": []}
    raw = [a for a in ctx.meta.get("surgery.raw_args", []) if a.split("=", 1)[0] != "--auto"]
    rules.ops.extend(ops_in_order(raw, values))
    return rules


def render(report, quiet: bool = False) -> None:
    out = console()
    if not quiet:
        _render_load(out, report)
    for w in report.warnings:
        out.print(f"[yellow]warning[/yellow]: {escaped(w)}")
    out.print(f"wrote {escaped(report.out, markup=False)}", markup=False)


def _render_load(out, report) -> None:
    from rich.table import Table

    rep = report.load
    a = rep.alignment
    how = ""
    if a is not None and (a.wrappers or a.method != "identity"):
        bits = [f"stripped {''.join(a.wrappers)}"] if a.wrappers else []
        if a.method == "prefix":
            bits.append(f"mapped {a.ckpt_prefix or '(root)'} -> {a.model_prefix or '(root)'}")
        elif a.method == "suffix":
            bits.append("matched by key suffix")
        how = f" ({', '.join(bits)})"
    out.print(f"loaded {len(rep.loaded)} tensors, coverage {rep.coverage:.1%} of the model's parameters{how}")
    for title, keys in (("missing (newly initialised)", rep.missing), ("unexpected (unused)", rep.unexpected),
                        ("new head", rep.head_new), ("old head, dropped", rep.head_dropped)):
        if keys:
            from surgery.keys import collapse_keys

            grouped = collapse_keys(keys)
            shown = ", ".join(grouped[:8]) + (f", ... ({len(grouped) - 8} more)" if len(grouped) > 8 else "")
            out.print(f"  {title} ({len(keys)} tensors): {escaped(shown)}")
    for ck, m, cs, ms in rep.mismatched:
        out.print(f"  [yellow]shape mismatch, skipped[/yellow]: {escaped(m)} checkpoint {list(cs)} vs model {list(ms)}")
    for n, cs, ms in rep.resized:
        out.print(f"  interpolated {escaped(n)}: {list(cs)} -> {list(ms)}")
    for n in rep.adapted:
        out.print(f"  adapted {escaped(n)} to the input channels")
    table = Table(title="parameter groups", title_justify="left", show_edge=False)
    for col in ("group", "params", "trainable now", "lr mult", "unfreezes"):
        table.add_column(col)
    for g in report.groups:
        # epochs counted from 1, as train prints them: --unfreeze-at 3 trains the group from epoch 4
        when = "-" if g["trainable"] else (f"epoch {g['unfreeze_at'] + 1}" if g["unfreeze_at"] is not None else "never")
        table.add_row(escaped(g["name"]), human_count(g["numel"]), "yes" if g["trainable"] else "no", f"{g['lr_mult']:g}",
                      when)
    out.print(table)
    inp = report.manifest["input"]
    out.print(f"input: {inp['size'][0]}x{inp['size'][1]} px (resize {inp['resize']}, {inp['interpolation']}), "
              f"{inp['channels']} channels, mean {_listed(inp['mean'])}, std {_listed(inp['std'])} "
              f"(from {escaped(inp['source'], markup=False)})", markup=False)
    bn = report.manifest["bn"]
    out.print(f"BatchNorm: {bn_line(bn['policy'], len(report.frozen_bn()), len(bn['modules']))}")


def _listed(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def bn_line(policy: str, held: int, total: int) -> str:
    """What the BatchNorm policy does to this model, in words that stay true when nothing is frozen."""
    if total == 0:
        return "none in the backbone"
    if held == 0:
        why = "nothing is frozen" if policy == "frozen" else "--bn train"
        return f"all {total} layers update their statistics while training ({why})"
    rest = f"; the other {total - held} update theirs" if held < total else ""
    return (f"{held} of {total} layers keep their pretrained statistics for the whole run (eval mode, also after an "
            f"unfreeze){rest}")


__all__ = ["register", "adapt", "render", "json"]

