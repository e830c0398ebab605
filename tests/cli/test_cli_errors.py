"""Bad input from the shell: exit code 2, one line on stderr, no traceback, nothing at DST."""

from __future__ import annotations

import json
import os
import re
import struct

import pytest


def _safetensors(header: dict | bytes, data: bytes = b"", declared: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if declared is None else declared
    return struct.pack("<Q", n) + raw + data


BAD_FILES = {
    "empty": lambda make: b"",
    "random": lambda make: bytes(range(256)) * 8,
    "huge_header": lambda make: _safetensors(b"{}", declared=2**60),
    "header_past_end": lambda make: _safetensors(b'{"a":1}', declared=4096),
    "invalid_json": lambda make: _safetensors(b"{not json!"),
    "out_of_range": lambda make: _safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
    "overlap": lambda make: _safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
    "unknown_dtype": lambda make: _safetensors({"w": {"dtype": "F7", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
    "overflow_shape": lambda make: _safetensors({"w": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 4]}}, b"\0" * 4),
    "lfs": lambda make: make("lfs_pointer").read_bytes(),
    "plain_pickle": lambda make: b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94."
}


def _zip_without_pkl(path):
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/version", "3")


def _truncations(make):
    out = {}
    for name in ("plain_pt", "legacy_pt", "plain_safetensors"):
        data = make(name).read_bytes()
        for frac in (0.02, 0.5, 0.98):
            out[f"{name}_cut{int(frac * 100)}"] = data[: max(9, int(len(data) * frac))]
    return out


def _assert_clean_failure(result, dst=None):
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in result.stdout + result.stderr
    if dst is not None:
        assert not os.path.exists(dst)
        assert not [p for p in os.listdir(os.path.dirname(dst)) if p.startswith(".")]


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_files(make, cli, tmp_path, kind):
    path = tmp_path / "bad.bin"
    path.write_bytes(BAD_FILES[kind](make))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _assert_clean_failure(cli("inspect", path))
    _assert_clean_failure(cli("remap", path, out_dir / "o.safetensors"), out_dir / "o.safetensors")


def test_truncated_files(make, cli, tmp_path):
    for label, data in _truncations(make).items():
        path = tmp_path / f"{label}.pt"
        path.write_bytes(data)
        out = tmp_path / f"{label}.safetensors"
        _assert_clean_failure(cli("remap", path, out), out)


def test_missing_and_directory_and_zip_without_pkl(cli, tmp_path):
    _assert_clean_failure(cli("inspect", tmp_path / "nope.pt"))
    _assert_clean_failure(cli("inspect", tmp_path))
    z = tmp_path / "z.pt"
    _zip_without_pkl(z)
    r = cli("inspect", z)
    _assert_clean_failure(r)
    assert re.search(r"no (\S+/)?data\.pkl", r.stderr)


def test_pickle_calling_os_system_does_not_run(make, cli, tmp_path):
    path = make("malicious_pickle_pt")
    marker_dir = path.parent
    before = set(os.listdir(marker_dir))
    r = cli("inspect", path)
    _assert_clean_failure(r)
    assert "system" in r.stderr and "--allow-global" in r.stderr
    assert set(os.listdir(marker_dir)) == before


def test_bad_rules(make, cli, tmp_path):
    src = make("dataparallel_pt")
    dst = tmp_path / "o.safetensors"
    r = cli("remap", src, dst, "--rename", r"\.(weight|bias)$=>.param")
    _assert_clean_failure(r, dst)
    assert "several keys to one name" in r.stderr
    _assert_clean_failure(cli("remap", src, dst, "--drop", "(unclosed"), dst)
    _assert_clean_failure(cli("remap", src, dst, "--rename", "no-arrow"), dst)
    _assert_clean_failure(cli("remap", src, dst, "--dtype", "fp12"), dst)
    _assert_clean_failure(cli("remap", src, dst, "--drop", "."), dst)
    _assert_clean_failure(cli("remap", src, tmp_path / "o.txt"), tmp_path / "o.txt")
    _assert_clean_failure(cli("remap", src, dst, "--rules", tmp_path / "missing.yaml"), dst)


def test_unwritable_destination(make, cli, tmp_path):
    src = make("plain_safetensors")
    r = cli("remap", src, "/proc/self/forbidden.safetensors")
    _assert_clean_failure(r)
    afile = tmp_path / "afile"
    afile.write_text("x")
    _assert_clean_failure(cli("remap", src, afile / "o.safetensors"))
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.geteuid() != 0:  # root writes through permission bits
            _assert_clean_failure(cli("remap", src, ro / "o.safetensors"))
    finally:
        os.chmod(ro, 0o700)


def test_select_errors(make, cli, tmp_path):
    r = cli("inspect", make("timm_ema_pth"), "--select", "optimizer_nope")
    _assert_clean_failure(r)
    assert "state_dict_ema" in r.stderr
