"""The `surgery` command line: thin Typer commands over the `surgery` library."""
