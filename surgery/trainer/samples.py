"""Where the images of ``surgery train`` are: the data layouts, resolved into samples.

Three layouts are understood, resolved by :func:`discover` into :class:`Samples` (lists of
``(path, label)``) before any image is decoded:

- ``imagefolder``: ``DATA/train/<class>/*`` and ``DATA/val/<class>/*`` (``valid/`` and
  ``validation/`` are accepted for ``val/``), the same class folders on both sides;
- ``split``: one folder of class folders (``DATA/<class>/*``, or ``DATA/train/`` with no
  ``val/``), split by ``val_split``, stratified and seeded;
- ``csv``: a ``.csv`` of ``path,label[,split]``, paths relative to the CSV's folder or absolute,
  header optional; without a ``split`` column ``val_split`` applies as above.

Class names are the sorted folder names or unique CSV labels; when every name is an integer they
sort numerically (``2`` before ``10``). The label of a sample is the index of its class there.

    >>> samples = discover("data/", val_split=0.2, seed=0)
    >>> check_num_classes(samples, manifest.num_classes)

Every problem with the user's data raises :class:`DataError` with a one-line message that names
the folder, file or CSV line and says what to do.
"""

from __future__ import annotations

import csv as _csv
import io
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import DataError

#: File name endings taken as images (case-insensitive); other files are ignored.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
VAL_DIR_NAMES = ("val", "valid", "validation")
_PATH_COLUMNS = ("path", "file", "filename", "filepath", "image", "img")
_LABEL_COLUMNS = ("label", "class", "target", "category")
_SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val"}
_INT = re.compile(r"^[+-]?\d+$")


def few(items: Sequence[Any], limit: int = 8) -> str:
    """``a, b, c and 5 more``: a list short enough for a one-line message."""
    items = [str(i) for i in items]
    if len(items) <= limit:
        return ", ".join(items)
    return f"{', '.join(items[:limit])} and {len(items) - limit} more"


def sort_classes(names: Iterable[str]) -> list[str]:
    """Sorted class names; numerically when every name is an integer (``['2', '10']``)."""
    names = sorted(set(names))
    if names and all(_INT.match(n.strip()) for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return names


# ---------------------------------------------------------------- discovery


@dataclass
class Samples:
    """A resolved dataset: class names and ``(path, label)`` lists, nothing decoded yet.

    ``source`` says how it was found: ``'imagefolder'`` (train/ and val/), ``'split'`` (one folder
    split by ``val_split``) or ``'csv'``. ``root`` is the DATA argument, for messages.
    """

    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    source: str
    root: str = ""

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each split: ``{'train': {'cat': 40, ...}, 'val': {...}}``."""
        out: dict[str, dict[str, int]] = {}
        for split, items in (("train", self.train), ("val", self.val)):
            n = [0] * len(self.classes)
            for _, label in items:
                n[label] += 1
            out[split] = dict(zip(self.classes, n))
        return out


def discover(data: str | os.PathLike, *, val_split: float | None = None, seed: int = 0) -> Samples:
    """Resolve DATA into :class:`Samples` without decoding an image.

    ``val_split`` (a fraction in (0, 1)) is for a single folder of class folders or a CSV without
    a ``split`` column; giving it where the validation set is already named is an error, not a
    silent choice. The split is stratified (each class split on its own, so every class with at
    least two images is in both) and depends only on ``seed`` and the class's own files.
    """
    root = Path(data).expanduser()
    if val_split is not None:
        if isinstance(val_split, bool) or not isinstance(val_split, (int, float)) or not 0 < val_split < 1:
            raise DataError(f"--val-split must be a fraction between 0 and 1 (exclusive), e.g. 0.2; got {val_split!r}")
    if not root.exists():
        raise DataError(
            f"{root}: no such folder or file; --data takes an ImageFolder root (train/ and val/ with a "
            f"folder per class, or just a folder per class) or a CSV of path,label")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DataError(f"{root}: is a file but not a .csv; --data takes a folder of class folders or a CSV of path,label")
        return _discover_csv(root, val_split, seed)
    if not root.is_dir():
        raise DataError(f"{root}: is neither a folder nor a .csv file")

    train_dir = root / "train"
    val_dir = next((root / n for n in VAL_DIR_NAMES if (root / n).is_dir()), None)
    if train_dir.is_dir() and val_dir is not None:
        if val_split is not None:
            raise DataError(
                f"{root}: already has train/ and {val_dir.name}/, so --val-split {val_split} has nothing to "
                f"split; drop --val-split, or point --data at a single folder of class folders")
        return _discover_imagefolder(root, train_dir, val_dir)
    if val_dir is not None:
        raise DataError(f"{root}: has {val_dir.name}/ but no train/; add train/<class>/ folders beside it")

    folder = train_dir if train_dir.is_dir() else root
    per_class = _class_folders(folder)
    _refuse_empty(folder, list(per_class.items()))
    if val_split is None:
        if folder is train_dir:
            where, layout = f"{root}: has train/ but no val/", "add val/<class>/ folders beside train/"
        else:
            where, layout = f"{root}: is one folder of class folders", "arrange it as train/<class>/ and val/<class>/"
        raise DataError(f"{where}; pass --val-split (e.g. 0.2) to hold out a stratified validation set, or {layout}")
    classes = sort_classes(per_class)
    train_items, val_items = _stratified_split({c: [str(p) for p in per_class[c]] for c in classes},
                                               classes, val_split, seed)
    return Samples(classes=classes, train=train_items, val=val_items, source="split", root=str(root))


def _discover_imagefolder(root: Path, train_dir: Path, val_dir: Path) -> Samples:
    """``train/<class>/`` and ``val/<class>/``: the same class folders on both sides, none empty."""
    train = _class_folders(train_dir)
    val = _class_folders(val_dir)
    only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
    if only_train or only_val:
        parts = []
        if only_train:
            parts.append(f"only in train/: {few(only_train)}")
        if only_val:
            parts.append(f"only in {val_dir.name}/: {few(only_val)}")
        raise DataError(
            f"{root}: train/ and {val_dir.name}/ have different class folders ({'; '.join(parts)}); "
            f"give both the same class folders")
    _refuse_empty(root, [(f"train/{c}", v) for c, v in train.items()]
                  + [(f"{val_dir.name}/{c}", v) for c, v in val.items()])
    classes = sort_classes(train)
    index = {c: i for i, c in enumerate(classes)}
    return Samples(
        classes=classes,
        train=[(str(p), index[c]) for c in classes for p in train[c]],
        val=[(str(p), index[c]) for c in classes for p in val[c]],
        source="imagefolder", root=str(root))


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    """``{class: sorted image paths}`` for each non-hidden subfolder (searched recursively)."""
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        loose = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS]
        hint = (f" (it holds {len(loose)} images directly; move each class's images into its own subfolder)"
                if loose else "")
        raise DataError(f"{folder}: no class folders found{hint}; expected {folder}/<class>/<image>")
    return {d.name: images_under(d) for d in subdirs}


def images_under(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath, f) for f in filenames
                     if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMG_EXTENSIONS)
    return sorted(found)


def _refuse_empty(root: Path, classes: list[tuple[str, list[Path]]]) -> None:
    empty = [name for name, paths in classes if not paths]
    if empty:
        raise DataError(
            f"{root}: class folder{'s' if len(empty) > 1 else ''} with no images: {few(empty)}; add images "
            f"({' '.join(IMG_EXTENSIONS)}) or remove the folder")


def _stratified_split(per_class: dict[str, list[str]], classes: list[str], frac: float,
                      seed: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Each class shuffled on its own by a generator seeded with (seed, class name), so adding a
    class or a file elsewhere does not move anyone else. A class of one image stays in train."""
    train: list[tuple[str, int]] = []
    val: list[tuple[str, int]] = []
    for label, c in enumerate(classes):
        paths = sorted(per_class[c])
        random.Random(f"surgery.split:{seed}:{c}").shuffle(paths)  # str seeds hash with sha512: stable
        n = len(paths)
        n_val = 0 if n < 2 else min(n - 1, max(1, round(n * frac)))
        val.extend((p, label) for p in sorted(paths[:n_val]))
        train.extend((p, label) for p in sorted(paths[n_val:]))
    return train, val


@dataclass
class _CsvTable:
    """A CSV's rows ``(line, path, label, split)`` and its problems ``(line, message)``."""

    rows: list[tuple[int, str, str, str | None]]
    problems: list[tuple[int, str]]
    split_col: int | None
    first_data_line: int | None


def _read_csv(path: Path) -> _CsvTable:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the CSV as UTF-8") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    reader = _csv.reader(io.StringIO(text, newline=""))
    table = _CsvTable([], [], None, None)
    cols: tuple[int, int, int | None] = (0, 1, None)  # path, label, split
    header_seen = False
    try:
        for fields in reader:
            line = reader.line_num
            fields = [f.strip() for f in fields]
            if not any(fields) or fields[0].startswith("#"):
                continue
            if not header_seen:
                header_seen = True
                lower = [f.lower() for f in fields]
                p = next((lower.index(n) for n in _PATH_COLUMNS if n in lower), None)
                lab = next((lower.index(n) for n in _LABEL_COLUMNS if n in lower), None)
                if p is not None and lab is not None:
                    cols = (p, lab, lower.index("split") if "split" in lower else None)
                    continue
                cols = (0, 1, 2 if len(fields) >= 3 else None)
            if table.first_data_line is None:
                table.first_data_line = line
            row = _csv_row(fields, line, cols)
            if isinstance(row, str):
                table.problems.append((line, row))
            else:
                table.rows.append(row)
    except _csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: malformed CSV: {e}") from None
    table.split_col = cols[2]
    return table


def _csv_row(fields: list[str], line: int, cols: tuple[int, int, int | None]) -> tuple | str:
    """``(line, path, label, split)``, or what is wrong with the line."""
    path_col, label_col, split_col = cols
    need = max(c for c in cols if c is not None) + 1
    if len(fields) < need:
        names = "path,label,split" if split_col is not None else "path,label"
        return f"line {line}: expected {need} fields ({names}), got {len(fields)}"
    file, label = fields[path_col], fields[label_col]
    split = fields[split_col] if split_col is not None else None
    if not file:
        return f"line {line}: empty path"
    if not label:
        return f"line {line}: empty label for {file}"
    if split is not None and split.lower() not in _SPLITS:
        return f"line {line}: split {split!r} is not train or val"
    return (line, file, label, _SPLITS[split.lower()] if split is not None else None)


def _resolve_csv(path: Path, table: _CsvTable) -> list[tuple[str, str, str | None]]:
    """``(absolute path, label, split)`` per row; every problem of the CSV raised at once."""
    base = path.parent
    resolved: list[tuple[str, str, str | None]] = []
    problems = list(table.problems)
    relative_missing = False
    for line, file, label, split in table.rows:
        p = Path(file).expanduser()
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            hint = ""
            if line == table.first_data_line and table.split_col is None:
                hint = (" (if this line is a header, name its columns path,label[,split]: "
                        f"{'/'.join(_PATH_COLUMNS)} and {'/'.join(_LABEL_COLUMNS)} are recognised)")
            problems.append((line, f"line {line}: {file}: no such file{hint}"))
            relative_missing = relative_missing or not Path(file).expanduser().is_absolute()
            continue
        resolved.append((str(p), label, split))
    if problems:
        msgs = [msg for _, msg in sorted(problems)]
        more = f"; and {len(msgs) - 10} more" if len(msgs) > 10 else ""
        where = f" (relative paths are read from {base}, the CSV's folder)" if relative_missing else ""
        raise DataError(f"{path}: {len(msgs)} problem{'s' if len(msgs) > 1 else ''}: {'; '.join(msgs[:10])}{more}{where}")
    if not resolved:
        raise DataError(f"{path}: no rows; expected lines of path,label (an optional header path,label[,split])")
    return resolved


def _discover_csv(path: Path, val_split: float | None, seed: int) -> Samples:
    table = _read_csv(path)
    resolved = _resolve_csv(path, table)
    classes = sort_classes(label for _, label, _ in resolved)
    index = {c: i for i, c in enumerate(classes)}
    if table.split_col is not None:
        if val_split is not None:
            raise DataError(f"{path}: has a split column, so --val-split {val_split} has nothing to split; drop --val-split")
        train = [(p, index[lab]) for p, lab, s in resolved if s == "train"]
        val = [(p, index[lab]) for p, lab, s in resolved if s == "val"]
        if not val:
            raise DataError(f"{path}: the split column marks no row as val; mark some rows val, or drop the column and pass --val-split")
        no_train = [c for c in classes if not any(classes[lab] == c for _, lab in train)]
        if no_train:
            raise DataError(f"{path}: class{'es' if len(no_train) > 1 else ''} with no train rows: {few(no_train)}; "
                            f"every class needs training images")
        return Samples(classes=classes, train=train, val=val, source="csv", root=str(path))
    if val_split is None:
        raise DataError(f"{path}: has no split column; pass --val-split (e.g. 0.2) to hold out a stratified "
                        f"validation set, or add a split column of train/val")
    per_class: dict[str, list[str]] = {c: [] for c in classes}
    for p, lab, _ in resolved:
        per_class[lab].append(p)
    train, val = _stratified_split(per_class, classes, val_split, seed)
    return Samples(classes=classes, train=train, val=val, source="csv", root=str(path))


def check_num_classes(samples: Samples, num_classes: int) -> None:
    """Refuse data whose class count is not the model head's ``num_classes`` (from the manifest)."""
    n = len(samples.classes)
    if n != num_classes:
        raise DataError(
            f"{samples.root or 'the data'}: found {n} class{'es' if n != 1 else ''} ({few(samples.classes, 12)}) but "
            f"the adapted model's head has {num_classes} outputs (manifest num_classes={num_classes}); re-run "
            f"surgery adapt with --num-classes {n}, or point --data at a dataset with {num_classes} classes")
