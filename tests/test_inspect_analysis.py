"""Pure analyses behind `surgery inspect`/`surgery diff`, and the torch-free architecture guess."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from surgery.inspection.arch_guess import (
    ArchGuess,
    classifier_key,
    guess_architecture,
    head_keys,
    list_archs,
    model_signature,
    optional_keys,
    table_info,
)
from surgery.checkpoint import TensorInfo, canonical_from_torch, itemsize
from surgery.errors import SurgeryError
from surgery.inspection.diff_report import DiffReport, compare_values
from surgery.inspection.diff_report import diff_infos as diff
from surgery.inspection.key_analysis import (
    cut_tree,
    dtype_bytes,
    dtype_counts,
    module_tree,
    remap_command,
    suggest_remap,
)
from surgery.keys import collapse_keys, common_prefix, detect_wrapper_prefixes
from tests import REPO

ROOT = REPO


def info(name: str, shape: tuple[int, ...], dtype: str = "F32") -> TensorInfo:
    n = 1
    for s in shape:
        n *= s
    return TensorInfo(name, dtype, tuple(shape), file="x", data_offset=0, storage_nbytes=n * itemsize(dtype))


def infos_of(shapes: dict[str, tuple[int, ...]], dtype: str = "F32") -> dict[str, TensorInfo]:
    return {k: info(k, s, dtype) for k, s in shapes.items()}


def meta_infos(arch: str, prefix: str = "", **kwargs) -> dict[str, TensorInfo]:
    """A torchvision model's state dict as TensorInfo, built on the meta device (no memory)."""
    import warnings

    import torch
    import torchvision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = torchvision.models.get_model(arch, weights=None, **kwargs)
    out = {}
    for k, t in model.state_dict().items():
        dt = canonical_from_torch(str(t.dtype))
        out[prefix + k] = TensorInfo(prefix + k, dt, tuple(t.shape), "x", 0, t.numel() * t.element_size())
    return out


# ----------------------------------------------------------------------------- prefixes

KEYS = ["conv.weight", "conv.bias", "fc.weight"]


@pytest.mark.parametrize("prefix, expected", [
    ("", []),
    ("module.", ["module."]),
    ("_orig_mod.", ["_orig_mod."]),
    ("_orig_mod.module.", ["_orig_mod.", "module."]),
    ("module._orig_mod.", ["module.", "_orig_mod."]),
    ("module.module.", ["module.", "module."]),
])
def test_wrapper_prefixes(prefix, expected):
    assert detect_wrapper_prefixes([prefix + k for k in KEYS]) == expected


def test_partial_wrapper_prefix_is_not_reported():
    keys = ["module.conv.weight", "module.conv.bias", "fc.weight"]
    assert detect_wrapper_prefixes(keys) == []
    assert suggest_remap(keys) == []
    assert remap_command(keys) is None
    # a key that is the prefix alone would be left nameless
    assert detect_wrapper_prefixes(["module.", "module.x"]) == []
    assert detect_wrapper_prefixes([]) == []


def test_common_prefix():
    assert common_prefix(["model.conv.weight", "model.fc.weight"]) == "model."
    assert common_prefix(["module.backbone.conv.weight", "module.backbone.fc.weight"]) == "backbone."
    assert common_prefix(["conv.weight", "fc.weight"]) is None
    assert common_prefix(["model.fc.weight"]) is None  # one key: nothing to tell apart
    assert common_prefix(["model", "model.fc.weight"]) is None  # would empty a key
    assert common_prefix([]) is None


def test_suggest_remap():
    assert suggest_remap(["_orig_mod.module.a.w", "_orig_mod.module.b.w"]) == ["--auto"]
    assert suggest_remap(["module.model.a.w", "module.model.b.w"]) == ["--auto", "--strip-prefix model."]
    assert suggest_remap(["model.a.w", "model.b.w"]) == ["--strip-prefix model."]
    assert suggest_remap(["a.w", "b.w"]) == []
    assert remap_command(["module.a.w", "module.b.w"], "ddp.pth", "out.safetensors") == \
        "surgery remap ddp.pth out.safetensors --auto"
    assert remap_command(["model.a.w", "model.b.w"]) == "surgery remap SRC DST --strip-prefix model."


# ----------------------------------------------------------------------------- tree and collapse

@pytest.fixture(scope="module")
def resnet18_infos():
    return meta_infos("resnet18")


def test_module_tree_collapses_identical_blocks(resnet18_infos):
    rows = module_tree(resnet18_infos)
    by_path = {r.path: r for r in rows}
    # layer1's two blocks are identical: one row for both, params summed
    l1 = by_path["layer1.{0,1}"]
    block = sum(t.numel for k, t in resnet18_infos.items() if k.startswith("layer1.0."))
    assert (l1.depth, l1.repeat, l1.params, l1.n_tensors) == (2, 2, 2 * block, 24)
    assert l1.params == by_path["layer1"].params
    leaf = by_path["layer1.{0,1}.conv1.weight"]
    assert (leaf.shape, leaf.params, leaf.repeat, leaf.is_tensor) == ((64, 64, 3, 3), 2 * 64 * 64 * 9, 2, True)
    assert "layer1.0" not in by_path and "layer1.1.conv1.weight" not in by_path
    # layer2.0 has a downsample branch: it must not merge with layer2.1
    assert "layer2.0" in by_path and "layer2.1" in by_path and "layer2.0.downsample.0.weight" in by_path
    assert not any("{" in p for p in by_path if p.startswith("layer2"))
    # totals and order
    top = [r for r in rows if r.depth == 1]
    assert [r.path for r in top] == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert sum(r.params for r in top) == sum(t.numel for t in resnet18_infos.values())
    assert sum(r.n_tensors for r in top) == len(resnet18_infos)
    assert by_path["bn1"].dtypes == ("F32", "I64")
    # parents come right before their subtrees; a child's path is its parent's plus its name
    parents: list[str] = []
    for r in rows:
        del parents[r.depth - 1:]
        assert len(parents) == r.depth - 1
        assert r.path == ".".join([*parents[-1:], r.name])
        parents.append(r.path)
    json.dumps([r.to_json() for r in rows])


def test_module_tree_depth_and_ranges():
    rows = module_tree(meta_infos("resnet50"), depth=2)
    assert max(r.depth for r in rows) == 2
    paths = [r.path for r in rows]
    assert "layer3.0" in paths and "layer3.{1..5}" in paths and "layer1.{1,2}" in paths
    rows = module_tree(meta_infos("vit_b_16"), depth=3)
    layers = [r for r in rows if r.path.startswith("encoder.layers.")]
    assert [r.path for r in layers] == ["encoder.layers.encoder_layer_{0..11}"]
    assert layers[0].repeat == 12


def test_module_tree_key_that_is_also_a_module():
    rows = module_tree(infos_of({"a": (2,), "a.b": (3,)}))
    assert [(r.path, r.params, r.shape) for r in rows] == [("a", 5, (2,)), ("a.b", 3, (3,))]


@pytest.mark.parametrize("style, top, label", [
    ("layer{}", None, "layer{0..11}"),      # number glued to the name
    ("layers_{}", None, "layers_{0..11}"),
    ("block-{}", None, "block-{0..11}"),
    ("h.{}", "h", "h.{0..11}"),             # a dotted index, as before
    ("blocks.{}", "blocks", "blocks.{0..11}"),
    ("encoder.layer.{}", "encoder", "encoder.layer.{0..11}"),
])
def test_module_tree_collapses_numbered_siblings_whatever_the_style(style, top, label):
    shapes = {}
    for i in range(12):
        shapes[style.format(i) + ".attn.weight"] = (4, 4)
        shapes[style.format(i) + ".attn.bias"] = (4,)
    rows = module_tree(infos_of(shapes), depth=None)
    by_path = {r.path: r for r in rows}
    row = by_path[label]
    assert (row.repeat, row.params, row.n_tensors) == (12, 12 * 20, 24)
    assert by_path[label + ".attn.weight"].shape == (4, 4)
    assert len(rows) == label.split("{")[0].count(".") + 4  # the parents, the block, attn, weight, bias
    if top is not None:
        assert rows[0].path == top


def test_module_tree_glued_numbers_collapse_only_identical_structures():
    # different shapes, a different dtype, an extra key, or a sibling in between: no merge
    cases = [
        {"layer0.w": info("layer0.w", (4,)), "layer1.w": info("layer1.w", (5,))},
        {"layer0.w": info("layer0.w", (4,)), "layer1.w": info("layer1.w", (4,), "F16")},
        {"layer0.w": info("layer0.w", (4,)), "layer1.w": info("layer1.w", (4,)), "layer1.b": info("layer1.b", (4,))},
        {"layer0.w": info("layer0.w", (4,)), "norm.w": info("norm.w", (4,)), "layer1.w": info("layer1.w", (4,))},
        {"conv.w": info("conv.w", (4,)), "conv1.w": info("conv1.w", (4,))},  # 'conv' carries no number
        {"h.0.w": info("h.0.w", (4,)), "h.1.w": info("h.1.w", (5,))},  # a dotted index, other shapes
        {"layers_0.w": info("layers_0.w", (4,)), "layers_1.v": info("layers_1.v", (4,))},  # other names
    ]
    for infos in cases:
        rows = module_tree(infos)
        assert not any("{" in r.path for r in rows), [r.path for r in rows]
    # a run is cut where the structure changes, and gaps in the numbering show
    infos = infos_of({**{f"layer{i}.w": (4,) for i in (0, 1, 2, 4)}, "layer5.w": (8,)})
    assert [r.path for r in module_tree(infos) if r.depth == 1] == ["layer{0..2,4}", "layer5"]


def test_module_tree_of_fifty_thousand_glued_names_is_two_rows():
    infos = infos_of({f"layer{i}.weight": (2,) for i in range(50_000)})
    start = time.process_time()
    rows = module_tree(infos, depth=2)
    assert time.process_time() - start < 3
    assert [(r.path, r.repeat, r.params) for r in rows] == [
        ("layer{0..49999}", 50_000, 100_000), ("layer{0..49999}.weight", 50_000, 100_000)]


def _rows(infos, depth=None):
    return [(r.path, r.params, r.repeat) for r in module_tree(infos, depth=depth)]


def test_module_tree_cuts_a_counted_run_where_a_member_differs():
    # names counting up (layer0, layer1... or 0, 1...) are read at once: one that differs still cuts the run
    infos = {**infos_of({f"layer{i}.w": (4,) for i in range(10)}), "layer5.w": info("layer5.w", (4,), "F16")}
    assert _rows(infos) == [("layer{0..4}", 20, 5), ("layer{0..4}.w", 20, 5), ("layer5", 4, 1),
                            ("layer5.w", 4, 1), ("layer{6..9}", 16, 4), ("layer{6..9}.w", 16, 4)]
    infos = infos_of({**{f"h.{i}.w": (4,) for i in range(10)}, "h.3.w": (5,)})
    assert _rows(infos, depth=2) == [("h", 41, 1), ("h.{0..2}", 12, 3), ("h.3", 5, 1), ("h.{4..9}", 24, 6)]
    infos = infos_of({"layer0.w": (1,), "layer1.b": (1,), "layer2.b": (1,)})  # another key name
    assert [p for p, _, _ in _rows(infos)] == ["layer0", "layer0.w", "layer{1,2}", "layer{1,2}.b"]


@pytest.mark.parametrize("shapes, expected", [
    ({"l00.w": (1,), "l01.w": (1,), "l02.w": (1,)}, ["l{00..02}", "l{00..02}.w"]),  # leading zeros
    ({"layer2.w": (1,), "layer1.w": (1,), "layer0.w": (1,)}, ["layer{0..2}", "layer{0..2}.w"]),  # counting down
    ({"x1.w": (1,), "x01.w": (1,), "x2.w": (1,)}, ["x{01,1,2}", "x{01,1,2}.w"]),  # one number twice
    ({f"b{10 ** 17 + i}.w": (1,) for i in range(3)},  # 18 digits: an index still
     ["b{100000000000000000..100000000000000002}", "b{100000000000000000..100000000000000002}.w"]),
    ({f"b{10 ** 18 + i}.w": (1,) for i in range(2)},  # 19: no model has that many blocks, a name like any other
     ["b1000000000000000000", "b1000000000000000000.w", "b1000000000000000001", "b1000000000000000001.w"]),
    ({"h.١.w": (1,), "h.٢.w": (1,), "h.٣.w": (1,), "x١.w": (1,), "x٢.w": (1,)},  # other digits: whole names only
     ["h", "h.{١..٣}", "h.{١..٣}.w", "x١", "x١.w", "x٢", "x٢.w"]),
])
def test_module_tree_labels_numbers_however_they_are_written(shapes, expected):
    assert [r.path for r in module_tree(infos_of(shapes))] == expected


@pytest.mark.parametrize("stem", ["", "layer"])
def test_module_tree_of_numbers_python_cannot_parse_is_no_crash(stem, tmp_path):
    """int() refuses a number of more than 4,300 digits: such names are names, never parsed."""
    names = [stem + str(d) * 5000 for d in (1, 2, 3)]
    rows = module_tree(infos_of({f"{n}.w": (1,) for n in names}))
    assert [r.path for r in rows] == [p for n in names for p in (n, f"{n}.w")]
    assert cut_tree(rows, 2).like == f"{names[1]}"
    import torch

    torch.save({f"{n}.w": torch.zeros(1) for n in names}, tmp_path / "long.pt")
    out = subprocess.run([sys.executable, "-m", "cli.main", "inspect", str(tmp_path / "long.pt")], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_module_tree_a_name_without_its_number_merges_with_nothing():
    infos = infos_of({"conv.w": (1,), "conv1.w": (1,), "conv2.w": (1,), "conv3.w": (1,)})
    assert [p for p, _, _ in _rows(infos)] == ["conv", "conv.w", "conv{1..3}", "conv{1..3}.w"]
    infos = infos_of({"conv1.w": (1,), "conv.w": (1,), "conv2.w": (1,)})
    assert [p for p, _, _ in _rows(infos)] == ["conv1", "conv1.w", "conv", "conv.w", "conv2", "conv2.w"]
    infos = infos_of({"b.0.w": (1,), "b.1.w": (1,), "b..w": (1,), "b.2.w": (1,), "b.3.w": (1,)})  # an empty name
    assert _rows(infos) == [("b", 5, 1), ("b.{0,1}", 2, 2), ("b.{0,1}.w", 2, 2), ("b.", 1, 1), ("b..w", 1, 1),
                            ("b.{2,3}", 2, 2), ("b.{2,3}.w", 2, 2)]


def test_module_tree_collapses_tensors_that_are_modules_too():
    rows = module_tree(infos_of({"m.0": (2,), "m.0.w": (3,), "m.1": (2,), "m.1.w": (3,)}))
    assert [(r.path, r.params, r.n_tensors, r.shape, r.repeat) for r in rows] == [
        ("m", 10, 4, None, 1), ("m.{0,1}", 10, 4, (2,), 2), ("m.{0,1}.w", 6, 2, (3,), 2)]


def test_module_tree_tells_siblings_apart_by_keys_below_the_depth_shown():
    infos = infos_of({"h.0.a.x": (2,), "h.1.a.y": (2,), "h.2.a.y": (2,)})
    assert _rows(infos, depth=2) == [("h", 6, 1), ("h.0", 2, 1), ("h.{1,2}", 4, 2)]
    assert _rows(infos, depth=1) == [("h", 6, 1)]
    assert module_tree(infos, depth=0) == module_tree(infos, depth=-1) == module_tree({}) == []


def test_module_tree_totals_are_exact_when_elements_do_not_follow_from_shapes():
    # a nested tensor's elements are its buffer's: siblings of one shape may hold more or fewer.
    # The parent counts each; a collapsed row, as ever, its first member times the repeat
    def nested(shape, n):
        return TensorInfo("t", "F32", shape, "x", 0, 4 * n, kind="nested", parts={"buffer": info("b", (n,))})

    infos = {"m.l.0.w": nested((4,), 3), "m.l.1.w": nested((4,), 5), "m.l.2.w": nested((4,), 7)}
    rows = module_tree(infos, depth=3)
    assert [(r.path, r.params, r.n_tensors, r.repeat) for r in rows] == [
        ("m", 15, 3, 1), ("m.l", 15, 3, 1), ("m.l.{0..2}", 9, 3, 3)]
    # the kind is no part of the comparison: a meta tensor among dense ones of its shape merges
    meta = TensorInfo("l.1.w", "F32", (4,), "x", 0, 0, kind="meta")
    infos = {**infos_of({"l.0.w": (4,), "l.2.w": (4,)}), "l.1.w": meta}
    assert _rows(infos, depth=2) == [("l", 12, 1), ("l.{0..2}", 12, 3)]


def test_module_tree_of_deep_numbered_modules():
    shapes = {f"a.{i}.b.c.d.e.f.{j}.w": (2,) for i in range(2) for j in range(3)}
    assert _rows(infos_of(shapes)) == [
        ("a", 12, 1), ("a.{0,1}", 12, 2), ("a.{0,1}.b", 12, 2), ("a.{0,1}.b.c", 12, 2), ("a.{0,1}.b.c.d", 12, 2),
        ("a.{0,1}.b.c.d.e", 12, 2), ("a.{0,1}.b.c.d.e.f", 12, 2), ("a.{0,1}.b.c.d.e.f.{0..2}", 12, 6),
        ("a.{0,1}.b.c.d.e.f.{0..2}.w", 12, 6)]
    shapes["a.1.b.c.d.e.f.2.w"] = (3,)  # a difference six levels down keeps a.0 and a.1 apart
    assert [p for p, _, _ in _rows(infos_of(shapes))] == [
        "a", "a.0", "a.0.b", "a.0.b.c", "a.0.b.c.d", "a.0.b.c.d.e", "a.0.b.c.d.e.f", "a.0.b.c.d.e.f.{0..2}",
        "a.0.b.c.d.e.f.{0..2}.w", "a.1", "a.1.b", "a.1.b.c", "a.1.b.c.d", "a.1.b.c.d.e", "a.1.b.c.d.e.f",
        "a.1.b.c.d.e.f.{0,1}", "a.1.b.c.d.e.f.{0,1}.w", "a.1.b.c.d.e.f.2", "a.1.b.c.d.e.f.2.w"]
    # numbered siblings at each of 1,200 levels: no recursion, one row per module
    levels = 1200
    chain = infos_of({"0." * k + f"{n}.w": (2,) for k in range(levels) for n in (1, 2)})
    rows = [(r.path, r.repeat) for r in module_tree(chain)]
    assert rows[:5] == [("{1,2}", 2), ("{1,2}.w", 2), ("0", 1), ("0.{1,2}", 2), ("0.{1,2}.w", 2)]
    assert len(rows) == 3 * levels - 1 and rows[-1] == ("0." * (levels - 1) + "{1,2}.w", 2)


def test_cut_tree_keeps_the_first_rows_and_totals_the_rest():
    infos = infos_of({f"layer{i}.{p}": (i + 1,) for i in range(100) for p in ("weight", "bias")})
    rows = module_tree(infos, depth=2)
    assert len(rows) == 300  # distinct shapes: nothing collapses
    assert cut_tree(rows, 300).hidden == 0 and cut_tree(rows, 300).shown == rows
    cut = cut_tree(rows, 40)
    assert cut.shown == rows[:40] and cut.hidden == 260
    # totals over the hidden subtrees, each counted once: layer13's two tensors, then layer14..layer99
    assert cut.modules == 2 + 86 and cut.like == "layerN"
    hidden = {k: t for k, t in infos.items() if int(k.split(".")[0][5:]) >= 13}
    assert cut.params == sum(t.numel for t in hidden.values()) and cut.n_tensors == len(hidden)
    other = module_tree(infos_of({"a.x": (1,), "a.y": (2,), "b.x": (3,), "c.z": (4,)}), depth=2)
    assert cut_tree(other, 2).like == "a.y"  # no shared numbered stem: the first row left out


def test_collapse_keys():
    keys = ["layer4.0.bn2.weight", "layer4.0.bn2.bias", "layer4.1.bn2.weight", "layer4.1.bn2.bias"]
    assert collapse_keys(keys) == ["layer4.{0,1}.bn2.{weight,bias}"]
    assert collapse_keys(["fc.weight", "fc.bias"]) == ["fc.{weight,bias}"]
    assert collapse_keys(["class_token", "pos_embed"]) == ["class_token", "pos_embed"]
    # different structure: no merge
    assert collapse_keys(["l.0.w", "l.1.w", "l.1.b"]) == ["l.0.w", "l.1.{w,b}"]
    assert collapse_keys([f"blocks.{i}.w" for i in range(12)]) == ["blocks.{0..11}.w"]
    assert collapse_keys([f"b.{i}.w" for i in (0, 1, 2, 4, 6, 7)]) == ["b.{0..2,4,6,7}.w"]
    assert collapse_keys([]) == []
    # numbers of more digits than any index (int() refuses one of over 4,300) are names like any other
    long = [str(d) * 5000 for d in (1, 2)]
    assert collapse_keys([f"b.{n}.w" for n in long]) == [f"b.{n}.w" for n in long]
    assert collapse_keys([f"b_{10 ** 17 + i}.w" for i in range(3)]) == ["b_{100000000000000000..100000000000000002}.w"]


def test_dtype_totals():
    infos = {"a": info("a", (10,), "F32"), "b": info("b", (10,), "BF16"), "c": info("c", (3,), "BF16")}
    assert dtype_bytes(infos) == {"F32": 40, "BF16": 26}
    assert dtype_counts(infos) == {"BF16": 2, "F32": 1}
    assert list(dtype_bytes(infos)) == ["F32", "BF16"]


# ----------------------------------------------------------------------------- diff

def test_diff():
    a = infos_of({"conv.weight": (8, 3, 3, 3), "conv.bias": (8,), "fc.weight": (10, 8), "old": (1,)})
    b = infos_of({"conv.weight": (8, 3, 3, 3), "fc.weight": (7, 8), "new": (2,)})
    b["conv.weight"] = info("conv.weight", (8, 3, 3, 3), "F16")
    rep = diff(a, b)
    assert rep.only_a == ["conv.bias", "old"] and rep.only_b == ["new"]
    assert rep.shape_mismatch == [("fc.weight", (10, 8), (7, 8))]
    assert rep.dtype_mismatch == [("conv.weight", "F32", "F16")]
    assert rep.common == ["conv.weight", "fc.weight"] and rep.comparable == ["conv.weight"]
    assert not rep.same_keys and not rep.identical
    j = json.loads(json.dumps(rep.to_json()))
    assert j["shape_mismatch"] == [{"name": "fc.weight", "shape_a": [10, 8], "shape_b": [7, 8]}]
    assert j["only_a"] == ["conv.bias", "old"] and j["n_common"] == 2 and j["max_abs_diff"] == {}

    same = diff(a, a)
    assert same.same_keys and same.identical and same.comparable == list(a)


def test_diff_strip_wrappers():
    a = infos_of({"module.fc.weight": (2, 2), "module.fc.bias": (2,)})
    b = infos_of({"fc.weight": (2, 2), "fc.bias": (2,)})
    assert not diff(a, b).same_keys
    rep = diff(a, b, strip_wrappers=True)
    assert rep.same_keys and rep.prefix_a == "module." and rep.prefix_b == ""


class _FakeCkpt:
    """Duck-typed Checkpoint: compare_values only calls .tensor(name)."""

    def __init__(self, tensors):
        self.tensors = tensors

    def tensor(self, name):
        return self.tensors[name].clone()


def test_compare_values():
    import torch

    nan, inf = float("nan"), float("inf")
    a = _FakeCkpt({"module.w": torch.tensor([1.0, 2.0, nan, inf]), "module.i": torch.tensor([1, 5]),
                   "module.h": torch.tensor([1.0, 2.0], dtype=torch.bfloat16), "module.e": torch.zeros(0, 3),
                   "module.n": torch.tensor([nan, 1.0])})
    b = _FakeCkpt({"w": torch.tensor([1.0, 2.5, nan, inf]), "i": torch.tensor([1, 2]),
                   "h": torch.tensor([1.0, 2.0], dtype=torch.float32), "e": torch.zeros(0, 3),
                   "n": torch.tensor([0.0, 1.0])})
    rep = diff({k: info(k, tuple(t.shape)) for k, t in a.tensors.items()},
               {k: info(k, tuple(t.shape)) for k, t in b.tensors.items()}, strip_wrappers=True)
    rep.compare(a, b)
    assert rep.max_abs_diff == {"w": 0.5, "i": 3.0, "h": 0.0, "e": 0.0, "n": inf}
    assert not rep.identical
    assert compare_values(a, b, ["h"], prefix_a="module.") == {"h": 0.0}
    assert isinstance(rep, DiffReport)


# ----------------------------------------------------------------------------- architecture guess

REPRESENTATIVE = {
    # arch -> classifier weight key the table must name
    "resnet18": "fc.weight",
    "resnet34": "fc.weight",
    "mobilenet_v3_small": "classifier.3.weight",
    "vit_b_16": "heads.head.weight",
    "efficientnet_b0": "classifier.1.weight",
    "squeezenet1_1": "classifier.1.weight",
    "alexnet": "classifier.6.weight",
}
OTHER_CLASSIFIERS = {
    "vgg16": "classifier.6.weight", "convnext_tiny": "classifier.2.weight", "swin_t": "head.weight",
    "inception_v3": "fc.weight", "googlenet": "fc.weight", "densenet121": "classifier.weight",
    "regnet_y_400mf": "fc.weight", "maxvit_t": "classifier.5.weight", "mobilenet_v2": "classifier.1.weight",
}


@pytest.mark.parametrize("arch", list(REPRESENTATIVE))
def test_guess_wrapped_checkpoint_with_new_head(arch):
    infos = meta_infos(arch, prefix="module.", num_classes=7)
    guesses = guess_architecture(infos)
    best = guesses[0]
    assert isinstance(best, ArchGuess)
    assert best.arch == arch, guesses
    assert best.score == 1.0 and best.matched == best.total and best.unexpected == 0
    assert best.num_classes == 7 and best.prefix_stripped == "module."
    assert guesses[1].score < 1.0
    assert classifier_key(arch) == REPRESENTATIVE[arch]
    # the table's signature is the model's own (at 1000 classes)
    table = model_signature(arch)
    built = {k[len("module."):]: t.shape for k, t in infos.items()}
    assert list(table) == list(built)
    assert {k: s for k, s in table.items() if k not in head_keys(arch)} == \
        {k: s for k, s in built.items() if k not in head_keys(arch)}
    json.dumps([g.to_json() for g in guesses])


@pytest.mark.parametrize("arch, key", list(OTHER_CLASSIFIERS.items()))
def test_classifier_keys(arch, key):
    assert classifier_key(arch) == key
    assert model_signature(arch)[key][0] == 1000


def test_resnet18_and_resnet34_are_told_apart(resnet18_infos):
    g = guess_architecture(resnet18_infos, top=5)
    scores = {x.arch: x.score for x in g}
    assert g[0].arch == "resnet18" and scores["resnet18"] == 1.0
    assert scores.get("resnet34", 0.0) < 0.8


def test_guess_strips_lightning_and_compile_prefixes(resnet18_infos):
    keys = {"_orig_mod.model." + k: t for k, t in resnet18_infos.items()}
    best = guess_architecture(keys, top=1)[0]
    assert (best.arch, best.score, best.prefix_stripped, best.num_classes) == ("resnet18", 1.0, "_orig_mod.model.", 1000)


def test_guess_ignores_num_batches_tracked_and_optional_aux_heads():
    sig = model_signature("resnet50")
    no_nbt = {k: s for k, s in sig.items() if not k.endswith("num_batches_tracked")}
    assert guess_architecture(no_nbt, top=1)[0].score == 1.0
    aux = optional_keys("googlenet")
    assert aux and all(k.startswith(("aux1.", "aux2.")) for k in aux)
    lean = {k: s for k, s in model_signature("googlenet").items() if k not in aux}
    best = guess_architecture(lean, top=1)[0]
    assert (best.arch, best.score) == ("googlenet", 1.0)
    assert set(head_keys("inception_v3")) == {"AuxLogits.fc.weight", "AuxLogits.fc.bias", "fc.weight", "fc.bias"}


def test_guess_foreign_model_scores_low():
    foreign = {f"blocks.{i}.attn.qkv.weight": (1152, 384) for i in range(12)}
    foreign.update({"patch_embed.proj.weight": (384, 3, 16, 16), "head.weight": (10, 384)})
    guesses = guess_architecture(foreign)
    assert len(guesses) == 3 and all(g.score < 0.1 for g in guesses)
    assert guess_architecture({}) == []


def test_guess_is_fast():
    sig = model_signature("resnet152")  # ~900 keys
    guess_architecture(sig)  # loads and caches the table
    t0 = time.process_time()
    for _ in range(10):
        guess_architecture(sig)
    # CPU seconds of this process, not wall time: other tests on the other cores do not count
    assert (time.process_time() - t0) / 10 < 0.25  # ~3 ms here


def test_unknown_arch_error():
    with pytest.raises(SurgeryError, match="unknown architecture 'resnet19'.*resnet18"):
        model_signature("resnet19")


def _ties() -> dict[str, list[str]]:
    """arch -> other archs with the very same signature (they cannot be told apart by keys)."""
    sigs = {a: tuple(model_signature(a).items()) for a in list_archs()}
    return {a: [b for b in sigs if b != a and sigs[b] == s] for a, s in sigs.items()}


_TIES = _ties()


@pytest.mark.parametrize("arch", list_archs())
def test_every_model_ranks_itself_first(arch):
    guesses = guess_architecture(model_signature(arch), top=3)
    top = [g for g in guesses if g.score == guesses[0].score]
    allowed = {arch, *_TIES[arch]}
    assert arch in {g.arch for g in top}, f"{arch}: ranked {[(g.arch, g.score) for g in guesses]}"
    assert {g.arch for g in top} <= allowed, f"{arch} ties with {[g.arch for g in top]}"
    assert guesses[0].score == 1.0 and guesses[0].num_classes == 1000



def test_report_identical_signatures():
    # No two torchvision models share a signature today; if that changes, the guess must list
    # them side by side (above) and this names them.
    tied = {a: t for a, t in _TIES.items() if t}
    assert tied == {}, f"models with identical signatures: {tied}"


def test_table_matches_installed_torchvision():
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    assert sorted(list_archs()) == sorted(names), "run `python -m surgery.inspection.arch_guess --rebuild`"
    info = table_info()
    assert info["models"] == len(names) and info["torchvision"]


def test_meta_build_fallback_for_regnet():
    """regnet computes its widths with tensors, which the meta device context cannot run."""
    import torch
    import torchvision

    from surgery.inspection.arch_guess import _build

    before = (torch.nn.Module.register_parameter, torch.nn.Module.register_buffer)
    model = _build(torchvision.models.get_model_builder("regnet_y_400mf"), {"num_classes": 7})
    assert (torch.nn.Module.register_parameter, torch.nn.Module.register_buffer) == before
    sd = model.state_dict()
    assert all(t.device.type == "meta" for t in sd.values())
    table = model_signature("regnet_y_400mf")
    assert {k: tuple(t.shape) for k, t in sd.items() if not k.startswith("fc.")} == \
        {k: s for k, s in table.items() if not k.startswith("fc.")}
    assert tuple(sd["fc.weight"].shape) == (7,) + table["fc.weight"][1:]


def test_table_is_small():
    from surgery.inspection.arch_guess import TABLE_PATH

    assert TABLE_PATH.stat().st_size < 400_000


def test_inspect_and_guess_do_not_import_torch():
    code = (
        "import sys\n"
        "from surgery.inspection.key_analysis import module_tree, suggest_remap\n"
        "from surgery.inspection.diff_report import diff_infos\n"
        "from surgery.keys import collapse_keys\n"
        "from surgery.inspection.arch_guess import guess_architecture, model_signature, classifier_key\n"
        "sig = model_signature('resnet18')\n"
        "g = guess_architecture({'module.' + k: v for k, v in sig.items()})\n"
        "assert g[0].arch == 'resnet18', g\n"
        "classifier_key('vit_b_16'); collapse_keys(list(sig)); suggest_remap(list(sig))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'numpy'))\n"
        "assert not bad, bad\n"
    )
    env_path = str(ROOT)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr


def test_module_tree_keeps_every_dtype_of_a_subtree():
    # a child whose dtypes are a subset of those already counted must not replace them
    infos = {**infos_of({"m.a.x": (2,), "m.b.z": (2,)}, "F16"), **infos_of({"m.a.y": (2,)})}
    for depth in (None, 1, 2):
        assert module_tree(infos, depth=depth)[0].dtypes == ("F16", "F32")


def test_keys_no_model_has_count_as_unexpected():
    """Keys outside every signature are not scored one by one, but still count against the fit."""
    sig = model_signature("resnet18")
    exact = guess_architecture(sig, top=1)[0]
    junk = {**sig, **{f"extra.{i}.weight": (3,) for i in range(50)}}
    g = guess_architecture(junk, top=1)[0]
    assert (exact.arch, exact.score, exact.unexpected) == ("resnet18", 1.0, 0)
    assert (g.arch, g.matched, g.unexpected) == ("resnet18", exact.matched, 50)
    assert g.score == pytest.approx(exact.matched / (exact.total + 50))
