"""DeepSpeed ZeRO folders read as their fp32 master weights, without deepspeed. The folders are laid
out by hand as ``engine.save_checkpoint`` lays them (fixtures/zero_save.py's ``write_zero``; that
it matches a real run is checked in tests/formats/test_zero_real.py, which also compares real runs
with DeepSpeed's own ``zero_to_fp32``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fixtures.zero_save import write_zero


def _model():
    g = torch.Generator().manual_seed(0)
    weights = {"embed.weight": torch.randn(7, 5, generator=g), "embed.bias": torch.randn(7, generator=g),
               "norm.weight": torch.randn(7, generator=g), "head.weight": torch.randn(3, 7, generator=g),
               "head.bias": torch.randn(1, generator=g)}  # one element: ranks past the first hold only padding
    frozen = {"stem.weight": torch.randn(4, 5, generator=g), "stem.bias": torch.randn(5, generator=g)}
    buffers = {"norm.scale": torch.randn(7, generator=g).to(torch.bfloat16), "norm.count": torch.tensor(3)}
    return weights, frozen, buffers


def _expected(weights, frozen, buffers):
    out = {k: v.float() if v.is_floating_point() else v for k, v in buffers.items()}  # buffers in fp32
    return {**out, **frozen, **weights, "out.weight": weights["head.weight"]}


def _folder(tmp_path: Path, stage: int, ranks: int, groups: int = 1) -> Path:
    weights, frozen, buffers = _model()
    if groups == 2:  # two param groups: the weights and the rest
        weights = [{k: v for k, v in weights.items() if v.dim() > 1}, {k: v for k, v in weights.items() if v.dim() < 2}]
    return write_zero(tmp_path / f"zero{stage}", stage, weights, buffers, ranks=ranks, frozen=frozen,
                      shared={"out.weight": "head.weight"})


def _read(path: Path) -> dict[str, torch.Tensor]:
    got = load_file(path)
    with safe_open(path, "pt") as f:
        aliases = json.loads((f.metadata() or {}).get("surgery.aliases", "{}"))
    return {**got, **{a: got[t] for a, t in aliases.items()}}


@pytest.mark.parametrize("stage,ranks,groups", [(1, 2, 1), (2, 2, 1), (2, 3, 1), (3, 2, 1), (3, 3, 1), (2, 2, 2),
                                                (3, 3, 2)])
def test_a_zero_folder_consolidates_to_its_fp32_weights(tmp_path, cli, stage, ranks, groups):
    src = _folder(tmp_path, stage, ranks, groups)
    r = cli("remap", src, tmp_path / "one.safetensors")
    assert r.exit_code == 0, r.output
    got, want = _read(tmp_path / "one.safetensors"), _expected(*_model())
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


@pytest.mark.parametrize("stage", [2, 3])
def test_inspect_names_the_format_and_certifies_the_ranks_pieces(tmp_path, cli, stage):
    src = _folder(tmp_path, stage, 2)
    for path in (src, src / "global_step1"):  # the run's folder (through 'latest') or the tag's folder
        r = cli("inspect", path, "--json")
        assert r.exit_code == 0, r.output
        data = json.loads(r.stdout)
        assert data["format"] == "deepspeed-zero"
        cert = data["certificate"]
        assert cert["complete"] and cert["ranks"] == 2 and cert["source"] == "ZeRO param_shapes"
        assert cert["tensors"] == len(_expected(*_model()))
        # stage 1/2: only a param on the boundary of two ranks' partitions (64 elements, 32 a rank)
        # is cut; stage 3: every param of two or more elements, each rank holding half of it
        cut = ["embed.bias"] if stage < 3 else ["embed.weight", "embed.bias", "norm.weight", "head.weight",
                                                 "stem.weight", "stem.bias", "out.weight"]
        assert sorted(cert["split"]) == sorted(cut) and all(d == [0] for d in cert["split"].values())
    assert "each covered exactly once" in cli("inspect", src).stdout


def test_a_zero_folder_diffs_equal_to_its_consolidation(tmp_path, cli):
    src = _folder(tmp_path, 3, 2)
    assert cli("remap", src, tmp_path / "one.safetensors").exit_code == 0
    r = cli("diff", src, tmp_path / "one.safetensors")
    assert r.exit_code == 0, r.output  # diff's exit code: 0 when identical, 1 when they differ


def _drop_first(src: Path, stage: int) -> None:
    (src / "global_step1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()


def _drop_last(src: Path, stage: int) -> None:
    (src / "global_step1" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()


def _world(src: Path, stage: int) -> None:
    f = src / "global_step1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    sd = torch.load(f)
    sd["optimizer_state_dict"]["partition_count"] = [3] if stage < 3 else 3
    torch.save(sd, f)


def _resize(src: Path, stage: int, by: int) -> None:
    key = "single_partition_of_fp32_groups" if stage < 3 else "fp32_flat_groups"
    for r in (0, 1):
        f = src / "global_step1" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        sd = torch.load(f)
        groups = sd["optimizer_state_dict"][key]
        sd["optimizer_state_dict"][key] = [g[:by].clone() if by < 0 else torch.cat([g, g.new_zeros(by)])
                                           for g in groups]
        torch.save(sd, f)


def _short(src: Path, stage: int) -> None:
    _resize(src, stage, -8)


def _long(src: Path, stage: int) -> None:
    _resize(src, stage, 8)  # more than the alignment padding


def _linked(src: Path, stage: int) -> None:
    f = src / "global_step1" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    f.rename(src.parent / "elsewhere.pt")
    f.symlink_to(src.parent / "elsewhere.pt")


def _latest(src: Path, stage: int) -> None:
    (src / "latest").write_text("global_step9")


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("edit,why", [(_drop_first, "states of rank 0 are missing"),
                                      (_drop_last, "world of 2 ranks (partition_count) but 1 rank files"),
                                      (_world, "disagree on the world size (partition_count 3, 2)"),
                                      (_short, "do not add up to param_shapes"),
                                      (_long, "do not match param_shapes"), (_latest, "no such folder"),
                                      (_linked, "outside the checkpoint's folder")])
def test_an_inconsistent_folder_is_refused_in_one_line_and_nothing_is_written(tmp_path, cli, stage, edit, why):
    src = _folder(tmp_path, stage, 2)
    edit(src, stage)
    for args in (("inspect", src), ("remap", src, tmp_path / "out.safetensors")):
        r = cli(*args)
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert why in r.output.replace("\n", " "), r.output
    assert not (tmp_path / "out.safetensors").exists()


def test_a_lightning_deepspeed_checkpoint_folder_opens_and_auto_strips_lightnings_wrapper(tmp_path, cli):
    """Lightning's ``trainer.save_checkpoint("epoch=0-step=2.ckpt")`` under DeepSpeed: a folder named
    like a file, ``latest`` naming the tag ``checkpoint``, keys under ``_forward_module.``."""
    g = torch.Generator().manual_seed(0)
    w = {"_forward_module.model.0.weight": torch.randn(4, 3, generator=g),
         "_forward_module.model.0.bias": torch.randn(4, generator=g)}
    root = write_zero(tmp_path / "epoch=0-step=2.ckpt", 2, w, {"_forward_module.model.1.running_mean": torch.ones(4)},
                      ranks=2, tag="checkpoint")
    r = cli("inspect", root)
    assert r.exit_code == 0 and "deepspeed-zero" in r.output and "_forward_module. (Lightning)" in r.output, r.output
    r = cli("remap", root, tmp_path / "out.safetensors", "--auto")
    assert r.exit_code == 0, r.output
    got = load_file(tmp_path / "out.safetensors")
    assert sorted(got) == ["model.0.bias", "model.0.weight", "model.1.running_mean"]
    assert torch.equal(got["model.0.weight"], w["_forward_module.model.0.weight"])
