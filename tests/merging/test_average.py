"""`surgery average`: the float64 mean tensor by tensor, against the reference computed here (timm's
``avg_checkpoints.py`` algorithm: accumulate in float64, divide by the count), across formats and
wrapper prefixes; disagreements refused in one line before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import surgery


def _runs(n: int = 3, dtype=torch.float32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        out.append({"conv.weight": torch.randn(4, 3, 3, 3, generator=g).to(dtype),
                    "bn.weight": torch.randn(4, generator=g).to(dtype), "bn.running_mean": torch.randn(4, generator=g).to(dtype),
                    "bn.num_batches_tracked": torch.tensor(10 + i), "fc.weight": torch.randn(2, 36, generator=g).to(dtype)})
    return out


def _reference(sds: list[dict[str, torch.Tensor]], weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    weights = weights or [1.0] * len(sds)
    out = {}
    for k, v in sds[0].items():
        if not v.is_floating_point():
            out[k] = v
            continue
        acc = sum(sd[k].to(torch.float64) * w for sd, w in zip(sds, weights))
        out[k] = (acc / sum(weights)).to(v.dtype)
    return out


def _files(tmp_path, sds):
    """The same runs saved three ways: a DataParallel .pth, a safetensors file, a Lightning-like .ckpt."""
    a, b, c = tmp_path / "a.pth", tmp_path / "b.safetensors", tmp_path / "c.ckpt"
    torch.save({"module." + k: v for k, v in sds[0].items()}, a)
    save_file(sds[1], b)
    torch.save({"state_dict": sds[2], "epoch": 3}, c)
    return [a, b, c]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_mean_is_the_float64_mean_cast_back_across_formats_and_wrappers(tmp_path, cli, dtype):
    sds = _runs(dtype=dtype)
    r = cli("average", *_files(tmp_path, sds), "--out", tmp_path / "mean.safetensors", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["schema"] == "surgery.average/1" and data["averaged"] == 4 and data["copied_from_first"] == ["bn.num_batches_tracked"]
    assert [i["stripped_prefix"] for i in data["inputs"]] == ["module.", "", ""]
    got, want = load_file(tmp_path / "mean.safetensors"), _reference(sds)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert int(got["bn.num_batches_tracked"]) == 10  # the first input's


def test_weights_and_a_torch_output(tmp_path):
    sds = _runs(2)
    paths = _files(tmp_path, sds + sds[:1])[:2]
    rep = surgery.average(paths, tmp_path / "w.pt", [1.0, 3.0])
    got, want = torch.load(tmp_path / "w.pt", weights_only=True), _reference(sds, [1.0, 3.0])
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    assert rep.weights == [1.0, 3.0]


def test_disagreements_are_listed_in_one_line_and_nothing_is_written(tmp_path, cli):
    sds = _runs(2)
    bad = dict(sds[1])
    bad["fc.weight"] = torch.zeros(3, 36)  # another head
    bad["extra.bias"] = torch.zeros(2)
    del bad["bn.weight"]
    save_file(sds[0], tmp_path / "a.safetensors")
    save_file(bad, tmp_path / "b.safetensors")
    out = tmp_path / "mean.safetensors"
    r = cli("average", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--out", out)
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    for said in ("3 disagreements", "'bn.weight' is only in a.safetensors", "'extra.bias'", "[2, 36]", "[3, 36]"):
        assert said in r.output, said
    assert not out.exists()


@pytest.mark.parametrize("args, said", [
    (["--weights", "1"], "1 weights for 2"),
    (["--weights", "1,-1"], "non-negative"),
    (["--weights", "0,0"], "not all zero"),
    (["--weights", "1,nan"], "finite"),
])
def test_bad_weights_are_refused(tmp_path, cli, args, said):
    sds = _runs(2)
    for i, sd in enumerate(sds):
        save_file(sd, tmp_path / f"{i}.safetensors")
    r = cli("average", tmp_path / "0.safetensors", tmp_path / "1.safetensors", "--out", tmp_path / "m.safetensors", *args)
    assert r.exit_code == 2 and said in r.output and not (tmp_path / "m.safetensors").exists(), r.output


def test_one_input_an_existing_output_and_an_input_as_output_are_refused(tmp_path, cli):
    sds = _runs(2)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(sds[0], a)
    save_file(sds[1], b)
    assert cli("average", a, "--out", tmp_path / "m.safetensors").exit_code == 2
    before = a.read_bytes()
    for force in ([], ["--force"]):
        r = cli("average", a, b, "--out", a, *force)
        assert r.exit_code == 2 and a.read_bytes() == before, r.output
    (tmp_path / "m.safetensors").write_bytes(b"mine")
    r = cli("average", a, b, "--out", tmp_path / "m.safetensors")
    assert r.exit_code == 2 and "--force" in r.output and (tmp_path / "m.safetensors").read_bytes() == b"mine"
    assert cli("average", a, b, "--out", tmp_path / "m.safetensors", "--force").exit_code == 0


def test_a_dtype_disagreement_names_the_cast_that_fixes_it(tmp_path, cli):
    save_file({"w": torch.ones(3, 3)}, tmp_path / "f32.safetensors")
    save_file({"w": torch.zeros(3, 3, dtype=torch.bfloat16)}, tmp_path / "bf16.safetensors")
    r = cli("average", tmp_path / "f32.safetensors", tmp_path / "bf16.safetensors", "--out", tmp_path / "m.safetensors")
    assert r.exit_code == 2 and "(`surgery remap --dtype` casts one to the other's)" in r.output, r.output
    r = cli("remap", tmp_path / "bf16.safetensors", tmp_path / "cast.safetensors", "--dtype", "fp32")
    assert r.exit_code == 0, r.output
    r = cli("average", tmp_path / "f32.safetensors", tmp_path / "cast.safetensors", "--out", tmp_path / "m.safetensors")
    assert r.exit_code == 0 and torch.equal(load_file(tmp_path / "m.safetensors")["w"], torch.full((3, 3), 0.5)), r.output
