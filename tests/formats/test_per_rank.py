"""Per-rank ``torch.save(model.state_dict())`` files of a sharded model (verl's
``model_world_size_N_rank_K.pt``) read as one checkpoint, without torch.distributed. The files are
saved by torch itself in one process, each rank's under a ``fake`` process group
(fixtures/per_rank_save.py); tests/formats/test_per_rank_real.py checks a real 2-rank FSDP2 run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures.per_rank_save import write_per_rank, write_sharded_tensors

ROOT = Path(__file__).resolve().parents[2]


def _model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"embed.weight": torch.randn(7, 5, generator=g),  # 3, 3, 1 rows on 3 ranks
            "embed.bias": torch.randn(4, generator=g),  # 2, 2, 0: the last rank's piece is empty
            "head.weight": torch.randn(1, 7, generator=g),  # rank 0's only
            "norm.weight": torch.randn(7, generator=g).to(torch.bfloat16),  # replicated
            "norm.count": torch.tensor(3)}  # a plain tensor


def _folder(tmp_path: Path, ranks: int = 3, name: str = "model_world_size_{W}_rank_{R}.pt", sd=None) -> Path:
    return write_per_rank(tmp_path / f"ckpt{ranks}", sd or _model(), ranks, replicate=frozenset({"norm.weight"}),
                          plain=frozenset({"norm.count"}), name=name)


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_per_rank_files_consolidate_bit_for_bit(tmp_path, cli, ranks):
    src = _folder(tmp_path, ranks)
    for i, path in enumerate((src, src / f"model_world_size_{ranks}_rank_{ranks - 1}.pt")):  # the folder or one file
        out = tmp_path / f"one{i}.safetensors"
        r = cli("remap", path, out, "--verify")
        assert r.exit_code == 0, r.output
        got = load_file(out)
        assert list(got) == list(_model())
        for k, want in _model().items():
            assert got[k].dtype == want.dtype and torch.equal(got[k], want), k


def test_inspect_names_the_format_and_certifies_the_ranks_pieces(tmp_path, cli):
    src = _folder(tmp_path, 3)
    r = cli("inspect", src, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["format"] == "torch-per-rank" and len(data["files"]) == 3
    cert = data["certificate"]
    assert cert["complete"] and cert["ranks"] == 3 and cert["source"] == "DTensor specs"
    assert cert["tensors"] == 5 and cert["split"] == {"embed.weight": [0], "embed.bias": [0]}
    assert "each covered exactly once" in cli("inspect", src).stdout


def test_any_rank_file_naming_works_and_verls_other_files_are_left_aside(tmp_path, cli):
    src = _folder(tmp_path, 2, name="shard_rank{R}.bin")
    assert json.loads(cli("inspect", src, "--json").stdout)["format"] == "torch-per-rank"
    verl = _folder(tmp_path, 3)
    for r in range(3):  # verl saves its optimizer's per-rank state beside the model's
        shutil.copy(verl / f"model_world_size_3_rank_{r}.pt", verl / f"optim_world_size_3_rank_{r}.pt")
    assert cli("remap", verl, tmp_path / "v.safetensors").exit_code == 0


def test_the_distributed_records_are_never_imported(tmp_path):
    src = _folder(tmp_path, 2)
    code = ("import sys, surgery, torch; before = set(sys.modules); c = surgery.open(sys.argv[1]); c.state_dict(); "
            "bad = sorted(m for m in set(sys.modules) - before if m.startswith('torch.distributed')); "
            "assert c.format == 'torch-per-rank' and not bad and 'torch.distributed.tensor' not in sys.modules, bad")
    r = subprocess.run([sys.executable, "-c", code, str(src)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def _missing(src: Path, tmp_path: Path) -> None:
    (src / "model_world_size_3_rank_1.pt").unlink()


def _mixed(src: Path, tmp_path: Path) -> None:
    (src / "model_world_size_3_rank_2.pt").rename(src / "model_world_size_4_rank_2.pt")


def _other_world(src: Path, tmp_path: Path) -> None:
    other = _folder(tmp_path, 4)
    shutil.copy(other / "model_world_size_4_rank_2.pt", src / "model_world_size_3_rank_2.pt")


def _twice(src: Path, tmp_path: Path) -> None:  # rank 0's file under rank 1's name: rows 0-2 twice, 3-5 in none
    shutil.copy(src / "model_world_size_3_rank_0.pt", src / "model_world_size_3_rank_1.pt")


def _other_model(src: Path, tmp_path: Path) -> None:
    other = _folder(tmp_path / "other", 3, sd={**_model(), "embed.weight": torch.zeros(8, 5)})
    shutil.copy(other / "model_world_size_3_rank_1.pt", src / "model_world_size_3_rank_1.pt")


def _linked(src: Path, tmp_path: Path) -> None:
    f = src / "model_world_size_3_rank_1.pt"
    f.rename(tmp_path / "elsewhere.pt")
    f.symlink_to(tmp_path / "elsewhere.pt")


@pytest.mark.parametrize("edit,why", [(_missing, "names a world of 3 ranks but 2 files are here (rank 1 missing)"),
                                      (_mixed, "rank files of worlds of 3, 4 ranks"),
                                      (_other_world, "on a mesh of 4 ranks, not the 3"),
                                      (_twice, "not covered exactly once by the ranks' pieces: chunks overlap"),
                                      (_other_model, "differs from rank 0's"),
                                      (_linked, "outside the checkpoint's folder")])
def test_inconsistent_rank_files_are_refused_in_one_line_and_nothing_is_written(tmp_path, cli, edit, why):
    src = _folder(tmp_path, 3)
    edit(src, tmp_path)
    for args in (("inspect", src), ("remap", src, tmp_path / "out.safetensors")):
        r = cli(*args)
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert why in r.output.replace("\n", " "), r.output
    assert not (tmp_path / "out.safetensors").exists()


def test_a_two_dimensional_mesh_is_refused_naming_its_placements(tmp_path, cli):
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    w = torch.arange(8.0).reshape(4, 2)
    for rank in range(4):
        dist.init_process_group("fake", rank=rank, world_size=4, store=FakeStore())
        try:
            mesh = DeviceMesh("cpu", [[0, 1], [2, 3]])
            d = DTensor.from_local(w[rank % 2 * 2:][:2].clone(), mesh, [Replicate(), Shard(0)], run_check=False,
                                   shape=w.shape, stride=w.stride())
            torch.save({"w": d}, tmp_path / f"model_world_size_4_rank_{rank}.pt")
        finally:
            dist.destroy_process_group()
    r = cli("remap", tmp_path, tmp_path / "out.safetensors")
    assert r.exit_code == 2 and "placed (Replicate(), Shard(0)) on a 2-D mesh" in r.output.replace("\n", " "), r.output
    assert not (tmp_path / "out.safetensors").exists()


def test_one_file_of_a_world_mixed_with_another_names_both(tmp_path, cli):
    src = _folder(tmp_path, 3)
    _mixed(src, tmp_path)
    r = cli("inspect", src / "model_world_size_3_rank_0.pt")
    assert r.exit_code == 2 and "rank files of a world of 3 beside ones of a world of 4" in r.output.replace("\n", " ")


def test_plain_per_rank_copies_stay_checkpoints_of_their_own(tmp_path, cli):
    """DDP runs save a full copy per rank (ckpt_rank0.pt, ckpt_rank1.pt): no DTensor, no set."""
    import torch

    for r in (0, 1):  # a key that merely contains "DTensor" does not make them DTensors
        torch.save({"DTensor_w": torch.full((2, 2), float(r))}, tmp_path / f"ckpt_rank{r}.pt")
        torch.save({"w": torch.full((2, 2), float(r))}, tmp_path / f"model_world_size_2_rank_{r}.pt")
    r = cli("inspect", tmp_path)
    assert r.exit_code == 0, r.output
    assert "ckpt_rank0.pt" in r.stdout and "model_world_size_2_rank_1.pt" in r.stdout
    assert "4 checkpoints: 4 read" in r.stdout


def test_a_scan_lists_a_rank_set_as_one_and_the_files_beside_it(tmp_path, cli):
    from safetensors.torch import save_file

    src = _folder(tmp_path / "zoo", 2)
    save_file({"x": torch.zeros(2)}, src / "other.safetensors")
    r = cli("inspect", tmp_path / "zoo")
    assert r.exit_code == 0, r.output
    assert "torch-per-rank" in r.stdout and "other.safetensors" in r.stdout and "2 checkpoints: 2 read" in r.stdout


# ---------------------------------------------------------------- FSDP1: ShardedTensors a file per rank


def _fsdp1() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"fc.weight": torch.randn(7, 3, generator=g), "fc.bias": torch.randn(2, generator=g),
            "ln.weight": torch.randn(5, generator=g).half()}


def test_fsdp1_sharded_tensors_a_file_a_rank_consolidate_bit_for_bit(tmp_path, cli):
    src = write_sharded_tensors(tmp_path / "fsdp1", _fsdp1(), ranks=3)  # fc.bias: 1, 1, 0 rows
    r = cli("inspect", src, "--json")
    assert r.exit_code == 0, r.output
    cert = json.loads(r.output)["certificate"]
    assert cert["complete"] and cert["ranks"] == 3 and cert["source"] == "ShardedTensor metadata"
    r = cli("remap", src, tmp_path / "out.safetensors", "--verify")
    assert r.exit_code == 0, r.output
    got = load_file(tmp_path / "out.safetensors")
    assert sorted(got) == sorted(_fsdp1())
    for k, want in _fsdp1().items():
        assert got[k].dtype == want.dtype and torch.equal(got[k], want), k


@pytest.mark.parametrize("lie, said", [
    ({"held": {("fc.weight", 1): ([0, 0], [3, 3])}}, "metadata does not give rank 1"),  # rank 1 saved rank 0's rows
    ({"boxes": {"fc.weight": [([0, 0], [3, 3]), ([2, 0], [3, 3]), ([6, 0], [1, 3])]}}, "not covered exactly once"),
    ({"boxes": {"fc.weight": [([0, 0], [3, 3]), ([3, 0], [2, 3]), ([6, 0], [1, 3])]}}, "not covered exactly once"),
])
def test_fsdp1_shards_that_overlap_leave_a_gap_or_sit_elsewhere_are_refused(tmp_path, cli, lie, said):
    src = write_sharded_tensors(tmp_path / "fsdp1", _fsdp1(), ranks=3, **lie)
    for cmd in (("inspect", src), ("remap", src, tmp_path / "out.safetensors")):
        r = cli(*cmd)
        assert r.exit_code == 2 and said in r.output and "Traceback" not in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()


def test_a_missing_fsdp1_rank_file_is_refused(tmp_path, cli):
    src = write_sharded_tensors(tmp_path / "fsdp1", _fsdp1(), ranks=3)
    (src / "pytorch_model_fsdp_0_rank1.bin").unlink()
    r = cli("remap", src, tmp_path / "out.safetensors")
    assert r.exit_code == 2 and not (tmp_path / "out.safetensors").exists(), r.output


def test_one_rank_worlds_and_one_file_of_two_sets_open_and_only_flat_parameters_say_so(tmp_path, cli):
    one = write_per_rank(tmp_path / "one", {"w": torch.arange(6.0).reshape(3, 2)}, ranks=1)
    r = cli("inspect", one, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["file_kind"] == "state_dict", r.output
    st1 = write_sharded_tensors(tmp_path / "st1", _fsdp1(), ranks=1)
    r = cli("inspect", st1 / "pytorch_model_fsdp_0_rank0.bin")
    assert r.exit_code == 0 and "torch-per-rank" in r.output, r.output
    two = write_sharded_tensors(tmp_path / "two", _fsdp1(), ranks=2)
    other = write_sharded_tensors(tmp_path / "other", {"w": torch.ones(4, 2)}, ranks=2)
    for f in other.iterdir():
        f.rename(two / f.name.replace("fsdp_0", "fsdp_1"))
    r = cli("inspect", two)
    assert r.exit_code == 2 and "pass one of the files" in r.output, r.output
    r = cli("remap", two / "pytorch_model_fsdp_1_rank1.bin", tmp_path / "w.safetensors")
    assert r.exit_code == 0 and list(load_file(tmp_path / "w.safetensors")) == ["w"], r.output


def test_getattr_in_a_rank_file_reads_shardedtensors_process_group_record_only():
    from surgery.errors import FormatError
    from surgery.formats import per_rank

    st = per_rank._RECORDS["torch.distributed._shard.sharded_tensor.api", "ShardedTensor"]
    nested = per_rank._RECORDS["builtins", "getattr"]
    assert nested(st, "ProcessGroupState") is nested(st, "ProcessGroupState")  # one class, not one per call
    for owner, name in ((st, "__class__"), (st, "__init__"), (int, "ProcessGroupState"), (st, 3)):
        with pytest.raises(FormatError):
            nested(owner, name)
