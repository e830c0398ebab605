"""`surgery inspect` over a model zoo: many paths, folders and globs in one process."""

from __future__ import annotations

import json
import os
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
    assert r.stderr.splitlines() == ["1 file skipped (not checkpoints)",
                                     'error: 2 of 7 checkpoints could not be read (the lines with an "error")']
    for x in rows:  # each ok line is what inspect --json prints for that path alone
        if x["schema"] == "surgery.inspect/1":
            assert x == json.loads(cli("inspect", x["path"], "--json").stdout)


def test_table_and_exit_codes(zoo, cli):
    r = cli("inspect", zoo)
    assert r.exit_code == 2
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["path", "format", "tensors", "params", "size", "dtypes", "architecture", "status"]
    assert len(lines) == 1 + len(OK) + len(FAILED) + 2
    b = next(line for line in lines if line.startswith(str(zoo / "vision" / "b.pt")))
    assert b.split()[1:4] == ["torch-zip", "244", "1.54M"] and "mobilenet_v3_small (1.00)" in b and b.endswith("ok")
    assert lines[-2:] == ["7 checkpoints: 5 read, 2 failed", "1 file skipped (not checkpoints)"]
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
    assert r.stderr == f"error: {tmp_path}: no checkpoints found: 1 file skipped (not checkpoints), no sharded or DCP " \
                       f"folder (a file is a checkpoint when its first bytes are safetensors, a torch zip, a legacy " \
                       f"torch pickle or a torch tar, whatever its name)\n"


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


@pytest.fixture
def pretrained(make, tmp_path) -> Path:
    """pretrained_models/ as a 2018 CIFAR repository ships it: four .th files, a torch zip named
    .tar, beside files that are no checkpoints whatever they are named."""
    import tarfile
    import zipfile

    root = tmp_path / "pretrained_models"
    root.mkdir()
    for depth in (20, 32, 44, 56):
        shutil.copy(make("cifar_dp_th"), root / f"resnet{depth}.th")
    shutil.copy(make("plain_pt"), root / "checkpoint.tar")  # a torch zip
    shutil.copy(make("tar_pt"), root / "era_0_1")  # torch <= 0.1.10's tar, no suffix at all
    (root / "README.md").write_text("# CIFAR ResNets\n")
    (root / "config.json").write_text('{"weight_map": {}}')
    (root / "empty.th").write_bytes(b"")
    with zipfile.ZipFile(root / "features.npz", "w") as z:  # a zip, but not torch's
        z.writestr("x.npy", b"\x93NUMPY")
    with tarfile.open(root / "data.tar", "w") as t:  # a tar, but not torch's
        t.add(root / "README.md", arcname="README.md")
    (root / "weird.th").write_bytes(b"\x01" * 7 + b"{" + b"x" * 100)  # '{' at byte 8, no safetensors header
    os.mkfifo(root / "pipe")  # never opened: reading it would block the scan
    return root


SKIPPED = ["README.md", "config.json", "data.tar", "empty.th", "features.npz", "pipe", "weird.th"]
FOUND = ["checkpoint.tar", "era_0_1", "resnet20.th", "resnet32.th", "resnet44.th", "resnet56.th"]


def test_files_are_sniffed_from_their_bytes_not_their_names(pretrained, cli):
    found = surgery.scan([pretrained], workers=1)
    assert [Path(p).name for p in found.paths] == FOUND
    assert sorted(Path(p).name for p in found.skipped) == SKIPPED
    assert all(row.ok for row in found)
    r = cli("inspect", pretrained)
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[-2:] == ["6 checkpoints: 6 read, 0 failed", "7 files skipped (not checkpoints)"]
    assert [line.split()[1] for line in lines[1:-2]] == ["torch-zip", "torch-tar"] + ["torch-legacy"] * 4
    r = cli("inspect", pretrained, "--json")
    assert r.exit_code == 0 and r.stderr == "7 files skipped (not checkpoints)\n"
    assert [json.loads(x)["format"] for x in r.stdout.splitlines()] == ["torch-zip", "torch-tar"] + ["torch-legacy"] * 4


def test_a_folder_of_one_checkpoint_and_an_unnamed_one_scans_both(make, cli, tmp_path):
    shutil.copy(make("plain_pt"), tmp_path / "a.pth")
    shutil.copy(make("cifar_dp_th"), tmp_path / "b.th")
    r = cli("inspect", tmp_path)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "2 checkpoints: 2 read, 0 failed"


def _zip_head(first: bytes) -> bytes:
    return b"PK\x03\x04" + bytes(22) + len(first).to_bytes(2, "little") + bytes(2) + first + bytes(64)


@pytest.mark.parametrize("first, torch_zip", [
    (b"archive/data.pkl", True), (b"data.pkl", True), (b"m/data/0", True), (b"m/code/__torch__/m.py", True),
    (b"m/version", True), (b"m/version.txt", False), (b"x.npy", False), (b"[Content_Types].xml", False),
    (b"a/b/data.pkl", False), (b"", False)])
def test_a_zip_is_torch_by_its_first_record(first, torch_zip):
    from surgery.inspection.zoo_scan import sniffs_as_checkpoint

    assert sniffs_as_checkpoint(_zip_head(first), 4096) is torch_zip


def test_a_torch_tar_behind_a_pax_header_is_found(make, tmp_path):
    """torch 0.1.10 set a float mtime, for which Python's tarfile writes a pax header first."""
    import io
    import tarfile

    with tarfile.open(make("tar_pt")) as src, tarfile.open(tmp_path / "old", "w", format=tarfile.PAX_FORMAT) as dst:
        for info in src.getmembers():
            info.mtime = 1_490_000_000.5
            dst.addfile(info, io.BytesIO(src.extractfile(info).read()))
    assert (tmp_path / "old").read_bytes()[156:157] == b"x"
    found = surgery.scan([tmp_path], workers=1)
    assert found.skipped == [] and [r.to_json()["format"] for r in found] == ["torch-tar"]
