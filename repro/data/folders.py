"""The class-folder layout on disk: which files are images of which class, and DataError.

root/<class>/...: classes are the sorted folder names (hidden ones ignored); a class's images
are the files under its folder, recursively (as torchvision's ImageFolder), whose name ends
in one of repro.data.imagecheck.IMAGE_EXTENSIONS. Training, `check` and the statistics read
the same files. Used by the loaders, the index and the statistics, so none needs the others.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from repro.data import imagecheck


class DataError(ValueError):
    """The data set on disk does not fit the configured layout; the message says where."""


class DecodeError(RuntimeError):
    """DALI could not decode a file of a batch; the message names it."""


@dataclass(frozen=True)
class ImageSet:
    """Image files with their class indices, in a fixed order."""

    root: Path
    paths: list[str]
    labels: np.ndarray  # (n,) int64
    class_names: list[str]
    sizes: np.ndarray | None = None  # (n, 2) (height, width) from the headers, if known


def endings() -> str:
    return ", ".join(imagecheck.IMAGE_EXTENSIONS)


def images_in(folder: str) -> list[str]:
    """The image files directly in `folder` (not below it), sorted: a flat folder."""
    with os.scandir(folder) as it:
        names = sorted(e.name for e in it if e.is_file() and imagecheck.is_image_name(e.name))
    return [os.path.join(folder, n) for n in names]


def class_folders(folder: str | Path) -> list[str]:
    """The sorted names of the class folders in `folder` (hidden ones ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist: expected class folders {folder}/<class>/*.jpg")
    with os.scandir(folder) as it:
        classes = sorted(e.name for e in it if e.is_dir() and e.name[0] != ".")
    if not classes:
        raise DataError(f"{folder} holds no class folders (expected {folder}/<class>/*.jpg)")
    return classes


def scan_class_folders(folder: str | Path) -> tuple[list[str], np.ndarray, list[str]]:
    """(paths, labels, class_names) of folder/<class>/**, unscreened; classes are sorted names."""
    folder = Path(folder)
    classes = class_folders(folder)
    paths, labels = [], []
    for index, name in enumerate(classes):
        files = imagecheck.list_image_files(folder / name)
        if not files:
            raise DataError(
                f"class folder {folder / name} holds no images (files ending in {endings()}, "
                "any case)"
            )
        paths += files
        labels += [index] * len(files)
    return paths, np.asarray(labels, np.int64), classes
