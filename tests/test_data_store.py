"""The paper's 256x256 store: `prepare_data.py resize` (repro/data/store.py) and reading it.

Proves, on natural-looking images made here (at side 48 or 64 to stay fast): every image
becomes a size x size JPEG at the same relative path (PNG renamed .jpg) holding the central
square of the original, rescaled; a JPEG already at that size is copied byte for byte; a
GIF is left out and counted, a truncated and a corrupt JPEG are named and skipped, label
files are copied; a rerun does nothing, and redoes exactly the outputs that are missing or
cut short (and removes a temporary leftover); a destination inside the source and a second
size into the same destination are refused with one line and exit code 2; the loaders see
that the store needs no resize and give the same training, evaluation and statistics
numbers as the originals within a grey level.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from natural import corrupt_middle, natural
from PIL import Image
from prepare_cli import cli

from repro.config import DataConfig
from repro.data import loaders, stats, store
from repro.data.prepare import PrepareError
from repro.net.dist import single_process_layout


def square(image: Image.Image, size: int, where: float = 0.5) -> np.ndarray:
    """The square of side min(w, h) at `where` (0.5: central) along the long side, resized."""
    w, h = image.size
    s = min(w, h)
    x, y = int(where * (w - s)), int(where * (h - s))
    return np.asarray(image.crop((x, y, x + s, y + s)).resize((size, size), Image.BILINEAR), float)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """src/train/<class>/ with JPEGs and PNGs of several shapes; src/val/<class>/ too."""
    src = tmp_path_factory.mktemp("store") / "src"
    shapes = [(120, 80), (70, 100), (90, 90), (150, 60)]
    for split, n in (("train", 8), ("val", 2)):
        for c in ("a", "b"):
            (src / split / c).mkdir(parents=True)
            for i in range(n):
                w, h = shapes[i % 4]
                image = natural(w, h, seed=100 * (split == "val") + 10 * ord(c) + i)
                ext = "png" if i == 3 else "jpg"
                image.save(src / split / c / f"{c}{i}.{ext}", quality=95)
    return src


def test_resize_writes_central_squares_and_names_bad_files(source, tmp_path):
    src = tmp_path / "src"
    subprocess.run(["cp", "-r", str(source), str(src)], check=True)
    natural(48, 48, seed=5).save(src / "train" / "a" / "small.jpg", quality=90)  # already 48^2
    natural(60, 50, seed=6).save(src / "train" / "a" / "anim.gif")
    good = (src / "train" / "b" / "b0.jpg").read_bytes()
    (src / "train" / "b" / "cut.jpg").write_bytes(good[: len(good) // 2])
    big = src / "train" / "b" / "big.jpg"
    natural(400, 300, seed=7).save(big, quality=90)
    (src / "train" / "b" / "corrupt.jpg").write_bytes(corrupt_middle(big.read_bytes()))
    (src / "labels.txt").write_text("a0.jpg a\n")
    result = cli("resize", src, tmp_path / "dst", "--size", 48, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"{src / 'train' / 'b' / 'cut.jpg'}: truncated JPEG" in out
    assert f"{src / 'train' / 'b' / 'corrupt.jpg'}: corrupt data: DALI warned" in out
    assert "21 written, 1 copied as they were, 0 already done, 2 bad file(s) skipped" in out
    assert "left out: .gif 1" in out and ".txt" not in out  # labels.txt is copied
    dst = tmp_path / "dst"
    assert (dst / "labels.txt").read_text() == "a0.jpg a\n"
    assert (dst / "train" / "a" / "small.jpg").read_bytes() == (
        src / "train" / "a" / "small.jpg"
    ).read_bytes()
    assert (
        not (dst / "train" / "a" / "a3.png").exists() and (dst / "train" / "a" / "a3.jpg").exists()
    )
    assert not (dst / "train" / "a" / "anim.jpg").exists()
    for c in ("a", "b"):
        for i in range(8):
            name = f"{c}{i}.{'png' if i == 3 else 'jpg'}"
            with Image.open(src / "train" / c / name) as im:
                want, side = square(im.convert("RGB"), 48), square(im.convert("RGB"), 48, 0.0)
                wide = im.size[0] != im.size[1]
            with Image.open(dst / "train" / c / f"{c}{i}.jpg") as im:
                assert im.format == "JPEG" and im.size == (48, 48)
                got = np.asarray(im.convert("RGB"), np.float64)
            # The central square (PIL's resize and JPEG differ from DALI's by a few levels),
            # not the square at the start of the long side.
            near = np.abs(got - want).mean()
            assert near < 5.0, name
            assert not wide or near < np.abs(got - side).mean() / 2, name


def test_rerun_skips_what_is_done_and_redoes_what_is_partial(source, tmp_path):
    dst = tmp_path / "dst"
    first = store.resize_store(source, dst, size=48, threads=1, progress=False)
    assert (first["written"], first["kept"], first["bad"]) == (20, 0, [])
    files = sorted(dst.rglob("*.jpg"))
    times = {f: f.stat().st_mtime_ns for f in files}
    again = store.resize_store(source, dst, size=48, threads=1, progress=False)
    assert (again["written"], again["copied"], again["kept"]) == (0, 0, 20)
    assert {f: f.stat().st_mtime_ns for f in files} == times  # nothing rewritten
    cut, gone = dst / "train" / "a" / "a1.jpg", dst / "val" / "b" / "b0.jpg"
    cut.write_bytes(cut.read_bytes()[:200])  # as if a copy by another tool was cut short
    gone.unlink()
    leftover = dst / "train" / "b" / ".b2.jpg.partial"
    leftover.write_bytes(b"half")
    redo = store.resize_store(source, dst, size=48, threads=1, progress=False)
    assert (redo["written"], redo["kept"]) == (2, 18)
    assert "2 written, 0 copied as they were, 18 already done" in store.summary(redo, dst)[-1]
    assert not leftover.exists()
    with Image.open(cut) as im:
        im.load()
        assert im.size == (48, 48)
    assert gone.is_file()


def test_bad_input_exits_2_with_one_line(source, tmp_path):
    result = cli("resize", source, source / "inside", timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("prepare_data: error: ") and "overlap" in lines[0]
    assert not (source / "inside").exists()
    with pytest.raises(PrepareError, match="does not exist"):
        store.resize_store(tmp_path / "missing", tmp_path / "d")
    with pytest.raises(PrepareError, match="quality in 1..100"):
        store.resize_store(source, tmp_path / "q", quality=101)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / ".store.json").write_text('{"size": 64, "quality": 90}')
    with pytest.raises(PrepareError, match="holds a store of size 64"):
        store.resize_store(source, tmp_path / "s", size=48)


def _numbers(root: Path, reference: Path) -> tuple[bool, list, list, dict]:
    """(stored?, training batches, 10-patch batches, statistics) of a data root; both roots
    are normalised with the reference's statistics, so only the pixels differ."""
    computed = stats.compute_stats(root, progress=False)
    cfg = DataConfig(root=str(root), threads=2, stats=str(reference / "stats.npz"))  # 256, 224
    train = loaders.build_train_loader(cfg, single_process_layout(), 6, seed=1)
    ten = loaders.build_eval_loader(cfg, single_process_layout(), 3, "ten")
    return train.stored, [x for x, _ in train.epoch(0)], [x for x, _ in ten], computed


def test_the_store_reads_as_the_originals_within_a_grey_level(tmp_path):
    # Photo-sized (500 x 375, the ImageNet median) natural-looking JPEGs at quality 95.
    src = tmp_path / "src"
    for split, n in (("train", 6), ("val", 3)):
        for c in ("a", "b"):
            (src / split / c).mkdir(parents=True)
            for i in range(n):
                seed = 100 * (split == "val") + 10 * ord(c) + i
                natural(500, 375, seed).save(src / split / c / f"{i}.jpg", quality=95)
    dst = tmp_path / "dst"
    store.resize_store(src, dst, threads=2, progress=False)  # 256 x 256 at quality 90
    stored_a, train_a, ten_a, stats_a = _numbers(src, src)
    stored_b, train_b, ten_b, stats_b = _numbers(dst, src)
    assert not stored_a and stored_b  # the store is decoded as it is: no resize pass
    assert len(train_a) == 2 and len(ten_a) == 2
    for a, b in [*zip(train_a, train_b), *zip(ten_a, ten_b)]:
        assert a.shape == b.shape
        assert (a - b).abs().mean() < 1.0  # JPEG at quality 90: under a grey level on average
    mean_a, mean_b = stats_a["mean_image"], stats_b["mean_image"]
    assert np.abs(mean_a - mean_b).mean() < 1.0
    assert np.allclose(stats_a["eigval"], stats_b["eigval"], rtol=0.05)
