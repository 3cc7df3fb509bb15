"""Write data sets that ship as arrays into the class-folder layout training reads.

scikit-learn's handwritten digits (the demo set), Fashion-MNIST's idx files and CIFAR's pickled
batches become image files `dst/train/<class>/NNNNN.<ext>` and `dst/val/<class>/NNNNN.<ext>`,
NNNNN being the image's index in its source split (in the whole set for digits). A tree is
written into a staging folder beside dst, with a marker `.complete.json` recording what it
holds, then renamed into place in one step: an interrupted write never leaves a tree that
later passes for complete, and a second call with the same arguments returns at once.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import json
import os
import pickle
import re
import shutil
import socket
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from repro.data.prepare import (
    SPLITS,
    PrepareError,
    check_fraction,
    require_dir,
    require_output,
    split_class,
)

MARKER = ".complete.json"

FASHION_CLASSES = (
    "T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot",
)  # fmt: skip
IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801  # idx magic: 0, 0, 0x08 (ubyte), ndim

# which -> (folder of the extracted tarball, train files, test files, meta file, label key,
# class-name key); the layout of https://www.cs.toronto.edu/~kriz/cifar.html's python version.
CIFAR = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100": (
        "cifar-100-python",
        ["train"],
        ["test"],
        "meta",
        "fine_labels",
        "fine_label_names",
    ),
}

Item = tuple[str, int, int, np.ndarray]  # (split, label, index, image (H, W) or (H, W, 3) uint8)


# --- the staged, marked tree ------------------------------------------------------------------


def _read_marker(dst: Path) -> dict:
    try:
        return json.loads((dst / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def _disk_counts(dst: Path, classes: Iterable[str]) -> dict[str, tuple[int, int]]:
    def n_files(folder: Path) -> int:
        if not folder.is_dir():
            return -1
        return sum(1 for e in os.scandir(folder) if not e.name.startswith("."))

    return {c: (n_files(dst / "train" / c), n_files(dst / "val" / c)) for c in classes}


def _complete(dst: Path, tool: str, params: dict) -> dict[str, tuple[int, int]] | None:
    """The counts of dst if it is a complete tree of (tool, params): its marker says so and the
    files on disk agree; else None."""
    marker = _read_marker(dst)
    if marker.get("tool") != tool or marker.get("params") != params:
        return None
    counts = {c: (t, v) for c, (t, v) in marker["counts"].items()}
    return counts if _disk_counts(dst, counts) == counts else None


def _existing(
    dst: Path, tool: str, params: dict, overwrite: bool
) -> dict[str, tuple[int, int]] | None:
    """The counts of dst if it is a complete tree of (tool, params); None if it must be
    written. Raises if dst holds anything else, unless overwrite."""
    counts = _complete(dst, tool, params)
    if counts is not None:
        return counts
    marker = _read_marker(dst)
    if marker.get("tool") == tool and marker.get("params") == params:
        problem = "its files no longer match its marker (some were added or removed)"
    elif marker:
        problem = f"it holds {marker.get('tool')} with {marker.get('params')}"
    elif dst.is_dir() and any(dst.iterdir()):
        problem = f"it is not empty and has no {MARKER} marker"
    else:
        problem = None
    if problem is None or overwrite:
        require_output(dst, beside=True)  # written through a staging folder beside it
        return None
    raise PrepareError(
        f"destination {dst} exists and {problem}; asked for {tool} with {params}. "
        "Pass --overwrite to replace it, or choose another folder"
    )


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_staging(dst: Path) -> None:
    """Delete staging folders of dst left by killed processes on this host (a folder of
    another host or of a live process may still be in use)."""
    prefix = f".{dst.name}.partial-{socket.gethostname()}-"
    for entry in dst.parent.iterdir():
        pid = entry.name[len(prefix) :]
        if entry.name.startswith(prefix) and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _swap_in(staging: Path, dst: Path, tool: str, params: dict) -> None:
    """Rename the finished staging folder to dst in one step; an old dst (overwrite was
    checked by the caller) is moved aside first and deleted after."""
    try:
        os.rename(staging, dst)  # POSIX: also replaces an empty folder
        return
    except OSError:
        if not dst.exists():
            raise
    if _complete(dst, tool, params) is not None:  # another process wrote it first
        shutil.rmtree(staging)
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.rename(dst, old)
    try:
        os.rename(staging, dst)
    except OSError:
        os.rename(old, dst)  # put the old tree back rather than leave no tree
        raise
    shutil.rmtree(old)


def _build(
    dst: Path,
    tool: str,
    params: dict,
    classes: Sequence[str],
    items: Iterable[Item],
    total: int,
    save: Callable[[np.ndarray, Path], None],
    suffix: str,
    progress: bool,
) -> dict[str, tuple[int, int]]:
    """Write items as dst/<split>/<class>/<index>.<suffix> through a staging folder."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(dst)
    staging = dst.with_name(f".{dst.name}.partial-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    counts = {c: [0, 0] for c in classes}
    try:
        for split in SPLITS:
            for c in classes:
                (staging / split / c).mkdir(parents=True)
        for split, label, index, image in tqdm(
            items, total=total, desc=f"{tool} -> {dst}", unit="img", disable=not progress
        ):
            save(image, staging / split / classes[label] / f"{index:05d}{suffix}")
            counts[classes[label]][SPLITS.index(split)] += 1
        marker = {"tool": tool, "params": params, "counts": counts}
        (staging / MARKER).write_text(json.dumps(marker, indent=1))
        _swap_in(staging, dst, tool, json.loads(json.dumps(params)))
    except BaseException:  # KeyboardInterrupt too: leave no half tree behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {c: (t, v) for c, (t, v) in counts.items()}


def _save_png(image: np.ndarray, path: Path) -> None:
    Image.fromarray(np.ascontiguousarray(image)).save(path)


def _save_digit(image: np.ndarray, path: Path, size: int) -> None:
    Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR).convert("RGB").save(
        path, quality=95
    )


# --- digits -----------------------------------------------------------------------------------


def write_digits(
    root: str | os.PathLike,
    val_fraction: float = 0.2,
    seed: int = 0,
    size: int = 32,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write scikit-learn's handwritten digits as RGB JPEG class folders root/{train,val}/<0..9>/.

    The 1797 8x8 images (values 0..16) ship inside scikit-learn, so this needs no download:
    scaled to 0..255, upscaled to size x size (bilinear), JPEG quality 95, split per class by
    `split_class` (stratified, seeded). Returns root at once if it already holds this tree.
    """
    root = Path(root)
    check_fraction(val_fraction)
    if size < 1:
        raise PrepareError(f"size must be a positive number of pixels, got {size}")
    params = {"val_fraction": val_fraction, "seed": seed, "size": size}
    if _existing(root, "digits", params, overwrite) is not None:
        return root
    from sklearn.datasets import load_digits  # here, not at the top: a 1 s import

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # (1797, 8, 8)
    labels = digits.target
    split_of = {}
    for c in range(10):
        train, val = split_class(np.flatnonzero(labels == c).tolist(), val_fraction, seed, str(c))
        split_of |= {i: "train" for i in train} | {i: "val" for i in val}
    items = ((split_of[i], int(labels[i]), i, images[i]) for i in range(len(labels)))
    save = functools.partial(_save_digit, size=size)
    classes = [str(c) for c in range(10)]
    _build(root, "digits", params, classes, items, len(labels), save, ".jpg", progress)
    return root


# --- Fashion-MNIST ----------------------------------------------------------------------------


def _find(src_dir: Path, base: str) -> Path:
    for name in (base, base + ".gz"):
        if (src_dir / name).is_file():
            return src_dir / name
    raise PrepareError(
        f"{src_dir} has no {base} or {base}.gz (one of Fashion-MNIST's four idx files)"
    )


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read an idx file of unsigned bytes (gzipped or not) and check its magic number and size.

    Written by hand: the format is a 4-byte magic, one big-endian uint32 per dimension, then the
    bytes; no well-kept library reads it without also downloading it.
    """
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip's own magic, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise PrepareError(f"{path}: corrupt gzip data ({err}); download it again") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    what = f"idx{ndim} {'image' if ndim == 3 else 'label'} file"
    got = int.from_bytes(raw[:4], "big")
    if len(raw) < header or got != magic:
        raise PrepareError(
            f"{path}: magic number {got:#010x}, expected {magic:#010x} (an {what}); "
            "wrong file, or a corrupt download"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != int(np.prod(dims)):
        raise PrepareError(
            f"{path}: header promises {'x'.join(map(str, dims))} = {int(np.prod(dims))} bytes, "
            f"the file holds {len(raw) - header}; truncated or corrupt download"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _check_labels(path: Path, labels: np.ndarray, n_images: int, n_classes: int) -> None:
    if len(labels) != n_images:
        raise PrepareError(f"{path}: {len(labels)} labels for {n_images} images")
    if len(labels) and int(labels.max()) >= n_classes:
        raise PrepareError(f"{path}: label {int(labels.max())} is out of range 0..{n_classes - 1}")


def convert_fashion_mnist(
    src_dir: str | os.PathLike,
    dst: str | os.PathLike,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, tuple[int, int]]:
    """Convert Fashion-MNIST's idx files in src_dir to grayscale PNG class folders under dst.

    Reads train-{images-idx3,labels-idx1}-ubyte[.gz] (-> dst/train/) and t10k-...[.gz]
    (-> dst/val/); classes are named as in FASHION_CLASSES. Returns {class: (n_train, n_val)}.
    """
    src_dir, dst = Path(src_dir), Path(dst)
    done = _existing(dst, "fashion-mnist", {}, overwrite)
    if done is not None:
        return done
    require_dir(src_dir, "Fashion-MNIST folder")
    parts = {}
    for split, prefix in zip(SPLITS, ("train", "t10k"), strict=True):
        images = read_idx(_find(src_dir, f"{prefix}-images-idx3-ubyte"), IDX_IMAGES)
        label_file = _find(src_dir, f"{prefix}-labels-idx1-ubyte")
        labels = read_idx(label_file, IDX_LABELS)
        _check_labels(label_file, labels, len(images), len(FASHION_CLASSES))
        parts[split] = (images, labels)
    items = (
        (split, int(label), i, image)
        for split, (images, labels) in parts.items()
        for i, (image, label) in enumerate(zip(images, labels, strict=True))
    )
    total = sum(len(labels) for _, labels in parts.values())
    return _build(
        dst, "fashion-mnist", {}, FASHION_CLASSES, items, total, _save_png, ".png", progress
    )


# --- CIFAR ------------------------------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR's batches hold (dicts, lists, numpy arrays): a pickle may name
    any callable, and a file from the internet should not get to run one."""

    _NUMPY = {
        "_reconstruct": np.zeros(1).__reduce__()[0],
        "_frombuffer": np.zeros(1).__reduce_ex__(5)[0],
        "scalar": np.float64(0).__reduce__()[0],
        "ndarray": np.ndarray,
        "dtype": np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] == "numpy" and name in self._NUMPY:
            return self._NUMPY[name]
        if (module, name) == ("_codecs", "encode"):  # how Python 3 pickles bytes at protocol 2
            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(path: Path, keys: Sequence[str]) -> dict[str, Any]:
    """A CIFAR batch as a dict with str keys (the originals are Python 2 pickles: bytes keys)."""
    try:
        with open(path, "rb") as f:
            # encoding="bytes": the official recipe; Python 2 str data stays bytes.
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise PrepareError(f"{path}: not a CIFAR python batch ({err})") from None
    if not isinstance(obj, dict):
        raise PrepareError(f"{path}: not a CIFAR python batch (holds a {type(obj).__name__})")
    obj = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
    missing = [k for k in keys if k not in obj]
    if missing:
        raise PrepareError(f"{path}: no {missing[0]!r} entry (has {', '.join(map(str, obj))})")
    return obj


def convert_cifar(
    src_dir: str | os.PathLike,
    dst: str | os.PathLike,
    which: str = "cifar10",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, tuple[int, int]]:
    """Convert CIFAR-10 or CIFAR-100 (fine labels) python batches to RGB PNG class folders.

    src_dir is the extracted folder (cifar-10-batches-py/ or cifar-100-python/) or the folder
    holding it. Training batches go to dst/train/, the test batch to dst/val/; classes are named
    from the meta file. Returns {class: (n_train, n_val)}.
    """
    if which not in CIFAR:
        raise PrepareError(f"which must be one of {', '.join(CIFAR)}, got {which!r}")
    src_dir, dst = Path(src_dir), Path(dst)
    done = _existing(dst, which, {}, overwrite)
    if done is not None:
        return done
    folder_name, train_files, test_files, meta_file, label_key, names_key = CIFAR[which]
    src_dir = require_dir(src_dir, f"{which} folder")
    if not (src_dir / meta_file).is_file() and (src_dir / folder_name).is_dir():
        src_dir = src_dir / folder_name
    missing = [f for f in [*train_files, *test_files, meta_file] if not (src_dir / f).is_file()]
    if missing:
        raise PrepareError(f"{src_dir} lacks {', '.join(missing)} (the {which} python batches)")

    names = _unpickle(src_dir / meta_file, [names_key])[names_key]
    # Folder names: bytes from Python 2 decoded, anything but letters, digits, '-', '.' -> '_'.
    classes = [
        re.sub(r"[^\w.-]+", "_", n.decode() if isinstance(n, bytes) else str(n)) for n in names
    ]
    parts = {}
    for split, files in zip(SPLITS, (train_files, test_files), strict=True):
        datas, labels = [], []
        for name in files:
            batch = _unpickle(src_dir / name, ["data", label_key])
            data, label = np.asarray(batch["data"]), np.asarray(batch[label_key], np.int64)
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise PrepareError(
                    f"{src_dir / name}: data is {data.dtype} {data.shape}, expected uint8 (N, 3072)"
                )
            _check_labels(src_dir / name, label, len(data), len(classes))
            datas.append(data)
            labels.append(label)
        # Rows hold the red plane, then green, then blue, each 32x32 row-major.
        images = np.concatenate(datas).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        parts[split] = (images, np.concatenate(labels))
    items = (
        (split, int(label), i, image)
        for split, (images, labels) in parts.items()
        for i, (image, label) in enumerate(zip(images, labels, strict=True))
    )
    total = sum(len(labels) for _, labels in parts.values())
    return _build(dst, which, {}, classes, items, total, _save_png, ".png", progress)
