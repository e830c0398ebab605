"""Entry point: `surgery COMMAND ...`. Each command lives in its own module."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from surgery import __version__

from . import (adapt_cmd, advise_cmd, demo_cmd, diff_cmd, evaluate_cmd, export_cmd, inspect_cmd, predict_cmd,
               remap_cmd, train_cmd)

app = typer.Typer(
    name="surgery",
    help="Inspect, clean, adapt and fine-tune PyTorch checkpoints.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"surgery {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """Inspect, clean, adapt and fine-tune PyTorch checkpoints."""


inspect_cmd.register(app)
remap_cmd.register(app)
adapt_cmd.register(app)
advise_cmd.register(app)
train_cmd.register(app)
evaluate_cmd.register(app)
predict_cmd.register(app)
export_cmd.register(app)
diff_cmd.register(app)
demo_cmd.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
