"""The start-up index of a split folder: its image files, classes and sizes, screened once.

At start-up every rank needs the same list of readable images. Screening reads every file's
first and last bytes and its header (repro/data/imagecheck.py `inspect`): 1.28M files for
ImageNet, on what is often a shared file system. So:

- rank 0 alone walks the folder and screens it; the other ranks receive the index from it
  (`torch.distributed.broadcast_object_list`) instead of repeating the walk;
- the result is cached beside the data, `<root>/.repro-index-<split>.json.gz` (or under
  ~/.cache/repro when the data folder is read-only), and reused while it is valid. It is
  valid while every folder it walked has the modification time it had then (adding,
  removing or renaming a file changes its folder's time), `bad_files.txt` is unchanged and
  the screen's settings (extensions, pixel limit) are the same. A file rewritten in place
  under the same name is not noticed: run `prepare_data.py check`, or delete the cache. An
  index of a folder changed in the last 20 ms is not cached (its time could hide a change).

Layouts: class folders (`root/train/<class>/...`, walked recursively, as torchvision's
ImageFolder does, hidden entries ignored) or a flat folder (ImageNet's validation images).
A failure on rank 0 (a missing folder) reaches every rank as the same DataError.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch.distributed as dist

from repro.data import imagecheck
from repro.data.folders import DataError, class_folders
from repro.net.dist import Layout

INDEX_VERSION = 1
_TICK_NS = 20_000_000  # 20 ms: coarser than the file-time granularity of local file systems
T = TypeVar("T")


@dataclass
class Index:
    """Every image-named file of a split, in order, with its class, size and skip reason."""

    folder: str
    classes: list[str] | None  # None: a flat folder
    paths: list[str]  # relative to folder
    labels: np.ndarray  # (n,) int64 class index, -1 in a flat folder
    sizes: np.ndarray  # (n, 2) int64 (height, width) from the header, (0, 0) if unreadable
    reasons: dict[int, str] = field(default_factory=dict)  # position -> why it is skipped
    others: dict[str, int] = field(default_factory=dict)  # other files, by ending


def on_main(layout: Layout | None, fn: Callable[[], T]) -> T:
    """fn() run by rank 0 alone, its result (or its DataError) handed to every rank."""
    if layout is None or not layout.distributed:
        return fn()
    box: list = [None]
    if layout.is_main:
        try:
            box[0] = ("ok", fn())
        except (DataError, OSError) as err:
            box[0] = ("error", f"{err}")
    device = layout.device if layout.device.type == "cuda" else None
    dist.broadcast_object_list(box, src=0, device=device)
    kind, value = box[0]
    if kind == "error":
        raise DataError(value)
    return value


def load_index(
    folder: Path, root: Path, flat: bool, max_pixels: int, layout: Layout | None = None
) -> Index:
    """The index of `folder` (a split of the data set at `root`), from the cache or built."""

    def main() -> Index:
        if not folder.is_dir():
            raise DataError(f"{folder} does not exist: expected {folder}/<class>/*.jpg")
        key = _key(folder, root, flat, max_pixels)
        cached = _read_cache(folder, root, key)
        if cached is not None:
            return cached
        now = time.time_ns()
        walked = _walk_times(folder, flat)  # times first: a change during the scan shows later
        index = _build(folder, root, flat, max_pixels)
        # A folder changed within a clock tick of the walk could change again unseen (its
        # time would not move): such an index is used but not cached ("racy", as git says).
        if max(walked.values()) < now - _TICK_NS:
            _write_cache(folder, root, index, {**key, "dirs": walked})
        return index

    index = on_main(layout, main)
    if layout is None or layout.is_main:
        skipped = [(os.path.join(folder, index.paths[i]), r) for i, r in index.reasons.items()]
        imagecheck.warn_skipped(skipped, str(folder), Counter(index.others))
    return index


def _build(folder: Path, root: Path, flat: bool, max_pixels: int) -> Index:
    """Walk and screen: every image-named file, its class, header size and skip reason."""
    classes = None if flat else class_folders(folder)
    paths, labels, others = [], [], Counter()
    if flat:
        with os.scandir(folder) as it:
            names = sorted(e.name for e in it if e.is_file() and not e.name.startswith("."))
        paths = [n for n in names if imagecheck.is_image_name(n)]
        others.update(os.path.splitext(n)[1].lower() or "(no ending)" for n in names
                      if not imagecheck.is_image_name(n))  # fmt: skip
        labels = [-1] * len(paths)
    else:
        for label, name in enumerate(classes):
            found, other = imagecheck.walk(folder / name)
            paths += [os.path.relpath(p, folder) for p in found]
            labels += [label] * len(found)
            others.update(other)
    listed = imagecheck.read_bad_files(root)
    full = [str(folder / p) for p in paths]
    progress = len(paths) > 20000

    def screen(path: str) -> tuple[str | None, tuple[int, int]]:
        reason = listed.get(os.path.normpath(path))
        return (reason, (0, 0)) if reason else imagecheck.inspect(path, max_pixels)

    results = list(imagecheck.map_threads(screen, full, progress, "screening image headers"))
    return Index(
        folder=str(folder),
        classes=classes,
        paths=paths,
        labels=np.asarray(labels, np.int64),
        sizes=np.asarray([s for _, s in results], np.int64).reshape(-1, 2),
        reasons={i: r for i, (r, _) in enumerate(results) if r is not None},
        others=dict(others),
    )


# -- the cache ----------------------------------------------------------------------------------


def _key(folder: Path, root: Path, flat: bool, max_pixels: int) -> dict:
    listing = root / imagecheck.BAD_FILES_NAME
    try:
        st = listing.stat()
        bad = [st.st_mtime_ns, st.st_size]
    except OSError:
        bad = None
    return {
        "version": INDEX_VERSION,
        "folder": str(folder.resolve()),
        "flat": flat,
        "extensions": list(imagecheck.IMAGE_EXTENSIONS),
        "max_pixels": max_pixels,
        "bad_files": bad,
    }


def _walk_times(folder: Path, flat: bool) -> dict[str, int]:
    """{folder relative path: modification time in ns} of the folder and the folders under it."""
    times = {".": os.stat(folder).st_mtime_ns}
    if not flat:
        for here, dirs, _ in os.walk(folder, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for d in dirs:
                path = os.path.join(here, d)
                times[os.path.relpath(path, folder)] = os.stat(path).st_mtime_ns
    return times


def cache_paths(folder: Path, root: Path) -> list[Path]:
    """Where the index of `folder` is cached: beside the data, else in the user's cache."""
    name = f".repro-index-{folder.name}.json.gz"
    digest = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "repro"
    return [root / name, user / f"index-{digest}.json.gz"]


def _read_cache(folder: Path, root: Path, key: dict) -> Index | None:
    for path in cache_paths(folder, root):
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError, EOFError):
            continue
        if saved.get("key", {}) | {"dirs": None} != key | {"dirs": None}:
            continue
        try:
            fresh = all(
                os.stat(folder / d).st_mtime_ns == t for d, t in saved["key"]["dirs"].items()
            )
        except OSError:  # a folder was removed
            fresh = False
        if fresh:
            return Index(
                folder=str(folder),
                classes=saved["classes"],
                paths=saved["paths"],
                labels=np.asarray(saved["labels"], np.int64),
                sizes=np.asarray(saved["sizes"], np.int64).reshape(-1, 2),
                reasons={int(i): r for i, r in saved["reasons"].items()},
                others=saved["others"],
            )
    return None


def _write_cache(folder: Path, root: Path, index: Index, key: dict) -> None:
    saved = {
        "key": key,
        "classes": index.classes,
        "paths": index.paths,
        "labels": index.labels.tolist(),
        "sizes": index.sizes.tolist(),
        "reasons": {str(i): r for i, r in index.reasons.items()},
        "others": index.others,
    }
    for path in cache_paths(folder, root):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:
                json.dump(saved, f)
            tmp.replace(path)  # atomic: a reader sees the old index or the new one
            return
        except OSError:
            tmp.unlink(missing_ok=True)
    # Neither place is writable: the next start screens again, which is slower but correct.
