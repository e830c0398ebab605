"""`surgery inspect` over a model zoo: many paths, folders and globs in one process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import surgery


@pytest.fixture
def zoo(make, tmp_path) -> Path:
    """zoo/ with every kind of checkpoint, a broken one, a refused one, and files to skip."""
    root = tmp_path / "zoo"
    (root / "vision" / "old").mkdir(parents=True)
    shutil.copy(make("plain_safetensors"), root / "vision" / "a.safetensors")
    shutil.copy(make("plain_pt"), root / "vision" / "b.pt")
    shutil.copy(make("legacy_pt"), root / "vision" / "old" / "c.pth")
    shutil.copytree(make("sharded_safetensors"), root / "sharded")
    shutil.copytree(make("dcp_dir"), root / "dcp")
    shutil.copy(make("malicious_pickle_pt"), root / "evil.pt")
    (root / "broken.bin").write_bytes(b"not a checkpoint at all")
    (root / "notes.txt").write_text("not scanned")
    (root / ".cache").mkdir()
    shutil.copy(make("plain_pt"), root / ".cache" / "hidden.pt")
    return root


OK = ["dcp", "sharded", "vision/a.safetensors", "vision/b.pt", "vision/old/c.pth"]
FAILED = ["broken.bin", "evil.pt"]


def _rel(root: Path, p: str) -> str:
    return Path(p).relative_to(root).as_posix()


def test_json_lines_one_per_checkpoint_errors_are_rows(zoo, cli, make):
    r = cli("inspect", zoo, "--json")
    assert r.exit_code == 2, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert sorted(_rel(zoo, x["path"]) for x in rows) == sorted(OK + FAILED)
    errors = {_rel(zoo, x["path"]): x for x in rows if x["schema"] == "surgery.inspect-error/1"}
    assert sorted(errors) == FAILED
    assert errors["evil.pt"]["kind"] == "UnsafeCheckpointError" and "refusing to unpickle" in errors["evil.pt"]["error"]
    assert "unrecognised format" in errors["broken.bin"]["error"]
    assert not (make("malicious_pickle_pt").parent / "PWNED").exists()  # refused, never run
    assert r.stderr.strip() == 'error: 2 of 7 checkpoints could not be read (the lines with an "error")'
    for x in rows:  # each ok line is what inspect --json prints for that path alone
        if x["schema"] == "surgery.inspect/1":
            assert x == json.loads(cli("inspect", x["path"], "--json").stdout)


def test_table_and_exit_codes(zoo, cli):
    r = cli("inspect", zoo)
    assert r.exit_code == 2
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["path", "format", "tensors", "params", "size", "dtypes", "architecture", "status"]
    assert len(lines) == 1 + len(OK) + len(FAILED) + 1
    b = next(line for line in lines if line.startswith(str(zoo / "vision" / "b.pt")))
    assert b.split()[1:4] == ["torch-zip", "244", "1.54M"] and "mobilenet_v3_small (1.00)" in b and b.endswith("ok")
    assert lines[-1] == "7 checkpoints: 5 read, 2 failed"
    assert [line.split(":")[0] for line in r.stderr.splitlines()] == ["error", "error"]
    ok = cli("inspect", zoo / "vision", zoo / "sharded")
    assert ok.exit_code == 0, ok.stderr
    assert ok.stdout.splitlines()[-1] == "4 checkpoints: 4 read, 0 failed"


def test_globs_and_a_pattern_that_matches_nothing(zoo, cli):
    r = cli("inspect", f"{zoo}/**/*.pt*", "--json")
    assert sorted(_rel(zoo, json.loads(x)["path"]) for x in r.stdout.splitlines()) == ["evil.pt", "vision/b.pt", "vision/old/c.pth"]
    r = cli("inspect", f"{zoo}/*.nothing", zoo / "vision" / "a.safetensors", "--json")
    assert r.exit_code == 2
    first = json.loads(r.stdout.splitlines()[0])
    assert first["path"].endswith("*.nothing") and "no such file" in first["error"]


def test_a_single_checkpoint_prints_the_full_report(zoo, cli):
    for path in (zoo / "vision" / "b.pt", zoo / "sharded"):
        r = cli("inspect", path)
        assert r.exit_code == 0, r.stderr
        assert r.stdout.startswith("checkpoint") and "module tree" in r.stdout
    r = cli("inspect", zoo / "broken.bin")
    assert r.exit_code == 2 and r.stdout == "" and "unrecognised format" in r.stderr


def test_a_folder_without_checkpoints_is_one_error(cli, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("x")
    r = cli("inspect", tmp_path, "--json")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr == f"error: {tmp_path}: no checkpoints found (looked for files ending in .safetensors, .pt, .pth, " \
                       f".bin, .ckpt, .pth.tar, and sharded or DCP folders)\n"


def test_keys_need_json_in_a_scan(zoo, cli):
    r = cli("inspect", zoo, "--keys")
    assert r.exit_code == 2 and "--keys/--filter list one checkpoint's tensors" in r.stderr
    r = cli("inspect", zoo / "vision", "--json", "--filter", "^features\\.0\\.0\\.", "--depth", "0")
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert all(x["tree"] == [] for x in rows)
    assert [t["name"] for t in rows[0]["tensors"]] == ["features.0.0.weight"]


def test_processes_give_the_same_rows_in_order(make, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(70):
        shutil.copy(make("legacy_pt" if i % 2 else "plain_safetensors"), folder / f"m{i:03d}.pt")
    (folder / "m005.pt").write_bytes(b"junk")
    serial = [r.to_json() for r in surgery.scan([folder], workers=1)]
    parallel = [r.to_json() for r in surgery.scan([folder], workers=2)]
    assert serial == parallel and len(serial) == 70
    assert [r["path"] for r in serial] == sorted(str(p) for p in folder.iterdir())
    assert serial[5]["schema"] == "surgery.inspect-error/1"


def test_bad_filter_is_refused_once(zoo):
    with pytest.raises(surgery.SurgeryError, match=r"--filter '\(' is not a valid regular expression"):
        surgery.scan([zoo], filter="(")
