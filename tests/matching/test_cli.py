"""`surgery match` on the command line: exit codes, --json, --out, bad input in one line."""

from __future__ import annotations

import json

import pytest
import torch

import surgery

from .helpers import gpt2_conv1d, gpt2_linear


@pytest.fixture
def pair(tmp_path):
    a = gpt2_conv1d()
    torch.save(a, tmp_path / "a.pt")
    torch.save(gpt2_linear(a), tmp_path / "b.pt")
    return tmp_path


def test_complete_match_writes_rules_that_remap_reads(cli, pair):
    r = cli("match", pair / "a.pt", pair / "b.pt", "--out", pair / "rules.yaml")
    assert r.exit_code == 0, r.output
    assert "28 of 28 keys of B mapped, 28 of 28 keys of A used, 28 confirmed by value" in r.stdout
    assert r.stdout.rstrip().endswith("complete")
    r = cli("remap", pair / "a.pt", pair / "out.safetensors", "--rules", pair / "rules.yaml")
    assert r.exit_code == 0, r.output
    assert cli("diff", pair / "out.safetensors", pair / "b.pt").exit_code == 0


def test_json_schema_and_incomplete_exit_code(cli, pair):
    b = torch.load(pair / "b.pt", weights_only=True)
    b["transformer.extra.weight"] = torch.zeros(3, 5)
    torch.save(b, pair / "b2.pt")
    r = cli("match", pair / "a.pt", pair / "b2.pt", "--json", "--out", pair / "rules.json")
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert data["schema"] == "surgery.match/1" and data["complete"] is False
    assert data["missing"] == ["transformer.extra.weight"]
    assert data["coverage"] == {"b_mapped": 28, "b_keys": 29, "a_used": 28, "a_keys": 28, "confirmed_by_value": 28}
    assert surgery.Rules.from_file(pair / "rules.json").to_json() == data["rules"]


def test_ambiguity_is_listed_and_exits_1(cli, tmp_path):
    from safetensors.torch import save_file

    z = torch.zeros(4)
    save_file({"x.bias": z, "y.bias": z.clone(), "z.bias": z.clone()}, tmp_path / "a.safetensors")  # keys sorted
    torch.save({"p.bias": z.clone(), "q.bias": z.clone(), "o.bias": z.clone()}, tmp_path / "b.pt")
    r = cli("match", tmp_path / "a.safetensors", tmp_path / "b.pt", "--out", tmp_path / "r.yaml")
    assert r.exit_code == 1
    tie = "p.bias, q.bias, o.bias <- one of x.bias, y.bias, z.bias"
    assert f"ambiguous: {tie}" in r.stdout
    assert f"# ambiguous, not mapped: {tie}" in (tmp_path / "r.yaml").read_text()
    assert surgery.Rules.from_file(tmp_path / "r.yaml").ops == []


@pytest.mark.parametrize("b, message", [
    ("missing.pt", "missing.pt: no such file or folder"),
    ("resnet99", "unknown architecture 'resnet99'"),
    ("timm:resnet99", "unknown timm model 'resnet99'"),
])
def test_bad_b_is_one_line_exit_2(cli, pair, b, message):
    if b.startswith("timm:"):
        pytest.importorskip("timm")
    r = cli("match", pair / "a.pt", b)
    assert r.exit_code == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_missing_a_and_existing_out_are_refused_before_work(cli, pair):
    r = cli("match", pair / "nope.pt", pair / "b.pt")
    assert r.exit_code == 2 and "nope.pt: no such file or folder" in r.stderr
    (pair / "rules.yaml").write_text("mine")
    r = cli("match", pair / "a.pt", pair / "b.pt", "--out", pair / "rules.yaml")
    assert r.exit_code == 2 and "already exists; pass --force" in r.stderr
    assert (pair / "rules.yaml").read_text() == "mine"
    r = cli("match", pair / "a.pt", pair / "b.pt", "--out", pair / "rules.toml")
    assert r.exit_code == 2 and "not TOML" in r.stderr and not (pair / "rules.toml").exists()
    r = cli("match", pair / "a.pt", pair / "b.pt", "--out", pair / "rules.yaml", "--force")
    assert r.exit_code == 0 and surgery.Rules.from_file(pair / "rules.yaml").ops


@pytest.mark.parametrize("which", ["a", "b"])
def test_a_corrupt_checkpoint_on_either_side_is_one_line_exit_2(cli, pair, which):
    bad = pair / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    a, b = (bad, pair / "b.pt") if which == "a" else (pair / "a.pt", bad)
    r = cli("match", a, b, "--out", pair / "r.yaml")
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert not (pair / "r.yaml").exists()


def test_too_many_candidate_pairs_are_refused_before_any_value_is_read(cli, tmp_path, monkeypatch):
    """Keys of one shape are scored pair by pair: n of them on each side cost n * n, refused past a bound."""
    import surgery.matching.pairing as pairing
    from safetensors.torch import save_file

    monkeypatch.setattr(pairing, "MAX_CANDIDATES", 15)
    save_file({f"l.{i}.w": torch.randn(3) for i in range(4)}, tmp_path / "a.safetensors")
    save_file({f"m.{i}.w": torch.randn(3) for i in range(4)}, tmp_path / "b.safetensors")
    read = []
    monkeypatch.setattr(pairing.Values, "digest", lambda *a: read.append(a))
    r = cli("match", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--out", tmp_path / "r.yaml")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "16 candidate pairs" in err and "--keep" in err, err
    assert not read and not (tmp_path / "r.yaml").exists()
    monkeypatch.undo()
    assert cli("match", tmp_path / "a.safetensors", tmp_path / "b.safetensors").exit_code in (0, 1)
