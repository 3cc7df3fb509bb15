"""Which files the loaders read: the start-up index (repro/data/index.py) and the file rules.

Proves: on 2 gloo ranks, rank 0 alone writes the digits set and screens the folder, and the
other rank receives the same index (the scans counted); a second start reuses the cache and
screens nothing; a new file (also one in a subfolder of a class: class folders are read
recursively, as `check` reads them), a changed bad_files.txt or another pixel limit make the
index anew; every format DALI decodes is read and `split` links it, while a GIF and a text
file are skipped and counted in one warning; an image over the pixel limit and a JPEG whose
middle is corrupt are named (the latter by `check`, whose list the loaders then skip); a file
name holding a tab and a newline survives bad_files.txt, and the older format still reads; a
class whose every file is bad is an error naming it; without DALI the synthetic source still
works and a folder source fails with one error saying how to install it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from natural import corrupt_middle, natural
from PIL import Image
from spawn import run_ranks

from repro.config import DataConfig
from repro.data import check, imagecheck, index, prepare
from repro.data import loaders as data
from repro.net import dist
from repro.net.dist import single_process_layout

ROOT = Path(__file__).resolve().parents[1]


def config(root: Path, **kw) -> DataConfig:
    base = dict(root=str(root), resize=32, crop=28, threads=1, mean="none", lighting_std=0.0)
    return DataConfig(**{**base, **kw})


def make_tree(root: Path, per_class: int = 3) -> Path:
    for c, name in enumerate(("ant", "bee")):
        (root / "train" / name).mkdir(parents=True)
        for i in range(per_class):
            natural(48, 40, seed=10 * c + i).save(root / "train" / name / f"{i}.jpg")
    return settled(root)


def settled(root: Path) -> Path:
    """Folder times an hour back, as on a data set made earlier: a change made now moves
    them even within the file system's clock tick (the index keys on them)."""
    past = time.time() - 3600
    for folder, _, _ in os.walk(root):
        os.utime(folder, (past, past))
    return root


def counted(monkeypatch) -> dict:
    """Count the index's walk-and-screen passes."""
    counts = {"build": 0}
    build = index._build

    def counting(*args, **kwargs):
        counts["build"] += 1
        return build(*args, **kwargs)

    monkeypatch.setattr(index, "_build", counting)
    return counts


def train_paths(root: Path, **kw) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return data.train_set(config(root, **kw)).paths


# -- two ranks ----------------------------------------------------------------------------------


def _two_ranks_start(root: str) -> dict:
    from repro.data import convert

    layout = dist.init_distributed(towers=2, device="cpu")
    counts = {"build": 0, "digits": 0}
    build, write = index._build, convert.write_digits

    def counting_build(*args, **kwargs):
        counts["build"] += 1
        return build(*args, **kwargs)

    def counting_write(*args, **kwargs):
        counts["digits"] += 1
        return write(*args, **kwargs)

    index._build, convert.write_digits = counting_build, counting_write
    cfg = config(Path(root), source="digits")
    seen = []
    for start in range(3):
        if start == 2 and layout.is_main:  # a new image before the third start
            natural(40, 30, seed=1).save(Path(root) / "train" / "3" / "new.jpg")
        loader = data.build_train_loader(cfg, layout, 8, seed=0)
        seen.append((dict(counts), list(loader.images.paths), next(loader.epoch(0))[1].tolist()))
    return {"rank": layout.rank, "seen": seen}


def test_rank0_screens_once_and_the_other_rank_receives_the_index(tmp_path):
    ranks = run_ranks(_two_ranks_start, 2, str(tmp_path / "digits"))
    (first0, again0, new0), (first1, again1, new1) = ranks[0]["seen"], ranks[1]["seen"]
    # Rank 0 wrote the digits once and screened them (for the statistics and, unless that
    # index could be cached, again for the loader); rank 1 did neither, and holds the same
    # files and labels.
    assert first0[0]["digits"] == 1 and first0[0]["build"] in (1, 2)
    assert first1[0] == {"build": 0, "digits": 0}
    assert first0[1] == first1[1] and len(first0[1]) > 1000 and first0[2] == first1[2]
    assert again0[0] == first0[0] and again1[0] == first1[0]  # the cache: nothing screened
    assert new0[0]["build"] == first0[0]["build"] + 1 and new1[0]["build"] == 0  # a new file
    assert new0[1] == new1[1] and len(new0[1]) == len(first0[1]) + 1
    assert any(p.endswith("/3/new.jpg") for p in new1[1])


# -- one process ----------------------------------------------------------------------------


def test_the_cache_is_reused_until_the_folder_changes(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "d")
    counts = counted(monkeypatch)
    assert len(train_paths(root)) == 6 and counts["build"] == 1
    assert len(train_paths(root)) == 6 and counts["build"] == 1  # cached
    (root / "train" / "ant" / "more").mkdir()
    natural(40, 30, seed=3).save(root / "train" / "ant" / "more" / "deep.jpg")
    paths = train_paths(root)
    assert counts["build"] == 2 and str(root / "train" / "ant" / "more" / "deep.jpg") in paths
    imagecheck.write_bad_files(root, [(str(root / "train" / "bee" / "1.jpg"), "corrupt")])
    assert len(train_paths(root)) == 6 and counts["build"] == 3  # bee/1.jpg listed: skipped
    with pytest.raises(data.DataError, match="holds no usable image"):
        train_paths(root, max_pixels=1000)  # another limit: screened anew, every image too big
    assert counts["build"] == 4
    for cache in index.cache_paths(root / "train", root):
        cache.unlink(missing_ok=True)
    train_paths(root)
    assert counts["build"] == 5


def test_every_dali_format_is_read_and_the_rest_counted_in_one_warning(tmp_path, capsys):
    root = tmp_path / "d"
    for c, name in enumerate(("ant", "bee")):
        (root / "train" / name).mkdir(parents=True)
        image = natural(48, 40, seed=c)
        for ext, fmt in [("JPG", "JPEG"), ("png", "PNG"), ("bmp", "BMP"), ("tif", "TIFF"),
                         ("webp", "WEBP"), ("gif", "GIF")]:  # fmt: skip
            image.save(root / "train" / name / f"x.{ext}", fmt)
        (root / "train" / name / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning) as caught:
        loader = data.build_train_loader(config(root), single_process_layout(), 2, 0)
    (line,) = [str(w.message) for w in caught if "skipping" in str(w.message)]
    assert "skipping 4 file(s) of other types" in line and ".gif 2, .txt 2" in line
    assert len(loader.images.paths) == 10
    assert sum(len(y) for _, y in loader.epoch(0)) == 10  # every format decodes
    # split links the same files the loader reads, and says what it left out.
    counts = prepare.split_folders(root / "train", tmp_path / "s", val_fraction=0.2)
    assert counts == {"ant": (4, 1), "bee": (4, 1)}
    assert "left out 4 file(s) the loaders do not read: .gif 2, .txt 2" in capsys.readouterr().out
    linked = {p.suffix for p in (tmp_path / "s").rglob("x.*")}
    assert linked == {".JPG", ".png", ".bmp", ".tif", ".webp"}


def test_bad_images_are_named_large_corrupt_and_empty_classes(tmp_path):
    root = make_tree(tmp_path / "d", per_class=4)
    big = root / "train" / "ant" / "big.jpg"
    natural(300, 200, seed=9).save(big, quality=90)
    with pytest.warns(UserWarning, match="skipping 1 unreadable") as caught:
        paths = data.train_set(config(root, max_pixels=300 * 200 - 1)).paths
    assert str(big) not in paths and len(paths) == 8
    assert f"{big}: over the pixel limit: 300x200 = 60,000 pixels" in str(caught[0].message)
    corrupt = root / "train" / "bee" / "sub" / "corrupt.jpg"
    corrupt.parent.mkdir()
    natural(200, 150, seed=8).save(corrupt, quality=90)
    corrupt.write_bytes(corrupt_middle(corrupt.read_bytes()))
    bad = dict(check.find_bad_images(root, progress=False, max_pixels=300 * 200 - 1))
    assert bad[str(big)].startswith("over the pixel limit: 300x200")
    assert bad[str(corrupt)].startswith("corrupt data: DALI warned Corrupt JPEG data")
    assert str(corrupt) not in train_paths(root)  # check's list is skipped by the loaders
    with pytest.warns(UserWarning, match="skipping"):
        for i in range(4):  # replaced by empty files (a new file changes its folder's time)
            (root / "train" / "bee" / f"{i}.jpg").unlink()
            (root / "train" / "bee" / f"{i}.jpg").write_bytes(b"")
        with pytest.raises(data.DataError, match=r"class folder .*bee holds no usable image"):
            data.build_train_loader(config(root), single_process_layout(), 2, 0)


def test_bad_files_list_holds_any_name_and_reads_the_old_format(tmp_path):
    root = make_tree(tmp_path / "d")
    odd = root / "train" / "ant" / "tab\there\nnewline.jpg"
    natural(40, 30, seed=4).save(odd, "JPEG")
    imagecheck.write_bad_files(root, [(str(odd), "looks wrong\tto me")])
    assert imagecheck.read_bad_files(root) == {str(odd): "looks wrong\tto me"}
    with pytest.warns(UserWarning, match="skipping 1 unreadable") as caught:
        paths = data.train_set(config(root)).paths
    assert str(odd) not in paths and len(paths) == 6
    assert "tab\there" in str(caught[0].message)
    (root / imagecheck.BAD_FILES_NAME).write_text("# old\ntrain/bee/0.jpg\ttruncated\n")
    assert imagecheck.read_bad_files(root) == {str(root / "train" / "bee" / "0.jpg"): "truncated"}


def test_without_dali_the_synthetic_source_works_and_folders_say_how_to_install(tmp_path):
    root = make_tree(tmp_path / "d")
    script = f"""
import sys
class NoDali:
    def find_spec(self, name, path=None, target=None):
        if name == "nvidia.dali" or name.startswith("nvidia.dali."):
            raise ModuleNotFoundError("No module named 'nvidia.dali'", name=name)
sys.meta_path.insert(0, NoDali())
from repro.config import DataConfig
from repro.data import loaders
from repro.net.dist import single_process_layout
from repro.net.model import AlexNet
from repro.config import ModelConfig
layout = single_process_layout()
synthetic = loaders.build_train_loader(DataConfig(source="synthetic", crop=64,
    synthetic_images=8), layout, 4, 0, num_classes=3)
x, y = next(synthetic.epoch(0))
model = AlexNet(ModelConfig(num_classes=3, image_size=64, widths=(8, 8, 8, 8, 8),
    fc_width=16), layout)
print("logits", tuple(model(x).shape))
try:
    loaders.build_train_loader(DataConfig(root={str(root)!r}), layout, 2, 0)
except loaders.DataError as err:
    print("error:", err)
print("dali imported:", any(m.startswith("nvidia.dali") for m in sys.modules))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    assert "logits (4, 3)" in result.stdout
    assert "error: decoding images needs NVIDIA DALI" in result.stdout
    assert "pip install nvidia-dali-cuda130" in result.stdout
    assert "dali imported: False" in result.stdout


def test_stats_eigenvalues_are_never_negative(tmp_path):
    from repro.data.stats import compute_stats

    root = tmp_path / "grey"
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(3):
            grey = np.asarray(natural(40, 40, seed=i + 5 * (c == "b")).convert("L"))
            Image.fromarray(np.stack([grey] * 3, -1)).save(root / "train" / c / f"{i}.png")
    stats = compute_stats(root, resize=32, progress=False)
    # R = G = B: one direction of variance; the other two are 0, not -2e-17.
    assert stats["eigval"][0] > 0 and (stats["eigval"] >= 0).all()
    assert stats["eigval"][1:].max() < 1e-12
