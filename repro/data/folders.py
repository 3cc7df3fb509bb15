"""The class-folder layout on disk: which files are images of which class, and DataError.

root/<class>/<image>: classes are the sorted folder names (hidden ones ignored), images the
files whose extension repro.data.imagecheck accepts. Used by the loaders and the statistics,
so neither needs the other.
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


def images_in(folder: str) -> list[str]:
    with os.scandir(folder) as it:
        names = sorted(e.name for e in it if e.is_file() and imagecheck.is_image_name(e.name))
    return [os.path.join(folder, n) for n in names]


def class_folders(folder: str | Path) -> list[str]:
    """The sorted names of the class folders in `folder` (hidden ones ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(
            f"{folder} does not exist: expected class folders {folder}/<class>/*.jpg|jpeg|png"
        )
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and e.name[0] != ".")
    if not classes:
        raise DataError(f"{folder} holds no class folders (expected {folder}/<class>/*.jpg)")
    return classes


def scan_class_folders(folder: str | Path) -> tuple[list[str], np.ndarray, list[str]]:
    """(paths, labels, class_names) of folder/<class>/*; classes are the sorted folder names."""
    folder = Path(folder)
    classes = class_folders(folder)
    paths, labels = [], []
    for index, name in enumerate(classes):
        files = images_in(str(folder / name))
        if not files:
            raise DataError(
                f"class folder {folder / name} holds no images "
                f"(files ending in {', '.join(imagecheck.IMAGE_EXTENSIONS)}, any case)"
            )
        paths += files
        labels += [index] * len(files)
    return paths, np.asarray(labels, np.int64), classes
