"""Plain option values (str, int, bool, lists of them) are taken without pydantic; any other value
still gets Typer's own conversion and error message."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests import REPO


def test_plain_values_import_no_pydantic(make):
    code = ("import sys\nfrom cli.main import main\nsys.argv = ['surgery', 'inspect', sys.argv[1], '--depth', '3', "
            "'--filter', 'fc', '--allow-global', 'a.B']\ntry:\n    main()\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\nprint('pydantic' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code, str(make("plain_pt"))], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("args, match", [
    (["--depth", "-1"], "--depth"), (["--depth", "two"], "--depth"), (["--depth", "1.5"], "--depth"),
    (["--workers", "0"], "--workers"),
])
def test_other_values_get_typers_errors(cli, make, args, match):
    r = cli("inspect", make("plain_pt"), *args)
    assert r.exit_code == 2 and "Invalid value" in r.stderr and match in r.stderr, r.stderr


@pytest.mark.parametrize("args", [["--depth", "0"], ["--depth", "007"], ["--workers", "1", "--json"]])
def test_plain_values_work(cli, make, args):
    r = cli("inspect", make("plain_pt"), *args)
    assert r.exit_code == 0, r.stderr
