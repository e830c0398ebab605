"""Entry point: `surgery COMMAND ...`. Each command lives in its own module."""

from __future__ import annotations

import importlib
import sys
from typing import Annotated, Optional

import typer

from surgery import __version__

# command name -> its module, in the order `surgery --help` lists them
COMMANDS = {
    "inspect": "inspect_cmd", "remap": "remap_cmd", "adapt": "adapt_cmd", "advise": "advise_cmd",
    "train": "train_cmd", "evaluate": "evaluate_cmd", "predict": "predict_cmd", "export": "export_cmd",
    "trust": "trust_cmd", "diff": "diff_cmd", "average": "average_cmd", "sanitize": "sanitize_cmd",
    "match": "match_cmd", "merge": "merge_cmd", "merge-lora": "merge_lora_cmd", "extract-lora": "extract_lora_cmd",
    "soup": "soup_cmd",
    "demo": "demo_cmd",
}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"surgery {__version__}")
        raise typer.Exit()


def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """Inspect, clean, adapt and fine-tune PyTorch checkpoints."""


def build_app(commands: tuple[str, ...] = tuple(COMMANDS)) -> typer.Typer:
    """The Typer app with ``commands`` registered (every command unless told otherwise)."""
    app = typer.Typer(
        name="surgery",
        help="Inspect, clean, adapt and fine-tune PyTorch checkpoints.",
        no_args_is_help=True,
        add_completion=True,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_root)
    for name in commands:
        importlib.import_module(f"{__package__}.{COMMANDS[name]}").register(app)
    return app


def __getattr__(name: str) -> typer.Typer:
    # `app` (what tests and the demo run in-process) is built on first use, with every command
    if name == "app":
        app = globals()["app"] = build_app()
        return app
    raise AttributeError(name)


def main() -> None:
    # Typer builds a parser for every registered command before it parses anything; a command
    # named on the command line needs only its own (help, completion and typos get them all).
    argv = sys.argv[1:]
    named = argv[0] if argv and argv[0] in COMMANDS else None
    (build_app((named,)) if named else build_app())()


if __name__ == "__main__":
    main()
