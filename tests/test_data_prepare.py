"""The data-preparation tools: repro/data/prepare.py, repro/data/convert.py, launch/prepare_data.py.

Proves: a split keeps every source file exactly once across train/ and val/, is stratified per
class, the same for a seed and different for another, and can be re-run without duplicating
or losing files, while a different split in the same place is refused; ImageNet's validation
images land in their ground-truth class folder; the digits, Fashion-MNIST and CIFAR converters
write the right counts, class names and pixels, skip a finished tree and never leave a half
one; and each bad input ends the command with exit code 2 and one line saying why, or
with its traceback given --traceback, before the sub-command or after it; a refused
destination names --overwrite (or, for the demo's data.root, the command to run); an output
that is a file, lies under one or takes no new entries is named, as the argument it came
from, before any work.
Commands run as a user runs them (`python launch/prepare_data.py ...` from the repo root), on
tiny data made here in the real formats.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os
import pickle
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prepare_cli import cli

from repro.config import DataConfig
from repro.data import (
    convert,
    prepare,
    sets,
)
from repro.data.folders import DataError

ROOT = Path(__file__).resolve().parents[1]

SIZES = {"daisy": 20, "roses": 7, "tulips": 2, "solo": 1}
# round(n * 0.2) per class, at least one val image once a class has two (tulips), none for one.
EXPECTED = {"daisy": (16, 4), "roses": (6, 1), "solo": (1, 0), "tulips": (1, 1)}


def assert_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2 and exactly one line on stderr, containing each fragment."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("prepare_data: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def make_photos(src: Path) -> Path:
    """src/<class>/NNN.jpg for SIZES, each a distinct tiny JPEG, plus a top-level LICENSE.txt."""
    rng = np.random.default_rng(0)
    for cls, n in SIZES.items():
        (src / cls).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(src / cls / f"{i:03d}.jpg")
    (src / "LICENSE.txt").write_text("licence of the photos")
    return src


def tree(root: Path) -> dict[tuple[str, str, str], bytes]:
    """{(split, class, name): contents} of every file under root/train and root/val."""
    return {
        (split, f.parent.name, f.name): f.read_bytes()
        for split in ("train", "val")
        for f in sorted((root / split).glob("*/*"))
    }


def val_sets(root: Path) -> set[tuple[str, str]]:
    return {(cls, name) for split, cls, name in tree(root) if split == "val"}


# --- split ------------------------------------------------------------------------------------


def test_split_keeps_every_file_once_stratified_and_seeded(tmp_path):
    src = make_photos(tmp_path / "flower_photos")
    result = cli("split", src, tmp_path / "a")
    assert result.returncode == 0, result.stderr
    assert "total" in result.stdout and "24" in result.stdout.splitlines()[-2]

    a = tree(tmp_path / "a")
    source = sorted((f.parent.name, f.name, f.read_bytes()) for f in src.glob("*/*.jpg"))
    assert sorted((cls, name, data) for (_, cls, name), data in a.items()) == source
    for cls, (n_train, n_val) in EXPECTED.items():
        assert len(list((tmp_path / "a" / "train" / cls).iterdir())) == n_train
        assert len(list((tmp_path / "a" / "val" / cls).iterdir())) == n_val  # solo: empty folder
    assert not (tmp_path / "a" / "train" / "LICENSE.txt").exists()
    # Same filesystem: hard links, no copies.
    assert (tmp_path / "a/train/solo/000.jpg").stat().st_ino == (src / "solo/000.jpg").stat().st_ino

    assert cli("split", src, tmp_path / "b").returncode == 0
    assert tree(tmp_path / "b") == a
    assert cli("split", src, tmp_path / "c", "--seed", "1").returncode == 0
    assert val_sets(tmp_path / "c") != val_sets(tmp_path / "a")


def test_split_rerun_completes_and_refuses_another_split(tmp_path):
    src = make_photos(tmp_path / "flower_photos")
    dst = tmp_path / "flowers"
    assert cli("split", src, dst).returncode == 0
    first = tree(dst)

    # An interrupted run lost one entry: the re-run restores it and duplicates nothing.
    lost = next(iter((dst / "val" / "daisy").iterdir()))
    lost.unlink()
    result = cli("split", src, dst)
    assert result.returncode == 0, result.stderr
    assert "1 new entries" in result.stdout and tree(dst) == first

    # Another seed in the same place is refused, naming a file, and changes nothing.
    refused = cli("split", src, dst, "--seed", "1")
    message = assert_error(refused, "seed=1", "seed=0", "Pass --overwrite to replace it")
    assert str(dst / "train") in message or str(dst / "val") in message
    assert tree(dst) == first

    # A file of the right name but other bytes is no entry of this split either.
    changed = next(iter((dst / "train" / "roses").iterdir()))
    changed.unlink()  # not written through: it is a hard link of the source
    changed.write_bytes(b"other bytes")
    assert_error(cli("split", src, dst), str(changed), "differs from")

    assert cli("split", src, dst, "--seed", "1", "--overwrite").returncode == 0
    prepare.split_folders(src, tmp_path / "fresh", seed=1, verbose=False)
    assert tree(dst) == tree(tmp_path / "fresh")


@pytest.mark.parametrize("link", ["hard", "symlink", "copy"])
def test_split_link_modes(tmp_path, link):
    src = make_photos(tmp_path / "src")
    counts = prepare.split_folders(
        src, tmp_path / "dst", val_fraction=0.25, link=link, verbose=False
    )
    assert counts["daisy"] == (15, 5)
    placed = next((tmp_path / "dst" / "train" / "daisy").iterdir())
    original = src / "daisy" / placed.name
    assert placed.is_symlink() == (link == "symlink")
    assert os.path.samefile(placed, original) == (link != "copy")
    assert placed.read_bytes() == original.read_bytes()
    # A re-run recognises its own entries whatever the mode.
    assert prepare.split_folders(src, tmp_path / "dst", 0.25, link=link, verbose=False) == counts


# --- imagenet-val -----------------------------------------------------------------------------

WNIDS = ["n01440764", "n01443537", "n01484850"]
LABELS = [2, 1, 3, 3, 1, 2]


def make_imagenet_val(root: Path, labels=LABELS, n_images: int = 6) -> tuple[Path, Path, Path]:
    val = root / "val"
    val.mkdir(parents=True)
    for i in range(1, n_images + 1):
        Image.new("RGB", (4, 4), (i * 30, 0, 0)).save(val / f"ILSVRC2012_val_{i:08d}.JPEG")
    (val / "README").write_text("not an image")
    gt = root / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("".join(f"{c}\n" for c in labels))
    synsets = root / "synsets.txt"
    names = ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark"]
    synsets.write_text("".join(f"{w} {d}\n" for w, d in zip(WNIDS, names, strict=True)))
    return val, gt, synsets


def test_imagenet_val_arranged_by_ground_truth(tmp_path):
    val, gt, synsets = make_imagenet_val(tmp_path)
    pixels = {
        i: Image.open(val / f"ILSVRC2012_val_{i:08d}.JPEG").getpixel((0, 0)) for i in range(1, 7)
    }
    result = cli("imagenet-val", val, gt, synsets)
    assert result.returncode == 0, result.stderr
    for i, class_id in enumerate(LABELS, 1):
        moved = val / WNIDS[class_id - 1] / f"ILSVRC2012_val_{i:08d}.JPEG"
        assert Image.open(moved).getpixel((0, 0)) == pixels[i]
    assert not list(val.glob("*.JPEG")) and (val / "README").exists()
    before = sorted(val.rglob("*"))
    assert cli("imagenet-val", val, gt, synsets).returncode == 0
    assert sorted(val.rglob("*")) == before
    # An image filed under the wrong class (another ground truth) is reported, not kept.
    misfiled = val / WNIDS[0] / "ILSVRC2012_val_00000002.JPEG"
    misfiled.rename(val / WNIDS[1] / misfiled.name)
    assert_error(
        cli("imagenet-val", val, gt, synsets), "is filed under n01443537", "line 2 says n01440764"
    )

    # --copy into another folder leaves the source as it was.
    val2, gt2, syn2 = make_imagenet_val(tmp_path / "second")
    counts = prepare.arrange_imagenet_val(
        val2, gt2, syn2, dst=tmp_path / "out", copy=True, verbose=False
    )
    assert counts == {"n01440764": 2, "n01443537": 2, "n01484850": 2}
    assert (
        len(list(val2.glob("*.JPEG"))) == 6 and len(list((tmp_path / "out").glob("*/*.JPEG"))) == 6
    )


def test_imagenet_val_errors_change_nothing(tmp_path):
    val, gt, synsets = make_imagenet_val(tmp_path, labels=LABELS[:5])
    assert_error(
        cli("imagenet-val", val, gt, synsets), "6 ILSVRC2012_val_", "5 class ids", "00000006"
    )
    gt.write_text("1\n2\n3\n4\n1\n2\n")
    assert_error(cli("imagenet-val", val, gt, synsets), "line 4", "class id 4", "out of range 1..3")
    gt.write_text("1\n2\n3\n1\n2\n3\n")
    (val / "ILSVRC2012_val_00000003.JPEG").unlink()
    assert_error(
        cli("imagenet-val", val, gt, synsets),
        "5 ILSVRC2012_val_",
        "missing ILSVRC2012_val_00000003.JPEG",
    )
    assert len(list(val.glob("*.JPEG"))) == 5 and not list(val.glob("n*"))


# --- digits -----------------------------------------------------------------------------------


def test_digits_writes_1797_jpegs_and_a_second_call_is_a_noop(tmp_path):
    from sklearn.datasets import load_digits

    root = tmp_path / "digits"
    result = cli("digits", root)
    assert result.returncode == 0, result.stderr
    digits = load_digits()
    for c in range(10):
        n = int((digits.target == c).sum())
        n_val = len(list((root / "val" / str(c)).iterdir()))
        assert (
            n_val == int(n * 0.2 + 0.5)
            and len(list((root / "train" / str(c)).iterdir())) == n - n_val
        )
    files = sorted(root.glob("*/*/*.jpg"))
    assert len(files) == 1797 and len({f.name for f in files}) == 1797
    for f in files:
        with Image.open(f) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (32, 32))
    # File 00042 is digits.images[42], 0..16 scaled to 0..255, upscaled 4x; JPEG is lossy.
    written = next(root.glob(f"*/{digits.target[42]}/00042.jpg"))
    source = Image.fromarray(np.rint(digits.images[42] * 255 / 16).astype(np.uint8))
    expected = np.asarray(source.resize((32, 32), Image.Resampling.BILINEAR), np.float64)
    assert np.abs(np.asarray(Image.open(written), np.float64)[..., 0] - expected).mean() < 3

    stamps = {f: f.stat().st_mtime_ns for f in [root / convert.MARKER, *files[:50]]}
    assert convert.write_digits(root, progress=False) == root
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]  # no staging left


def test_digits_interrupted_write_leaves_no_tree(tmp_path, monkeypatch):
    calls = []

    def failing_save(image, path, size):
        calls.append(path)
        if len(calls) == 100:
            raise KeyboardInterrupt
        Image.fromarray(image).save(path, format="JPEG")

    monkeypatch.setattr(convert, "_save_digit", failing_save)
    with pytest.raises(KeyboardInterrupt):
        convert.write_digits(tmp_path / "digits", progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    # A staging folder of a process killed outright (no cleanup ran) is removed by the next run.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".digits.partial-{socket.gethostname()}-{dead.pid}"
    (stale / "train" / "3").mkdir(parents=True)
    convert.write_digits(tmp_path / "digits", progress=False)
    assert len(list((tmp_path / "digits").glob("*/*/*.jpg"))) == 1797
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]


# --- Fashion-MNIST ----------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def make_fashion(src: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Tiny Fashion-MNIST: train files gzipped, t10k files plain, as either may be downloaded."""
    rng = np.random.default_rng(1)
    src.mkdir()
    parts = {}
    for prefix, n, suffix in (("train", 23, ".gz"), ("t10k", 11, "")):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(src / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(src / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        parts[prefix] = (images, labels)
    return parts


def test_fashion_mnist_counts_names_pixels(tmp_path):
    parts = make_fashion(tmp_path / "fashion")
    dst = tmp_path / "out"
    result = cli("fashion-mnist", tmp_path / "fashion", dst)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (dst / "train").iterdir())
    assert (
        names == sorted(convert.FASHION_CLASSES) == sorted(p.name for p in (dst / "val").iterdir())
    )
    for split, prefix in (("train", "train"), ("val", "t10k")):
        bincount = np.bincount(parts[prefix][1], minlength=10)
        for c, name in enumerate(convert.FASHION_CLASSES):
            assert len(list((dst / split / name).iterdir())) == bincount[c]
    images, labels = parts["t10k"]
    written = dst / "val" / convert.FASHION_CLASSES[labels[7]] / "00007.png"
    assert np.array_equal(np.asarray(Image.open(written)), images[7])

    marker = (dst / convert.MARKER).stat().st_mtime_ns
    assert cli("fashion-mnist", tmp_path / "fashion", dst).returncode == 0
    assert (dst / convert.MARKER).stat().st_mtime_ns == marker
    # A tree whose files no longer match its marker is not taken for complete.
    written.unlink()
    refused = cli("fashion-mnist", tmp_path / "fashion", dst)
    assert_error(refused, "no longer match", "Pass --overwrite to replace it")
    assert cli("fashion-mnist", tmp_path / "fashion", dst, "--overwrite").returncode == 0
    assert np.array_equal(np.asarray(Image.open(written)), images[7])


def test_fashion_mnist_bad_files(tmp_path):
    src = tmp_path / "fashion"
    make_fashion(src)
    labels = src / "t10k-labels-idx1-ubyte"
    images = src / "t10k-images-idx3-ubyte"
    labels.write_bytes(images.read_bytes())  # an image file under the label file's name
    assert_error(
        cli("fashion-mnist", src, tmp_path / "a"),
        "t10k-labels-idx1-ubyte",
        "magic number 0x00000803",
    )
    images.write_bytes(images.read_bytes()[:-100])
    assert_error(cli("fashion-mnist", src, tmp_path / "b"), "t10k-images-idx3-ubyte", "truncated")
    images.unlink()
    assert_error(
        cli("fashion-mnist", src, tmp_path / "c"),
        "no t10k-images-idx3-ubyte or t10k-images-idx3-ubyte.gz",
    )
    assert not any((tmp_path / d).exists() for d in "abc")


# --- CIFAR ------------------------------------------------------------------------------------


def dump(path: Path, obj: dict) -> None:
    # bytes keys at protocol 2: how the Python 2 originals read with encoding="bytes".
    path.write_bytes(pickle.dumps({k.encode(): v for k, v in obj.items()}, protocol=2))


def make_cifar(folder: Path, which: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(2)
    folder.mkdir(parents=True)
    n_classes = 10 if which == "cifar10" else 100
    label_key = "labels" if which == "cifar10" else "fine_labels"
    train = [f"data_batch_{i}" for i in range(1, 6)] if which == "cifar10" else ["train"]
    test = ["test_batch"] if which == "cifar10" else ["test"]
    data = {}
    for name in train + test:
        images = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        labels = rng.integers(0, n_classes, 3).tolist()
        dump(folder / name, {"data": images, label_key: labels, "filenames": [b"x.png"] * 3})
        data[name] = (images, np.array(labels))
    names = [f"class {c}".encode() for c in range(n_classes)]  # space -> '_' in folder names
    if which == "cifar10":
        dump(folder / "batches.meta", {"label_names": names})
    else:
        dump(folder / "meta", {"fine_label_names": names, "coarse_label_names": [b"c"] * 20})
    return data


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_cifar_counts_names_pixels(tmp_path, which):
    folder = "cifar-10-batches-py" if which == "cifar10" else "cifar-100-python"
    data = make_cifar(tmp_path / "download" / folder, which)
    dst = tmp_path / which
    result = cli(which, tmp_path / "download", dst)  # the folder holding the extracted one
    assert result.returncode == 0, result.stderr
    n_classes = 10 if which == "cifar10" else 100
    assert sorted(p.name for p in (dst / "train").iterdir()) == sorted(
        f"class_{c}" for c in range(n_classes)
    )
    train = [k for k in data if k not in ("test_batch", "test")]
    assert len(list((dst / "train").glob("*/*.png"))) == 3 * len(train)
    assert len(list((dst / "val").glob("*/*.png"))) == 3

    # Train image 4 is the second image of the second training batch (one batch for CIFAR-100).
    batch, row = (train[1], 1) if which == "cifar10" else (train[0], 2)
    index = 4 if which == "cifar10" else 2
    images, labels = data[batch]
    written = dst / "train" / f"class_{labels[row]}" / f"{index:05d}.png"
    # A row is the red 32x32 plane, then green, then blue.
    expected = images[row].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(np.asarray(Image.open(written).convert("RGB")), expected)


def test_cifar_bad_files(tmp_path):
    make_cifar(tmp_path / "c10", "cifar10")
    (tmp_path / "c10" / "test_batch").unlink()
    assert_error(cli("cifar10", tmp_path / "c10", tmp_path / "out"), "lacks test_batch")
    (tmp_path / "c10" / "test_batch").write_bytes(pickle.dumps(os.system))  # runs nothing
    assert_error(
        cli("cifar10", tmp_path / "c10", tmp_path / "out"), "test_batch", "refusing to load"
    )
    assert not (tmp_path / "out").exists()


# --- bad input to every command ---------------------------------------------------------------


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["split", "{tmp}/missing", "{tmp}/out"], ["source folder", "does not exist"]),
        (["split", "{tmp}/empty", "{tmp}/out"], ["holds no class folders"]),
        (["split", "{tmp}/photos", "{tmp}/out", "--val-fraction", "1.5"], ["val_fraction", "1.5"]),
        (["split", "{tmp}/photos", "{tmp}/photos/split"], ["lies inside source"]),
        (["imagenet-val", "{tmp}/missing", "{tmp}/gt.txt", "{tmp}/syn.txt"], ["validation folder"]),
        (
            ["imagenet-val", "{tmp}/empty", "{tmp}/gt.txt", "{tmp}/syn.txt"],
            ["synset list", "syn.txt"],
        ),
        (["digits", "{tmp}/photos"], ["not empty", ".complete.json"]),
        (["digits", "{tmp}/d", "--size", "0"], ["size must be a positive"]),
        (
            ["fashion-mnist", "{tmp}/missing", "{tmp}/out"],
            ["Fashion-MNIST folder", "does not exist"],
        ),
        (["cifar100", "{tmp}/empty", "{tmp}/out"], ["lacks train, test, meta"]),
        (["check", "{tmp}/missing"], ["image folder", "does not exist"]),
        (["stats", "{tmp}/photos/LICENSE.txt"], ["is not a folder"]),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, fragments):
    make_photos(tmp_path / "photos")
    (tmp_path / "empty").mkdir()
    result = cli(*[a.format(tmp=tmp_path) for a in args])
    assert_error(result, *fragments)
    assert not (tmp_path / "out").exists()


PROC = "/proc/self/fdinfo"  # a folder that takes no new entries, even for root (Linux)
needs_proc = pytest.mark.skipif(not os.path.isdir(PROC), reason="needs Linux's /proc")
FILE_IS_THERE = "exists and is not a folder; choose another folder"
FILE_ON_THE_WAY = "cannot be made: {tmp}/afile is a file, not a folder; choose another folder"


@pytest.mark.parametrize(
    "args, expected",
    [
        (["digits", "{tmp}/afile"], "output folder {tmp}/afile " + FILE_IS_THERE),
        (["digits", "{tmp}/afile/d"], "output folder {tmp}/afile/d " + FILE_ON_THE_WAY),
        pytest.param(
            ["digits", f"{PROC}/d"],
            f"output folder {PROC}/d cannot be written: {PROC} takes no new entries",
            marks=needs_proc,
        ),
        (["split", "{tmp}/photos", "{tmp}/afile"], "output folder {tmp}/afile " + FILE_IS_THERE),
        (
            ["split", "{tmp}/photos", "{tmp}/afile/x"],
            "output folder {tmp}/afile/x " + FILE_ON_THE_WAY,
        ),
        (["resize", "{tmp}/photos", "{tmp}/afile"], "output folder {tmp}/afile " + FILE_IS_THERE),
        (
            ["resize", "{tmp}/photos", "{tmp}/afile/x"],
            "output folder {tmp}/afile/x " + FILE_ON_THE_WAY,
        ),
        (
            ["fashion-mnist", "{tmp}/photos", "{tmp}/afile/x"],
            "output folder {tmp}/afile/x " + FILE_ON_THE_WAY,
        ),
        (
            [
                "imagenet-val",
                "{tmp}/val",
                "{tmp}/ILSVRC2012_validation_ground_truth.txt",
                "{tmp}/synsets.txt",
                "--dst",
                "{tmp}/afile",
            ],
            "--dst folder {tmp}/afile " + FILE_IS_THERE,
        ),
        (
            ["stats", "{tmp}/photos", "--out", "{tmp}/afile/s.npz"],
            "--out {tmp}/afile/s.npz: its folder {tmp}/afile exists and is not a folder",
        ),
        (
            ["stats", "{tmp}/photos", "--out", "{tmp}/photos"],
            "--out {tmp}/photos is a folder: name a file, e.g. {tmp}/photos/stats.npz",
        ),
        pytest.param(
            ["check", PROC],
            f"image folder {PROC} takes no new entries",
            marks=needs_proc,
        ),
    ],
)
def test_an_output_that_cannot_be_written_is_named_before_any_work(
    tmp_path, capsys, args, expected
):
    """An output folder that is a file, lies under a file or takes no new entries: one line
    naming the argument and what is wrong (no errno, no staging path), and nothing written."""
    make_photos(tmp_path / "photos")
    make_imagenet_val(tmp_path)
    (tmp_path / "afile").write_text("mine")
    before = sorted(tmp_path.rglob("*"))
    assert load_launch().main([a.format(tmp=tmp_path) for a in args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [lines[-1]] and lines[0].startswith("prepare_data: error: ")
    assert expected.format(tmp=tmp_path) in lines[0]
    assert "Errno" not in lines[0] and ".partial" not in lines[0]
    assert sorted(tmp_path.rglob("*")) == before and (tmp_path / "afile").read_text() == "mine"


def test_the_demo_into_a_folder_it_cannot_write_names_data_root(tmp_path):
    """data.source=digits writes into data.root: one that cannot be written is bad input
    (DataError: exit 2) naming data.root, not an OSError that blames the run folder."""
    (tmp_path / "afile").write_text("mine")
    roots = {tmp_path / "afile" / "d": f"cannot be made: {tmp_path / 'afile'} is a file"}
    if os.path.isdir(PROC):
        roots[Path(PROC) / "d"] = f"cannot be written: {PROC} takes no new entries"
    for root, problem in roots.items():
        with pytest.raises(DataError) as refused:
            sets.root_of(DataConfig(source="digits", root=str(root)))
        assert str(refused.value).startswith(f"data.root {root} {problem}")
        assert "set data.root to a folder you can write to" in str(refused.value)
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


@pytest.mark.parametrize(
    "config, how",
    [
        ("flowers", "make it from class folders PHOTOS/<class>/*.jpg (e.g. flower_photos/) with "
         "`python launch/prepare_data.py split PHOTOS {root}`, or set data.root=FOLDER"),
        ("cifar10", "`python launch/prepare_data.py cifar10 cifar-10-batches-py {root}`"),
        ("cifar100", "`python launch/prepare_data.py cifar100 cifar-100-python {root}`"),
        ("fashion_mnist", "`python launch/prepare_data.py fashion-mnist FOLDER {root}`"),
        ("paper", "set data.root=FOLDER, the folder holding ImageNet's train/<wnid>/*.JPEG"),
    ],
)  # fmt: skip
def test_a_missing_data_root_says_how_to_make_it(tmp_path, config, how):
    """Each shipped config's data root, missing: the line names the prepare_data command
    that makes that set there (README "Tools"), or how to point data.root elsewhere."""
    from repro.config import load_config

    cfg = load_config(ROOT / "configs" / f"{config}.yaml").data
    root = tmp_path / Path(cfg.root).name  # the config's folder name, surely missing
    with pytest.raises(DataError) as missing:
        sets.root_of(dataclasses.replace(cfg, root=str(root)))
    assert str(missing.value).startswith(f"data.root {root} does not exist: ")
    assert how.format(root=root) in str(missing.value)


# --- check and stats hand over to their modules -----------------------------------------------


def load_launch():
    spec = importlib.util.spec_from_file_location(
        "prepare_data", ROOT / "launch" / "prepare_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_and_stats_delegate(tmp_path, monkeypatch, capsys):
    launch = load_launch()
    seen = {}

    def find_bad_images(root, progress, **settings):
        seen["check"] = root
        return [(str(root / "a.jpg"), "truncated")]

    def compute_stats(root, **kwargs):
        seen["stats"] = kwargs
        return {"mean": np.zeros((3, 4, 4)), "images": 12}

    check = types.ModuleType("repro.data.check")
    check.find_bad_images = find_bad_images
    stats = types.ModuleType("repro.data.stats")
    stats.compute_stats = compute_stats
    monkeypatch.setitem(sys.modules, "repro.data.check", check)
    monkeypatch.setitem(sys.modules, "repro.data.stats", stats)

    assert launch.main(["check", str(tmp_path)]) == 1
    assert f"{tmp_path / 'a.jpg'}: truncated" in capsys.readouterr().out
    assert launch.main(["stats", str(tmp_path), "--sample", "5", "--resize", "64"]) == 0
    assert seen["stats"] == {"out": None, "sample": 5, "resize": 64, "seed": 0}
    out = capsys.readouterr().out
    assert "mean: array (3, 4, 4)" in out and "images: 12" in out
    check.find_bad_images = lambda root, progress, **settings: []
    assert launch.main(["check", str(tmp_path)]) == 0


def test_help_never_shows_a_default_of_none(capsys):
    """Every sub-command's --help: no '(default: None)', e.g. for split's required dst."""
    launch = load_launch()
    for command in ("split", "imagenet-val", "digits", "check", "resize", "stats"):
        with pytest.raises(SystemExit):
            launch.main([command, "--help"])
        text = capsys.readouterr().out
        assert "example:" in text and "(default: None)" not in text, command


def test_traceback_is_taken_before_or_after_the_command(tmp_path):
    """--traceback re-raises the error (its traceback shown) wherever it is given."""
    launch, missing = load_launch(), str(tmp_path / "missing")
    for argv in (["--traceback", "check", missing], ["check", missing, "--traceback"]):
        with pytest.raises(prepare.PrepareError, match="does not exist"):
            launch.main(argv)
    assert launch.main(["check", missing]) == 2  # without it: one line


def test_the_demo_into_a_used_folder_names_data_root_and_the_command(tmp_path):
    """data.source=digits writes the digits only into a new or empty data.root; the refusal
    says what the user of train can do (prepare_data's --overwrite is no option of train)."""
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError) as refused:
        sets.root_of(DataConfig(source="digits", root=str(tmp_path)))
    assert str(refused.value) == (
        f"data.source=digits writes scikit-learn's digits into data.root, but {tmp_path} "
        "already holds other files: set data.root to a new folder, or replace them with "
        f"`python launch/prepare_data.py digits {tmp_path} --overwrite`"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
