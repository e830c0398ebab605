"""Start a Python module in a new process without importing anything from the working directory.

``python -m MODULE`` puts the current folder first on ``sys.path``, so a ``cli/``, ``surgery/`` or
``torch/`` folder there would run instead of the installed code. :func:`module_command` starts
the interpreter with a small bootstrap that removes the current folder from ``sys.path``, puts
first the folder the running code was imported from, and only then imports MODULE.

    >>> cmd = module_command("surgery.cli.main", ["inspect", "model.pt"])  # doctest: +SKIP
    >>> subprocess.run(cmd)                                                 # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Sequence

from .errors import SurgeryError

# argv: ROOT MODULE ARGS...; run as ``python -c BOOTSTRAP ROOT MODULE ARGS...``
# (os and sys are loaded before the command runs; runpy is imported only once the path is clean)
BOOTSTRAP = (
    "import os, sys\n"
    "root, mod = sys.argv[1], sys.argv[2]\n"
    "here = os.path.realpath(os.getcwd())\n"
    "sys.path[:] = [root] + [p for p in sys.path if p and os.path.realpath(p) not in (here, root)]\n"
    "sys.argv = [mod, *sys.argv[3:]]\n"
    "import runpy\n"
    "runpy.run_module(mod, run_name='__main__', alter_sys=True)\n"
)


def import_root(module: str) -> str:
    """The folder ``module``'s top-level package was imported from in this process (or would be:
    found without running it)."""
    name = module.split(".")[0]
    top = sys.modules.get(name)
    where = getattr(top, "__file__", None)
    if where is None and top is None:
        spec = importlib.util.find_spec(name)
        where = spec.origin if spec is not None and spec.has_location else None
    if not where:
        raise SurgeryError(f"cannot launch {module}: its package {name} is not in a folder")
    return str(Path(where).resolve().parent.parent)


def module_command(module: str, argv: Sequence[str] = (), *, root: str | None = None,
                   python: str | None = None) -> list[str]:
    """``[python, -c, BOOTSTRAP, ROOT, MODULE, *argv]``: runs MODULE as ``python -m`` would, but
    imported from ROOT (default: where this process imported MODULE's package), never from the
    working directory."""
    return [python or sys.executable, "-c", BOOTSTRAP, root or import_root(module), module, *map(str, argv)]
