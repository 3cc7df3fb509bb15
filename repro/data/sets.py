"""Which images a run reads: the data set root, the training and validation sets, label files.

Layouts (`DataConfig.source`):
- 'folders' / 'digits': root/train/<class>/... and root/val/<class>/...; class order is the
  sorted folder names. 'digits' first writes scikit-learn's digits there when root/train is
  missing (repro.data.convert.write_digits).
- 'imagenet': root/train/<class>/... and, when `val_labels` is set, ImageNet's flat root/val/*
  with a label file in one of two formats:
    one integer per line, for the images in sorted file-name order, 1-based. The official
    ILSVRC2012_validation_ground_truth.txt holds ILSVRC2012 ids, which are not the sorted
    wnid order: when the devkit's meta.mat lies beside the file (or in root) the ids are
    mapped to wnids through it; without it, class folders named like wnids are an error,
    other class folders take id i as the i-th sorted class.
    or `file_name class_name` per line (class_name a training class folder).
  With `val_labels` empty, root/val/<class>/* as for 'folders' (a prepared ImageNet).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import numpy as np

from repro.config import DataConfig
from repro.data import imagecheck
from repro.data.folders import DataError, ImageSet, endings, images_in
from repro.data.index import Index, load_index, on_main
from repro.net.dist import Layout

_WNID = re.compile(r"^n\d{8}$")


def root_of(cfg: DataConfig, layout: Layout | None = None) -> Path:
    """The data set folder; for 'digits', written first if missing (by rank 0 alone)."""
    if not cfg.root:
        raise DataError(
            f"data.root is empty: set it to the data set folder (source {cfg.source!r})"
        )
    root = Path(cfg.root)
    if root.exists() and not root.is_dir():  # before 'digits' would try to write into it
        raise DataError(f"data.root {root} is a file, not a folder: set data.root to a folder")
    if cfg.source == "digits":
        on_main(layout, lambda: _write_digits(cfg, root))  # the other ranks wait for it
    if not root.is_dir():
        raise DataError(f"data.root {root} does not exist: {_how_to_make(cfg.source, root)}")
    return root


# A data root named like a set prepare_data converts -> (what it is made from, the command).
_CONVERTED = (
    ("cifar100", "the extracted cifar-100-python/", "cifar100 cifar-100-python"),
    ("cifar10", "the extracted cifar-10-batches-py/", "cifar10 cifar-10-batches-py"),
    ("fashion", "a folder of Fashion-MNIST's four idx files", "fashion-mnist FOLDER"),
    ("digits", "scikit-learn (no download)", "digits"),
)


def _how_to_make(source: str, root: Path) -> str:
    """How to make a missing data root, as the rest of its error line (README "Tools")."""
    if source == "imagenet":
        return (
            "set data.root=FOLDER, the folder holding ImageNet's train/<wnid>/*.JPEG and its "
            "flat val/*.JPEG (ILSVRC2012's tarballs, extracted)"
        )
    name = root.name.lower()
    made_from, command = next(
        ((what, cmd) for key, what, cmd in _CONVERTED if key in name),
        ("class folders PHOTOS/<class>/*.jpg (e.g. flower_photos/)", "split PHOTOS"),
    )
    return (
        f"make it from {made_from} with `python launch/prepare_data.py {command} {root}`, "
        "or set data.root=FOLDER"
    )


def _write_digits(cfg: DataConfig, root: Path) -> None:
    from repro.data.prepare import PrepareError, output_problem

    digits = not (root / "train").is_dir()
    stats = not cfg.stats and not (root / "stats.npz").is_file()
    problem = output_problem(root, beside=digits) if digits or stats else None
    if problem is not None:  # before the work: a raw OSError would blame the run folder
        raise DataError(
            f"data.root {root} {problem}: data.source=digits writes scikit-learn's digits and "
            "their statistics there when missing; set data.root to a folder you can write to"
        )
    if digits:
        from repro.data.convert import write_digits  # here: only this source writes

        try:
            write_digits(root, val_fraction=cfg.val_fraction, seed=0)
        except PrepareError:  # it says "pass --overwrite", an option of prepare_data only
            raise DataError(
                f"data.source=digits writes scikit-learn's digits into data.root, but {root} "
                "already holds other files: set data.root to a new folder, or replace them "
                f"with `python launch/prepare_data.py digits {root} --overwrite`"
            ) from None
    if stats:
        # The demo set's own mean and PCA (§3: from the training set's pixels); 1.4k tiny
        # images take about a second, so the demo needs no separate preparation step.
        from repro.data.stats import compute_stats

        compute_stats(root, resize=cfg.resize, progress=False)


def _usable(index: Index, root: Path, labels: np.ndarray, class_names: list[str]) -> ImageSet:
    """The index's readable images; a class left with none is an error naming it."""
    keep = np.ones(len(index.paths), bool)
    keep[list(index.reasons)] = False
    folder = Path(index.folder)
    if index.classes is not None:
        left = np.bincount(index.labels[keep], minlength=len(index.classes))
        empty = [c for c, n in zip(index.classes, left) if n == 0]
        if empty:
            raise DataError("; ".join(_why_empty(index, folder, c) for c in empty[:5]))
    if not keep.any():
        raise DataError(f"no readable images left in {folder}")
    paths = [str(folder / p) for p, k in zip(index.paths, keep) if k]
    return ImageSet(root, paths, labels[keep], class_names, index.sizes[keep])


def _why_empty(index: Index, folder: Path, name: str) -> str:
    label = index.classes.index(name)
    kinds = Counter(
        imagecheck.category(r) for i, r in index.reasons.items() if index.labels[i] == label
    )
    if not kinds:
        return (
            f"class folder {folder / name} holds no images (files ending in {endings()}, any case)"
        )
    counts = ", ".join(f"{k} {n}" for k, n in kinds.most_common())
    return (
        f"class folder {folder / name} holds no usable image: its {kinds.total()} image "
        f"file(s) are all skipped ({counts}); fix or remove them, or remove the class folder"
    )


def train_set(cfg: DataConfig, layout: Layout | None = None) -> ImageSet:
    """The training images of root/train/<class>/** (recursively), bad files skipped."""
    root = root_of(cfg, layout)
    index = load_index(root / "train", root, False, cfg.max_pixels, layout)
    return _usable(index, root, index.labels, index.classes)


def val_set(cfg: DataConfig, class_names: list[str], layout: Layout | None = None) -> ImageSet:
    """The validation images, labelled with the training classes' indices."""
    root = root_of(cfg, layout)
    val = root / "val"
    if cfg.val_labels:
        if not val.is_dir():
            raise DataError(f"validation folder {val} does not exist")
        index = load_index(val, root, True, cfg.max_pixels, layout)
        paths = [str(val / p) for p in index.paths]
        labels = _read_val_labels(cfg.val_labels, root, paths, class_names)
        return _usable(index, root, labels, class_names)
    if not val.is_dir():
        raise DataError(
            f"validation folder {val} does not exist: expected {val}/<class>/*.jpg, or a "
            "flat folder of images with data.val_labels set"
        )
    subdirs = [e for e in os.scandir(val) if e.is_dir() and not e.name.startswith(".")]
    if not subdirs and images_in(str(val)):
        raise DataError(f"{val} is a flat folder of images: set data.val_labels to its label file")
    index = load_index(val, root, False, cfg.max_pixels, layout)
    position = {name: i for i, name in enumerate(class_names)}
    unknown = [c for c in index.classes if c not in position]
    if unknown:
        raise DataError(
            f"validation class folder(s) {unknown[:5]} in {val} are not training classes "
            f"(training has {len(class_names)}: {class_names[:5]}...)"
        )
    labels = np.asarray([position[c] for c in index.classes], np.int64)[index.labels]
    return _usable(index, root, labels, class_names)


def _read_val_labels(
    label_file: str, root: Path, paths: list[str], class_names: list[str]
) -> np.ndarray:
    """Labels of the flat validation images from a label file (formats: module docstring)."""
    path = Path(label_file)
    if not path.is_file() and not path.is_absolute() and (root / path).is_file():
        path = root / path
    if not path.is_file():
        raise DataError(f"data.val_labels {label_file} not found (also tried {root / label_file})")
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    index = {name: i for i, name in enumerate(class_names)}
    if all(ln.isdigit() for ln in lines):
        if len(lines) != len(paths):
            raise DataError(
                f"{path} has {len(lines)} labels but {root / 'val'} holds {len(paths)} images: "
                "one label per image, in sorted file-name order"
            )
        ids = np.asarray([int(ln) for ln in lines], np.int64)
        wnid_of = _devkit_wnids(path, root)
        if wnid_of is not None:
            missing = sorted({wnid_of.get(i, f"id {i}") for i in ids} - index.keys())
            if missing:
                raise DataError(f"{path}: classes {missing[:5]} are not training classes")
            return np.asarray([index[wnid_of[i]] for i in ids], np.int64)
        if all(_WNID.match(c) for c in class_names):
            raise DataError(
                f"{path} holds integer labels and the classes are wnids: ILSVRC2012 ids do not "
                "follow sorted wnid order, so put the devkit's meta.mat beside the label file "
                f"or in {root}, or write the labels as 'file_name wnid' lines"
            )
        if ids.min() < 1 or ids.max() > len(class_names):
            raise DataError(
                f"{path}: labels must be 1..{len(class_names)} (1-based), got {ids.min()}..{ids.max()}"
            )
        return ids - 1
    by_name = {}
    for number, ln in enumerate(lines, 1):
        parts = ln.split(maxsplit=1)
        if len(parts) != 2 or parts[1] not in index:
            raise DataError(
                f"{path} line {number}: expected 'file_name class_name' with a training class "
                f"(e.g. {class_names[0]!r}) or one integer label per line, got {ln!r}"
            )
        by_name[parts[0]] = index[parts[1]]
    names = [os.path.basename(p) for p in paths]
    missing = [n for n in names if n not in by_name]
    if missing or len(by_name) != len(names):
        raise DataError(
            f"{path} labels {len(by_name)} files but {root / 'val'} holds {len(names)} images; "
            f"unlabelled: {missing[:5]}"
        )
    return np.asarray([by_name[n] for n in names], np.int64)


def _devkit_wnids(label_file: Path, root: Path) -> dict[int, str] | None:
    """ILSVRC2012 id -> wnid from the devkit's meta.mat, if one lies beside the labels or in root."""
    for meta in (label_file.parent / "meta.mat", root / "meta.mat"):
        if meta.is_file():
            from scipy.io import loadmat  # scipy comes with scikit-learn

            synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
            return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    return None
