"""`surgery inspect` of checkpoints with tens of thousands of tensors: a screenful unless the user
asks for more (--depth, --keys, --filter), every row in --json, and every hint printed works."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest

from cli.inspect_cmd import TREE_ROWS


def _save(path, tensors: dict[str, np.ndarray]):
    from safetensors.numpy import save_file

    save_file(tensors, path)
    return path


@pytest.fixture(scope="module")
def flat50k(tmp_path_factory):
    """The issue's file: `layer0.weight` .. `layer49999.weight`, numbered in the name."""
    one = np.zeros(2, np.float32)
    return _save(tmp_path_factory.mktemp("scale") / "flat.safetensors", {f"layer{i}.weight": one for i in range(50_000)})


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """2,000 blocks that alternate between two structures, so no two neighbours collapse (numbers
    zero-padded: safetensors stores names sorted)."""
    one = np.zeros(1, np.float32)
    return _save(tmp_path_factory.mktemp("scale") / "uneven.safetensors",
                 {f"layer{i:04d}.{'a' if i % 2 else 'b'}": one for i in range(2_000)})


def _tree_lines(stdout: str) -> list[str]:
    """The module tree's rows, header and cut lines excluded."""
    lines = stdout.split("module tree", 1)[1].splitlines()[2:]
    return [ln for ln in lines if ln.strip() and not ln.lstrip().startswith(("...", "--depth"))
            and not re.match(r"\d+ of \d+ tensors listed|  name ", ln)]


def test_fifty_thousand_numbered_names_print_a_screenful(cli, flat50k):
    start = time.process_time()
    r = cli("inspect", flat50k)
    took = time.process_time() - start
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) < 20, lines
    assert re.search(r"layer\{0\.\.49999\}  x50000 +100\.0K +50000", r.stdout)
    assert "more rows" not in r.stdout  # collapsed, nothing to cut
    assert took < 30  # was 21 s (65 s on a busy machine) for 100,010 lines


def test_a_tree_that_does_not_collapse_stops_after_a_screenful(cli, uneven):
    r = cli("inspect", uneven)
    assert r.exit_code == 0, r.stderr
    assert len(_tree_lines(r.stdout)) == TREE_ROWS
    assert len(r.stdout.splitlines()) < TREE_ROWS + 20
    hidden = 4_000 - TREE_ROWS
    assert f"... {hidden:,} more rows: {2_000 - TREE_ROWS // 2:,} more modules like layerN (" in r.stdout
    assert "--depth 2 prints all 4,000 rows, --json lists them, --keys lists every tensor" in r.stdout


def test_every_hint_shows_what_it_promises(cli, uneven):
    r = cli("inspect", uneven, "--depth", "2")  # asked: every row
    assert r.exit_code == 0 and len(_tree_lines(r.stdout)) == 4_000 and "more rows" not in r.stdout
    data = json.loads(cli("inspect", uneven, "--json").stdout)
    assert len(data["tree"]) == 4_000 and data["tree"][-1]["path"] == "layer1999.a"
    r = cli("inspect", uneven, "--keys")  # every tensor; the tree stays a screenful
    assert "2000 of 2000 tensors listed" in r.stdout and "layer0000.b" in r.stdout
    assert len(_tree_lines(r.stdout.split("  name ")[0])) == TREE_ROWS
    r = cli("inspect", uneven, "--filter", r"^layer01\d\d\.")
    assert "100 of 2000 tensors listed" in r.stdout
    r = cli("inspect", uneven, "--depth", "1")
    assert len(_tree_lines(r.stdout)) == 2_000
    r = cli("inspect", uneven, "--depth", "0")
    assert "module tree" not in r.stdout and len(r.stdout.splitlines()) < 20
    assert json.loads(cli("inspect", uneven, "--json", "--depth", "0").stdout)["tree"] == []


def _header_only(path, names: list[str], shape=(1,)):
    """A safetensors file of ``names`` (one float32 each), written as its header and zeros: cheap
    at tens of thousands of tensors."""
    n = int(np.prod(shape))
    header = {k: {"dtype": "F32", "shape": list(shape), "data_offsets": [4 * n * i, 4 * n * (i + 1)]}
              for i, k in enumerate(names)}
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(4 * n * len(names)))
    return path


@pytest.mark.parametrize("style", ["layer{i}.weight", "layers_{i}.weight", "h.{i}.attn.weight", "blocks.{i}.weight",
                                   "encoder.layer.{i}.attn.weight"])
def test_every_numbering_style_collapses_to_one_row(cli, tmp_path, style):
    names = [style.format(i=i) for i in range(3_000)]
    path = _header_only(tmp_path / "many.safetensors", names)
    r = cli("inspect", path, "--depth", "9")  # every row
    assert r.exit_code == 0, r.stderr
    rows = _tree_lines(r.stdout)
    assert len(rows) == style.count(".") + 1 and "{0..2999}  x3000" in r.stdout, rows
    assert len(json.loads(cli("inspect", path, "--json", "--depth", "9").stdout)["tree"]) == len(rows)


def test_a_large_file_that_nothing_collapses_prints_a_screenful_and_json_every_row(cli, tmp_path):
    """5,000 modules of two tensors each, neighbours of different shapes: 15,000 rows at depth 2."""
    off, header = 0, {}
    for i in range(5_000):
        for p in ("a", "b"):
            header[f"blk{i}.{p}"] = {"dtype": "I8", "shape": [1 + i % 2], "data_offsets": [off, off + 1 + i % 2]}
            off += 1 + i % 2
    raw = json.dumps(header).encode()
    path = tmp_path / "uneven.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(off))
    r = cli("inspect", path)
    assert r.exit_code == 0, r.stderr
    assert len(r.stdout.splitlines()) <= TREE_ROWS + 20
    hidden = 15_000 - TREE_ROWS
    shown = TREE_ROWS // 3  # whole modules shown; the next one's row is shown, its two tensors are not
    assert f"... {hidden:,} more rows: {2 + 5_000 - shown - 1:,} more modules like blkN (" in r.stdout
    assert len(json.loads(cli("inspect", path, "--json").stdout)["tree"]) == 15_000


def test_a_long_tied_group_prints_its_first_names(cli, tmp_path):
    import torch

    shared = torch.zeros(2)
    path = tmp_path / "tied.pt"
    torch.save({f"w{i}": shared for i in range(1_000)}, path)
    r = cli("inspect", path)
    assert r.exit_code == 0, r.stderr
    assert "w0 = w1 = w2 = w3 = ... (1,000 names, --json lists them)" in r.stdout
    assert len(r.stdout.splitlines()) < 20
    assert len(json.loads(cli("inspect", path, "--json").stdout)["tied"][0]) == 1_000


def test_a_long_table_prints_what_rich_prints(cli, tmp_path, monkeypatch):
    """Long listings skip rich's layout (a millisecond a row); where both fit, the text is the same."""
    import cli.inspect_cmd as inspect_cmd

    odd = ["layer[bold]1[/bold].w", "caf\u00e9.w", "\u65e5\u672c.w", "esc\x1b[31m.w", "tab\there.w"]
    path = _save(tmp_path / "odd.safetensors", {**{n: np.zeros(3, np.float32) for n in odd},
                                                **{f"blocks.{i}.w": np.zeros(i + 1, np.int8) for i in range(30)}})
    for args in (["--keys"], ["--depth", "3"], ["--filter", "w"]):
        monkeypatch.setattr(inspect_cmd, "LONG_TABLE", 10**9)
        by_rich = cli("inspect", path, *args).stdout
        monkeypatch.setattr(inspect_cmd, "LONG_TABLE", 1)
        here = cli("inspect", path, *args).stdout
        assert here == by_rich
        assert "layer[bold]1[/bold]" in here and "esc\\x1b[31m" in here
