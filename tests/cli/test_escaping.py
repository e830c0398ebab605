"""Names from a file never steer the terminal: control characters in keys, metadata and paths
print as escapes (\\x1b), rich markup in them prints as typed, and --json keeps the raw names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

MARKUP = "layer[bold]1[/bold].weight"
EVIL = "evil\x1b[2J\x1b]0;owned\x07.weight"
EVIL_SHOWN = "evil\\x1b[2J\\x1b]0;owned\\x07.weight"
NOTE = "\x1b[31mred\x1b[0m [bold]loud[/bold]"
NOTE_SHOWN = "\\x1b[31mred\\x1b[0m [bold]loud[/bold]"


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("esc")
    a, b = root / "a.safetensors", root / "b.safetensors"
    save_file({MARKUP: torch.ones(2, 2), EVIL: torch.zeros(3), "fc.weight": torch.ones(4)}, str(a),
              metadata={"note": NOTE})
    save_file({MARKUP: torch.ones(3, 2), "only[red]b[/red]": torch.ones(1), "fc.weight": torch.full((4,), 2.0)},
              str(b))
    return a, b


def _clean(text: str) -> None:
    """No byte that a terminal acts on: ESC, BEL, CSI (8-bit), carriage return."""
    for c in ("\x1b", "\x07", "\x9b", "\r"):
        assert c not in text, repr(text)


def test_inspect_table_escapes_keys_and_metadata(cli, pair):
    r = cli("inspect", pair[0])
    assert r.exit_code == 0, r.output
    _clean(r.stdout)
    assert f"note={NOTE_SHOWN}" in r.stdout
    assert "layer[bold]1[/bold]" in r.stdout  # the module tree shows the name as it is


def test_inspect_keys_escapes_every_name(cli, pair):
    r = cli("inspect", pair[0], "--keys")
    assert r.exit_code == 0, r.output
    _clean(r.stdout)
    assert MARKUP in r.stdout and EVIL_SHOWN in r.stdout


def test_inspect_json_stays_valid_with_the_raw_names(cli, pair):
    r = cli("inspect", pair[0], "--keys", "--json")
    assert r.exit_code == 0, r.output
    _clean(r.stdout)  # json.dumps writes \u001b
    strings = set(_strings(json.loads(r.stdout)))
    assert {EVIL, MARKUP, NOTE} <= strings


def _strings(data):
    if isinstance(data, dict):
        for k, v in data.items():
            yield k
            yield from _strings(v)
    elif isinstance(data, list):
        for v in data:
            yield from _strings(v)
    elif isinstance(data, str):
        yield data


def test_a_scan_escapes_paths(cli, pair, tmp_path):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    shutil.copyfile(pair[0], zoo / "x\x1b[31m[bold]a.safetensors")
    shutil.copyfile(pair[1], zoo / "b.safetensors")
    r = cli("inspect", zoo)
    assert r.exit_code == 0, r.output
    _clean(r.stdout)
    assert "x\\x1b[31m[bold]a.safetensors" in r.stdout


def test_diff_escapes_names(cli, pair):
    r = cli("diff", *pair)
    assert r.exit_code == 1, r.output
    _clean(r.stdout)
    assert f"only in A: {EVIL_SHOWN}" in r.stdout
    assert "only in B: only[red]b[/red]" in r.stdout
    assert f"shape: {MARKUP}  [2, 2] vs [3, 2]" in r.stdout
    assert f"max |A-B| 1  fc.weight" in r.stdout


def test_remap_escapes_names_and_ops(cli, pair, tmp_path):
    r = cli("remap", pair[0], tmp_path / "out.safetensors", "--dry-run", "--rename", "^fc=>head[bold]",
            "--drop", "x[red]")
    assert r.exit_code == 0, r.output
    _clean(r.stdout)
    assert MARKUP in r.stdout and EVIL_SHOWN in r.stdout
    assert "head[bold].weight" in r.stdout
    assert "drop x[red]: 0 keys" in r.stdout


def test_an_error_line_escapes_what_it_quotes(cli, tmp_path):
    r = cli("inspect", tmp_path / "no\x1b[31msuch[bold]file.pt")
    assert r.exit_code == 2
    _clean(r.stderr)
    assert "no\\x1b[31msuch[bold]file.pt" in r.stderr and r.stderr.count("\n") == 1


def test_escaped_helper():
    from cli.common import escaped

    assert escaped("a\x1b[1mb\u202ec\n") == "a\\x1b[1mb\\u202ec\\x0a"
    assert escaped("[bold]x[/bold]") == "\\[bold]x\\[/bold]"  # rich prints it as typed
    assert escaped("[bold]x", markup=False) == "[bold]x"


def test_train_log_lines_and_trust_escape_control_characters(capsys):
    from cli.train_cmd import Renderer

    r = Renderer(False, False)
    r("log", {"message": "classes (2): a\x1b[2Jb, c"})
    out = capsys.readouterr().out
    assert "\x1b" not in out and "a\\x1b[2Jb" in out


def test_invisible_and_direction_changing_characters_are_shown():
    from cli.common import escaped

    # a zero-width space makes two different keys look alike; separators and marks move text
    assert escaped("conv1\u200b.weight") == "conv1\\u200b.weight"
    assert escaped("x\u2028y\u200f\u061c\ufeff") == "x\\u2028y\\u200f\\u061c\\ufeff"
