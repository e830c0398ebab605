"""surgery.trainer.data and surgery.trainer.plots on real (tiny) digit images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from fixtures.generate import digits_imagefolder
from surgery.errors import DataError, SurgeryError
from surgery.trainer.data import ImageDataset, ShardSampler, build_transforms, make_loaders, scan_images
from surgery.trainer.samples import Samples, check_num_classes, discover, sort_classes
from surgery.trainer.plots import confusion_matrix, per_class_accuracy, plot_confusion, plot_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = (0, 1, 2)
PER_CLASS = 10  # 8 train + 2 val per class


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """digits/{train,val}/{0,1,2}/*.png, 32x32 RGB; read-only: copy it before changing anything."""
    return digits_imagefolder(tmp_path_factory.mktemp("data") / "digits", classes=CLASSES, per_class=PER_CLASS, size=32)


@pytest.fixture
def copy(digits, tmp_path):
    def _copy(sub: str = "") -> Path:
        dst = tmp_path / "copy"
        shutil.copytree(digits / sub if sub else digits, dst)
        return dst
    return _copy


def files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))


# ---------------------------------------------------------------- discovery


def test_imagefolder_with_train_and_val(digits):
    s = discover(digits)
    assert s.source == "imagefolder" and s.classes == ["0", "1", "2"]
    assert s.counts() == {"train": {"0": 8, "1": 8, "2": 8}, "val": {"0": 2, "1": 2, "2": 2}}
    for items in (s.train, s.val):
        for path, label in items:
            assert Path(path).parent.name == s.classes[label]
    assert {p for p, _ in s.train}.isdisjoint(p for p, _ in s.val)


def test_single_folder_split_is_stratified_and_seeded(copy):
    flat = copy("train")  # flat/<class>/*.png, 8 per class
    a = discover(flat, val_split=0.25, seed=0)
    assert a.source == "split"
    assert a.counts() == {"train": {"0": 6, "1": 6, "2": 6}, "val": {"0": 2, "1": 2, "2": 2}}
    assert sorted(p for p, _ in a.train + a.val) == [str(p) for p in files(flat)]
    assert {p for p, _ in a.train}.isdisjoint(p for p, _ in a.val)
    assert discover(flat, val_split=0.25, seed=0) == a
    b = discover(flat, val_split=0.25, seed=1)
    assert b.counts() == a.counts() and b.val != a.val


def test_train_folder_without_val_needs_val_split(copy):
    root = copy()
    shutil.rmtree(root / "val")
    with pytest.raises(DataError, match=r"has train/ but no val/; pass --val-split"):
        discover(root)
    s = discover(root, val_split=0.5)
    assert s.source == "split" and s.counts()["val"] == {"0": 4, "1": 4, "2": 4}


def test_single_folder_needs_val_split(copy):
    with pytest.raises(DataError, match=r"one folder of class folders; pass --val-split \(e\.g\. 0\.2\)"):
        discover(copy("train"))


def test_val_split_refused_where_val_exists_and_out_of_range(digits):
    with pytest.raises(DataError, match=r"already has train/ and val/, so --val-split 0.2 has nothing to split"):
        discover(digits, val_split=0.2)
    for bad in (0, 1, 1.5, -0.1, True):
        with pytest.raises(DataError, match=r"--val-split must be a fraction between 0 and 1"):
            discover(digits, val_split=bad)


def test_missing_folder_not_csv_and_no_classes(tmp_path):
    with pytest.raises(DataError, match=r"nope: no such folder or file"):
        discover(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"notes.txt: is a file but not a .csv"):
        discover(tmp_path / "notes.txt")
    (tmp_path / "loose").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "loose" / "a.png")
    with pytest.raises(DataError, match=r"no class folders found \(it holds 1 images directly"):
        discover(tmp_path / "loose", val_split=0.2)


def test_empty_class_is_named(copy):
    root = copy()
    (root / "train" / "cat").mkdir()
    (root / "val" / "cat").mkdir()
    (root / "val" / "cat" / "readme.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"class folders with no images: train/cat, val/cat"):
        discover(root)


def test_train_and_val_with_different_classes(copy):
    root = copy()
    shutil.rmtree(root / "val" / "2")
    with pytest.raises(DataError, match=r"different class folders \(only in train/: 2\)"):
        discover(root)


def test_class_count_must_match_manifest(digits):
    s = discover(digits)
    check_num_classes(s, 3)
    with pytest.raises(DataError, match=r"found 3 classes \(0, 1, 2\) but the adapted model's head has 5 outputs") as e:
        check_num_classes(s, 5)
    assert isinstance(e.value, SurgeryError) and "--num-classes 3" in e.value.one_line()


def test_integer_names_sort_numerically():
    assert sort_classes(["10", "2", "1"]) == ["1", "2", "10"]
    assert sort_classes(["b", "a", "10", "2"]) == ["10", "2", "a", "b"]


# ---------------------------------------------------------------- CSV


def write_csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_with_header_and_relative_paths(copy):
    root = copy()
    label_of = {"0": "cat", "1": "dog", "2": "ant"}
    lines = ["Path,Label"]
    for p in files(root / "train"):
        lines.append(f"{p.relative_to(root)},{label_of[p.parent.name]}")
    csv_path = write_csv(root / "labels.CSV", lines)
    s = discover(csv_path, val_split=0.25, seed=3)  # the suffix is matched case-insensitively
    assert s.source == "csv" and s.classes == ["ant", "cat", "dog"]
    assert s.counts() == {"train": {c: 6 for c in s.classes}, "val": {c: 2 for c in s.classes}}
    for path, label in s.train + s.val:
        assert Path(path).is_file() and label_of[Path(path).parent.name] == s.classes[label]
    assert discover(csv_path, val_split=0.25, seed=3) == s


def test_csv_split_column_absolute_paths_numeric_labels(digits, tmp_path):
    # no header; third column is the split; labels 0, 5, 10 must sort numerically
    lines = []
    for split in ("train", "val"):
        for p in files(digits / split):
            lines.append(f"{p},{int(p.parent.name) * 5},{split}")
    s = discover(write_csv(tmp_path / "data.csv", ["# comment", ""] + lines))
    assert s.classes == ["0", "5", "10"]
    assert s.counts() == {"train": {"0": 8, "5": 8, "10": 8}, "val": {"0": 2, "5": 2, "10": 2}}
    with pytest.raises(DataError, match=r"has a split column, so --val-split 0.2 has nothing to split"):
        discover(tmp_path / "data.csv", val_split=0.2)


def test_csv_problems_name_their_lines(digits, tmp_path):
    good = files(digits / "train")[0]
    csv_path = write_csv(tmp_path / "bad.csv", [
        "path,label,split",
        f"{good},a,train",
        "missing.png,a,train",
        f"{good},b",
        f"{good},,val",
        f"{good},b,test",
    ])
    with pytest.raises(DataError) as e:
        discover(csv_path)
    msg = e.value.one_line()
    assert "4 problems: line 3: missing.png: no such file; line 4: expected 3 fields" in msg
    assert msg.endswith(f"(relative paths are read from {tmp_path}, the CSV's folder)")
    assert "line 3: missing.png: no such file" in msg
    assert "line 4: expected 3 fields" in msg
    assert "line 5: empty label" in msg
    assert "line 6: split 'test' is not train or val" in msg

    write_csv(tmp_path / "hdr.csv", ["img,lbl", f"{good},a"])
    with pytest.raises(DataError, match=r"line 1: img: no such file .*if this line is a header"):
        discover(tmp_path / "hdr.csv", val_split=0.2)
    write_csv(tmp_path / "nosplit.csv", [f"{good},a"])
    with pytest.raises(DataError, match=r"has no split column; pass --val-split"):
        discover(tmp_path / "nosplit.csv")
    write_csv(tmp_path / "empty.csv", ["path,label"])
    with pytest.raises(DataError, match=r"no rows"):
        discover(tmp_path / "empty.csv", val_split=0.2)


# ---------------------------------------------------------------- image checks


def test_corrupt_and_truncated_images_are_skipped_and_listed(copy):
    root = copy()
    garbage = root / "train" / "0" / "garbage.png"
    garbage.write_bytes(b"definitely not a png" * 10)
    victim = files(root / "train" / "1")[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    s = discover(root)
    assert len(s.train) == 25
    clean, bad = scan_images(s)
    assert sorted(p for p, _ in bad) == sorted([str(garbage), str(victim)])
    assert all(reason for _, reason in bad)
    assert len(clean.train) == 23 and clean.val == s.val and clean.classes == s.classes
    assert scan_images(clean) == (clean, [])


def test_class_left_without_readable_images_is_an_error(copy):
    root = copy()
    for p in files(root / "val" / "2"):
        p.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match=r"class '2' has no readable image left in val \(2 unreadable"):
        scan_images(discover(root))


def test_decode_failure_at_training_time_substitutes_the_next_sample(copy, tmp_path):
    root = copy()
    s = discover(root)
    bad_path, _ = s.train[3]
    Path(bad_path).write_bytes(b"garbage")
    tf = build_transforms(16, [0.5], [0.5], 3, train=False)
    log = tmp_path / "failures.jsonl"
    ds = ImageDataset(s.train, tf, failure_log=log)
    x, label = ds[3]
    assert x.shape == (3, 16, 16) and label == s.train[4][1]
    torch.testing.assert_close(x, ds[4][0])
    assert ds[3][1] == label  # the same substitute every time
    assert list(ds.failures) == [bad_path]
    assert [json.loads(line)["path"] for line in log.read_text().splitlines()] == [bad_path]  # recorded once
    assert list(ImageDataset(s.train, tf, failure_log=log).collect_failures()) == [bad_path]


# ---------------------------------------------------------------- transforms and loaders


def test_eval_transform_shape_and_normalisation():
    img = Image.new("RGB", (40, 30), (255, 0, 51))
    x = build_transforms(24, [0.5, 0.25, 0.2], [0.5, 0.25, 0.2], 3, train=False)(img)
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 12, 12], torch.tensor([1.0, -1.0, 0.0]))
    xr = build_transforms((20, 16), [0.0], [1.0], 3, train=False, resize=24, interpolation="bicubic")(img)
    assert xr.shape == (3, 20, 16)


def test_grayscale_to_rgb_and_rgb_to_grayscale():
    grey = Image.new("L", (32, 32), 128)
    x = build_transforms(28, [0.5], [0.5], 3, train=False)(grey)
    assert x.shape == (3, 28, 28)
    torch.testing.assert_close(x[0], x[1])
    torch.testing.assert_close(x[0, 5, 5], torch.tensor(128 / 255 * 2 - 1))
    y = build_transforms(28, [0.5], [0.5], 1, train=True)(Image.new("RGB", (32, 32), (10, 200, 30)))
    assert y.shape == (1, 28, 28)


def test_train_transform_options():
    img = Image.new("RGB", (32, 32), (0, 128, 255))
    tf = build_transforms(20, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], 3, train=True)
    assert tf(img).shape == (3, 20, 20)
    names = lambda t: [type(s).__name__ for s in t.transforms]  # noqa: E731
    assert "RandomHorizontalFlip" in names(tf) and "RandomResizedCrop" in names(tf)
    assert "RandomHorizontalFlip" not in names(build_transforms(20, [0.5], [0.5], 3, train=True, flip=False))
    assert "CenterCrop" in names(build_transforms(20, [0.5], [0.5], 3, train=True, augment=False))
    with pytest.raises(DataError, match=r"mean has 2 values for 3 channel"):
        build_transforms(20, [0.5, 0.5], [0.5], 3, train=False)
    with pytest.raises(DataError, match=r"channels must be a positive integer, got 0"):
        build_transforms(20, [0.5], [0.5], 0, train=False)


@pytest.mark.parametrize("channels", [1, 2, 3, 4, 5])
def test_transforms_follow_the_models_input_channels(channels):
    rgb = Image.new("RGB", (32, 32), (0, 128, 255))
    for img in (rgb, rgb.convert("L"), rgb.convert("RGBA")):
        for train in (True, False):
            x = build_transforms(20, [0.5], [0.5], channels, train=train)(img)
            assert x.shape == (channels, 20, 20)
    x = build_transforms(20, [0.0], [1.0], channels, train=False)(rgb)
    want = {1: None, 3: [0.0, 128 / 255, 1.0], 4: [0.0, 128 / 255, 1.0, 1.0]}.get(channels)
    if channels in (2, 5):  # other counts repeat R, G, B cyclically
        want = [[0.0, 128 / 255, 1.0][i % 3] for i in range(channels)]
    if want is not None:
        torch.testing.assert_close(x[:, 3, 3], torch.tensor(want), atol=1e-6, rtol=0)


def _pipe(size, mean, channels):
    """The input pipeline of a model that takes ``size`` x ``size`` images, mean = std = ``mean``."""
    from surgery.preprocess import InputPipeline, resize_for

    return InputPipeline((size, size), resize_for(size), channels, tuple(mean), tuple(mean), "bilinear")


def test_loaders_yield_batches_with_the_right_shapes_and_labels(digits):
    s = discover(digits)
    kw = dict(batch_size=5, seed=7, flip=False)
    pipe = _pipe(28, [0.5, 0.5, 0.5], 3)
    train_dl, val_dl = make_loaders(s, pipe, **kw)
    x, y = next(iter(train_dl))
    assert x.shape == (5, 3, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert -1.0 - 1e-5 <= float(x.min()) and float(x.max()) <= 1.0 + 1e-5
    assert not train_dl.pin_memory  # no CUDA device asked for
    xv, yv = next(iter(val_dl))
    assert xv.shape == (5, 3, 28, 28) and yv.tolist() == [lab for _, lab in s.val[:5]]
    assert sum(len(b[1]) for b in val_dl) == len(s.val)
    # 24 train images in batches of 5: the last batch has 4, nothing dropped
    assert [len(b[1]) for b in train_dl] == [5, 5, 5, 5, 4]
    # the same seed gives the same order; another seed another
    order = lambda dl: list(dl.sampler)  # noqa: E731
    assert order(make_loaders(s, pipe, **kw)[0]) == order(make_loaders(s, pipe, **kw)[0])
    assert order(make_loaders(s, pipe, **{**kw, "seed": 8})[0]) != order(make_loaders(s, pipe, **kw)[0])
    # a lone last image is dropped: BatchNorm cannot train on a batch of one
    assert make_loaders(s, pipe, **{**kw, "batch_size": 23})[0].drop_last


def test_loader_with_a_worker_process(digits):
    s = discover(digits)
    train_dl, _ = make_loaders(s, _pipe(16, [0.5], 1), batch_size=24, num_workers=1)
    assert train_dl.persistent_workers
    x, y = next(iter(train_dl))
    assert x.shape == (24, 1, 16, 16) and sorted(y.tolist()) == sorted(lab for _, lab in s.train)


def test_distributed_loaders(digits, tmp_path):
    import torch.distributed as dist
    from torch.utils.data.distributed import DistributedSampler

    s = discover(digits)
    kw = dict(batch_size=4, distributed=True)
    pipe = _pipe(16, [0.5], 3)
    if not dist.is_initialized():
        with pytest.raises(DataError, match=r"needs torch.distributed initialised"):
            make_loaders(s, pipe, **kw)
        dist.init_process_group("gloo", init_method=(tmp_path / "store").as_uri(), rank=0, world_size=1)
        try:
            train_dl, val_dl = make_loaders(s, pipe, **kw)
        finally:
            dist.destroy_process_group()
        assert isinstance(train_dl.sampler, DistributedSampler) and isinstance(val_dl.sampler, ShardSampler)
    assert list(ShardSampler(7, 1, 3)) == [1, 4] and len(ShardSampler(7, 0, 3)) == 3


def test_bad_loader_arguments(digits):
    s = discover(digits)
    with pytest.raises(DataError, match=r"--batch-size must be a positive integer"):
        make_loaders(s, _pipe(16, [0.5], 3), batch_size=0)
    with pytest.raises(DataError, match=r"no training images"):
        make_loaders(Samples(["a"], [], [], "csv"), _pipe(16, [0.5], 3), batch_size=2)


# ---------------------------------------------------------------- plots


def assert_png(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        return im.size


def test_confusion_matrix_and_per_class_accuracy():
    m = confusion_matrix([0, 1, 1, 2, 0], [0, 1, 2, 2, 1], 4)
    assert m == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    assert per_class_accuracy(m) == [1.0, 0.5, 0.5, None]
    assert confusion_matrix(torch.tensor([0, 1, 1, 2, 0]), torch.tensor([0, 1, 2, 2, 1]), 4) == m
    with pytest.raises(ValueError, match="outside 0..3"):
        confusion_matrix([4], [0], 4)
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        confusion_matrix([0, 1], [0], 4)


@pytest.mark.real_plots
def test_plots_write_png_files(tmp_path):
    metrics = [
        {"epoch": 1, "train_loss": 2.1, "val_loss": 1.9, "train_acc": 0.3, "val_acc": 0.35},
        {"epoch": 2, "train_loss": 1.2, "val_loss": None, "train_acc": 0.6, "val_acc": None},
        {"epoch": 3, "train_loss": 0.7, "val_loss": 0.8, "train_acc": 0.8, "val_acc": 0.78},
        {"epoch": 4, "train_loss": 0.4, "val_loss": 0.5, "train_acc": 0.9, "val_acc": 0.86},
    ]
    curves = plot_curves(metrics, tmp_path / "curves.png", unfreeze_epochs=[3])
    assert curves == tmp_path / "curves.png"
    w, h = assert_png(curves)
    assert w > h > 100
    assert_png(plot_curves([], tmp_path / "empty.png"))
    classes = ["cat", "dog", "fox"]
    m = confusion_matrix([0, 1, 2, 2, 1, 0], [0, 1, 2, 1, 1, 2], 3)
    assert_png(plot_confusion(m, classes, tmp_path / "confusion.png"))
    assert_png(plot_confusion([[0] * 40 for _ in range(40)], [f"c{i}" for i in range(40)], tmp_path / "big.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.png", "confusion.png", "curves.png", "empty.png"]
    with pytest.raises(ValueError, match="3x3"):
        plot_confusion([[1, 2]], classes, tmp_path / "bad.png")
