"""DCP checkpoints whose tensors ranks saved in pieces (FSDP2's Shard(0), Shard(1), a 2-D mesh):
read, certified complete, and consolidated bit for bit as torch's own ``dcp_to_torch_save`` does.
The folders are laid out as torch's FileSystemWriter writes them (fixtures/distributed.py; torch
reads them as the reference); tests/formats/test_dcp_real.py checks real FSDP2 runs."""

from __future__ import annotations

import hashlib
import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fixtures.distributed import grid_boxes, reference, shard_boxes, write_chunked_dcp
from surgery.formats.chunks import cover_problem


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(11, 6, generator=g),  # 11 rows on 4 ranks: 3, 3, 3, 2
        "embed.bias": torch.randn(3, generator=g),  # 3 rows on 4 ranks: the last rank holds none
        "proj.weight": torch.randn(6, 10, generator=g).to(torch.bfloat16),  # tensor parallel: Shard(1)
        "mix.weight": torch.randn(8, 6, 2, generator=g),  # a 2-D mesh: 2 x 3 pieces
        "norm.running_mean": torch.randn(6, generator=g),  # replicated: one whole chunk
        "norm.num_batches_tracked": torch.tensor(7),
    }


BOXES = {"embed.weight": shard_boxes((11, 6), 4), "embed.bias": shard_boxes((3,), 4),
         "proj.weight": shard_boxes((6, 10), 4, dim=1), "mix.weight": grid_boxes((8, 6, 2), (2, 3))}


@pytest.fixture
def sharded(tmp_path):
    t = _tensors()
    write_chunked_dcp(tmp_path / "ckpt", t, BOXES, ranks=4, nested="model")
    return tmp_path / "ckpt", t


def test_inspect_reports_the_chunks_and_certifies_the_cover(sharded, cli):
    path, t = sharded
    r = cli("inspect", path, "--json")
    assert r.exit_code == 0, r.output
    c = json.loads(r.stdout)["certificate"]
    assert c["complete"] and c["ranks"] == 4 and c["tensors"] == len(t) and c["chunked"] == 4
    assert c["chunks"] == 4 + 3 + 4 + 6 + 1 + 1
    assert c["elements"] == sum(x.numel() for x in t.values())
    assert c["split"] == {"embed.weight": [0], "embed.bias": [0], "proj.weight": [1], "mix.weight": [0, 1]}
    text = cli("inspect", path).stdout
    assert "each covered exactly once" in text and "from 4 ranks" in text


@pytest.mark.parametrize("out", ["one.safetensors", "one.pt", "folder"])
def test_remap_consolidates_as_torchs_converter_does(sharded, cli, tmp_path, out):
    path, t = sharded
    dst = tmp_path / out
    r = cli("remap", path, dst, "--verify")
    assert r.exit_code == 0, r.output
    assert "source: 6 tensors in 19 chunks from 4 ranks, each covered exactly once" in r.stdout
    ref = reference(path)["model"]
    if out == "folder":
        got = {}
        for f in sorted(dst.glob("*.safetensors")):
            got.update(load_file(f))
    elif out.endswith(".pt"):
        got = torch.load(dst, weights_only=True)
    else:
        got = load_file(dst)
    assert list(got) == list(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k


def test_the_certificate_in_the_output_holds_each_tensors_digest(sharded, cli, tmp_path):
    path, t = sharded
    r = cli("remap", path, tmp_path / "one.safetensors", "--json")
    assert r.exit_code == 0, r.output
    printed = json.loads(r.stdout)["certificate"]
    with safe_open(tmp_path / "one.safetensors", "pt") as f:
        stored = json.loads(f.metadata()["surgery.certificate"])
        for name in f.keys():
            data = f.get_tensor(name).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            assert stored["digests"][name] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert stored == printed and stored["complete"] and len(stored["digests"]) == len(t)


def test_the_optimizer_state_beside_the_model_is_selectable(tmp_path, cli):
    model = {"w": torch.randn(6, 4)}
    both = {"model.w": model["w"], "optim.state.w.exp_avg": torch.randn(6, 4)}
    path = tmp_path / "ckpt"
    write_chunked_dcp(path, {"w": model["w"]}, {"w": shard_boxes((6, 4), 2)}, ranks=2, nested="model")
    # add the optimizer entry under its own top level, as dcp.save({"model": ..., "optim": ...}) does
    other = write_chunked_dcp(tmp_path / "opt", {"state.w.exp_avg": both["optim.state.w.exp_avg"]},
                              {"state.w.exp_avg": shard_boxes((6, 4), 2)}, ranks=2, nested="optim")
    _merge_dcp(path, other)
    r = cli("inspect", path, "--json")
    data = json.loads(r.stdout)
    assert data["container"] == "model" and data["containers"] == ["model", "optim"]
    r = cli("remap", path, tmp_path / "opt.safetensors", "--select", "optim")
    assert r.exit_code == 0, r.output
    got = load_file(tmp_path / "opt.safetensors")
    assert list(got) == ["state.w.exp_avg"] and torch.equal(got["state.w.exp_avg"], both["optim.state.w.exp_avg"])


def _merge_dcp(path, other):
    """Fold ``other``'s entries into ``path``'s metadata (their files renamed to ranks 2 and 3)."""
    md, extra = (pickle.loads((p / ".metadata").read_bytes()) for p in (path, other))
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    for r in (0, 1):
        (other / f"__{r}_0.distcp").rename(path / f"__{r + 2}_0.distcp")
    md.state_dict_metadata.update(extra.state_dict_metadata)
    md.planner_data.update(extra.planner_data)
    for k, v in extra.storage_data.items():
        md.storage_data[k] = _StorageInfo(v.relative_path.replace("__0_", "__2_").replace("__1_", "__3_"), v.offset, v.length)
    (path / ".metadata").write_bytes(pickle.dumps(md))


def _edit_chunks(path, name, edit):
    md = pickle.loads((path / ".metadata").read_bytes())
    entry = md.state_dict_metadata[f"model.{name}"]
    entry.chunks[:] = edit(list(entry.chunks))
    (path / ".metadata").write_bytes(pickle.dumps(md))


@pytest.mark.parametrize("edit,why", [
    (lambda chunks: chunks[:-1], "chunks leave a gap (33 of 66 elements stored)"),
    (lambda chunks: chunks + [chunks[0]], "chunks overlap"),
])
def test_a_gap_or_an_overlap_is_refused_naming_the_tensor_and_nothing_is_written(sharded, cli, tmp_path, edit, why):
    path, _ = sharded
    _edit_chunks(path, "embed.weight", lambda c: c[:2] if why.startswith("chunks leave") else edit(c))
    for args in (("inspect", path), ("remap", path, tmp_path / "out.safetensors")):
        r = cli(*args)
        assert r.exit_code == 2 and "Traceback" not in r.output
        assert "'model.embed.weight' [11, 6]" in r.output and why.split(" (")[0] in r.output
    assert not (tmp_path / "out.safetensors").exists()


def test_a_chunk_whose_bytes_do_not_match_its_metadata_is_refused(sharded, cli):
    path, _ = sharded
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    def lie(chunks):  # the first chunk claims 4 rows; its file holds 3 (and the cover still adds up)
        a, b = chunks[0], chunks[1]
        return [ChunkStorageMetadata(a.offsets, torch.Size([4, 6])),
                ChunkStorageMetadata(torch.Size([4, 0]), torch.Size([2, 6])), *chunks[2:]]

    _edit_chunks(path, "embed.weight", lie)
    r = cli("inspect", path)
    assert r.exit_code == 2 and "is [3, 6] on disk but [4, 6] in .metadata" in r.output


def test_the_cover_check_is_exact_and_bounded():
    assert cover_problem((4, 4), [((0, 0), (2, 4)), ((2, 0), (2, 4))]) is None
    assert cover_problem((4, 4), [((0, 0), (4, 2)), ((0, 2), (4, 2))]) is None
    assert cover_problem((4, 4), [((0, 0), (2, 2)), ((2, 2), (2, 2)), ((0, 2), (2, 2)), ((2, 0), (2, 2))]) is None
    # as many elements as the tensor, but one piece twice and one missing
    assert "overlap" in cover_problem((4, 4), [((0, 0), (2, 2)), ((0, 0), (2, 2)), ((0, 2), (2, 2)), ((2, 0), (2, 4))])
    assert "outside" in cover_problem((4,), [((3,), (2,))])
    assert cover_problem((0, 3), []) is None
    # staggered boxes cutting each other's faces: more grid than a rank grid makes, refused quickly
    boxes = [((i, i), (1, 1)) for i in range(3000)]
    assert "pieces" in cover_problem((3000, 3000), boxes)


# ------------------------------------------------ torch's Hugging Face layout: each rank's safetensors pieces


def _hf_reference(path, like):
    """What torch's own HuggingFaceStorageReader loads from the folder."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    into = {k: torch.zeros_like(v) for k, v in like.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(into, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=True)
    return into


def test_the_hugging_face_layout_consolidates_as_torch_reads_it(tmp_path, cli):
    from fixtures.distributed import write_hf_pieces

    t = {k: v for k, v in _tensors().items() if k != "mix.weight"}  # one piece per rank and name
    boxes = {k: v for k, v in BOXES.items() if k != "mix.weight"}
    path = write_hf_pieces(tmp_path / "hf", t, boxes, ranks=4)
    data = json.loads(cli("inspect", path, "--json").stdout)
    assert data["format"] == "torch-dcp-hf" and data["certificate"]["ranks"] == 4
    r = cli("remap", path, tmp_path / "one.safetensors", "--verify")
    assert r.exit_code == 0, r.output
    got, ref = load_file(tmp_path / "one.safetensors"), _hf_reference(path, t)
    for k, v in t.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v) and torch.equal(ref[k], v), k


def test_a_missing_rank_or_piece_of_the_hugging_face_layout_is_refused(tmp_path, cli):
    from safetensors.torch import save_file

    from fixtures.distributed import write_hf_pieces

    t = {"w": torch.randn(9, 2)}
    path = write_hf_pieces(tmp_path / "hf", t, {"w": shard_boxes((9, 2), 3)}, ranks=3)
    (path / "shard-00002-model-00001-of-00001.safetensors").unlink()
    r = cli("remap", path, tmp_path / "out.safetensors")
    assert r.exit_code == 2 and "rank 1 are missing (shard-00002-*)" in r.output
    save_file({"x": torch.zeros(1)}, path / "shard-00002-model-00001-of-00001.safetensors",
              metadata={"DCP_SHARDING_INFO": json.dumps({"x": {"saved_offsets": [0]}})})
    r = cli("remap", path, tmp_path / "out.safetensors")
    assert r.exit_code == 2 and "'w': [9, 2]: chunks leave a gap (12 of 18 elements stored)" in r.output
    save_file({"w": torch.zeros(3, 2)}, path / "shard-00002-model-00001-of-00001.safetensors",
              metadata={"DCP_SHARDING_INFO": json.dumps({"w": {"saved_offsets": [3, "0"]}})})
    r = cli("inspect", path)
    assert r.exit_code == 2 and "tensor 'w' has no valid saved_offsets" in r.output
    assert not (tmp_path / "out.safetensors").exists()


# ------------------------------------------------ what an outside review found


@pytest.mark.parametrize("fmt", ["dcp", "folder"])
def test_a_rewrite_in_place_keeps_the_folder_readable_and_verifies_against_the_source(sharded, cli, fmt):
    path, t = sharded
    r = cli("remap", path, path, "--in-place", "--format", fmt, "--verify")
    assert r.exit_code == 0, r.output
    back = cli("remap", path, path.parent / "back.safetensors")
    assert back.exit_code == 0, back.output
    got = load_file(path.parent / "back.safetensors")
    assert all(torch.equal(got[k], v) for k, v in t.items())


def _hostile(path, edit):
    md = pickle.loads((path / ".metadata").read_bytes())
    edit(md)
    (path / ".metadata").write_bytes(pickle.dumps(md))


def _set_chunks(name, chunks):
    return lambda md: setattr(md.state_dict_metadata[name], "chunks", chunks)


def _stored_chunk(path, name, piece):
    """Point the second chunk of ``name`` at a new tensor appended to rank 1's file."""
    import io

    from torch.distributed.checkpoint.filesystem import _StorageInfo

    buf = io.BytesIO()
    torch.save(piece, buf)
    f = path / "__1_0.distcp"
    start = f.stat().st_size
    f.write_bytes(f.read_bytes() + buf.getvalue())
    md = pickle.loads((path / ".metadata").read_bytes())
    key = sorted((k for k in md.storage_data if k.fqn == name), key=lambda k: tuple(k.offset))[1]
    md.storage_data[key] = _StorageInfo("__1_0.distcp", start, len(buf.getvalue()))
    (path / ".metadata").write_bytes(pickle.dumps(md))


HOSTILE = {
    "float offsets": (lambda md: setattr(md.state_dict_metadata["model.embed.bias"], "size", (3.5,)),
                      "has a size or offset of (3.5,)"),
    "a string size": (lambda md: setattr(md.state_dict_metadata["model.embed.bias"], "size", "3"),
                      "has a size or offset of 3"),
    "a name that is no string": (lambda md: md.state_dict_metadata.update({7: md.state_dict_metadata["model.embed.bias"]}),
                                 "names a tensor by int '7'"),
    "a dtype that is no dtype": (lambda md: setattr(md.state_dict_metadata["model.embed.bias"].properties, "dtype", "x"),
                                 "has dtype 'x' in .metadata, not a torch dtype"),
    "a tensor of 3000 dims": (lambda md: setattr(md.state_dict_metadata["model.norm.num_batches_tracked"], "size",
                                                 torch.Size([1] * 3000)), "not a tuple of at most 64 sizes"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_metadata_is_one_line_and_nothing_is_written(sharded, cli, tmp_path, case):
    path, _ = sharded
    edit, why = HOSTILE[case]
    _hostile(path, edit)
    r = cli("remap", path, tmp_path / "out.safetensors")
    assert r.exit_code == 2 and why in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("piece,why", [
    (lambda: torch.randn(3, 6).to_sparse(), "is a sparse_coo tensor"),
    (lambda: torch.empty(3, 6, device="meta"), "is a meta tensor"),
    (lambda: torch.zeros(1).expand(18).reshape(3, 6), "is a view larger than its storage"),
])
def test_a_chunk_that_is_no_plain_tensor_is_refused(sharded, cli, piece, why):
    path, _ = sharded
    _stored_chunk(path, "model.embed.weight", piece())
    r = cli("inspect", path)
    assert r.exit_code == 2 and why in r.output and "Traceback" not in r.output, r.output


def test_overlapping_chunks_are_found_without_quadratic_work():
    import time

    n = 4000  # n unit chunks, then n chunks of the whole tensor: found at the first repeated cell
    boxes = [((i,), (1,)) for i in range(n)] + [((0,), (n,))] * n
    t0 = time.process_time()
    assert "overlap" in cover_problem((n,), boxes)
    assert time.process_time() - t0 < 2  # CPU seconds; the quadratic check took minutes at 20x this size


def test_an_empty_tensor_needs_no_chunk(tmp_path, cli):
    path = write_chunked_dcp(tmp_path / "ckpt", {"w": torch.randn(2, 3), "e": torch.zeros(0, 4)}, ranks=1)
    _hostile(path, _set_chunks("e", []))
    r = cli("remap", path, tmp_path / "out.safetensors", "--verify")
    assert r.exit_code == 0, r.output
    assert load_file(tmp_path / "out.safetensors")["e"].shape == (0, 4)
