"""The training-set statistics: repro/data/stats.py.

Proves, on PNG images (lossless, so the pixels are known exactly) of which some are wider
than tall: the mean image, the channel mean and the RGB covariance's eigen-decomposition
equal numpy's on the central squares; a seeded sample uses the images numpy's generator
picks; `load_stats` reads the file back, falls back to the ImageNet constants with a
warning when there is none, and refuses a mean image of the wrong size or a missing file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from repro.config import DataConfig
from repro.data import stats as datastats
from repro.data.loaders import DataError

ROOT = Path(__file__).resolve().parents[1]

S = 16


@pytest.fixture(scope="module")
def stats_tree(tmp_path_factory):
    """Six PNGs in two classes; every second one is 2S x S (its central square is x S/2..3S/2)."""
    root = tmp_path_factory.mktemp("stats")
    rng = np.random.default_rng(0)
    squares = []
    for i in range(6):
        cls = root / "train" / f"c{i % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        wide = i % 3 == 0
        img = rng.integers(0, 256, (S, 2 * S if wide else S, 3), dtype=np.uint8)
        img[..., 0] //= 2  # channels with different spreads: a non-trivial covariance
        img[..., 2] = img[..., 1] // 2 + 40
        Image.fromarray(img).save(cls / f"img{i}.png")
        squares.append((str(cls / f"img{i}.png"), img[:, S // 2 : S // 2 + S] if wide else img))
    squares.sort()  # the order the class folders list them in
    return root, [sq for _, sq in squares]


def numpy_stats(squares):
    x = np.stack(squares).astype(np.float64)
    rgb = x.reshape(-1, 3) / 255
    cov = np.cov(rgb.T, bias=True)
    val, vec = np.linalg.eigh(cov)
    return x.mean(axis=0), rgb.mean(axis=0) * 255, cov, val[::-1], vec[:, ::-1]


def test_statistics_equal_numpy(stats_tree):
    root, squares = stats_tree
    stats = datastats.compute_stats(root, resize=S, progress=False, batch=4)
    mean_image, mean_channel, cov, val, vec = numpy_stats(squares)
    assert stats["images"] == 6 and stats["path"] == str(root / "stats.npz")
    np.testing.assert_allclose(stats["mean_image"], mean_image, atol=1e-4)
    np.testing.assert_allclose(stats["mean_channel"], mean_channel, rtol=1e-10)
    np.testing.assert_allclose(stats["cov"], cov, atol=1e-12)
    np.testing.assert_allclose(stats["eigval"], val, rtol=1e-8)
    assert stats["eigval"][0] > stats["eigval"][1] > stats["eigval"][2] > 0
    # Columns are eigenvectors (up to sign): cov p_i = l_i p_i.
    for i in range(3):
        p = stats["eigvec"][:, i]
        np.testing.assert_allclose(cov @ p, val[i] * p, atol=1e-12)
        assert abs(p @ vec[:, i]) == pytest.approx(1.0)

    loaded = datastats.load_stats(DataConfig(root=str(root), resize=S))
    for key in ("eigval", "eigvec", "mean_channel", "mean_image"):
        np.testing.assert_array_equal(loaded[key], stats[key])


def test_a_seeded_sample(stats_tree, tmp_path):
    root, squares = stats_tree
    out = tmp_path / "not" / "yet" / "sample.npz"  # its folder is made (it failed at the end)
    stats = datastats.compute_stats(root, out=out, sample=3, resize=S, seed=5, progress=False)
    chosen = np.sort(np.random.default_rng(5).choice(6, 3, replace=False))
    mean_image, *_ = numpy_stats([squares[i] for i in chosen])
    assert stats["images"] == 3 and out.is_file()
    np.testing.assert_allclose(stats["mean_image"], mean_image, atol=1e-4)


def test_load_stats_fallback_and_errors(stats_tree, tmp_path):
    with pytest.warns(UserWarning, match="no statistics file"):
        stats = datastats.load_stats(DataConfig(root=str(tmp_path), resize=8))
    np.testing.assert_array_equal(stats["eigval"], [0.2175, 0.0188, 0.0045])
    np.testing.assert_array_equal(stats["eigvec"][0], [-0.5675, 0.7192, 0.4009])
    np.testing.assert_allclose(stats["mean_channel"], [123.675, 116.28, 103.53])
    assert stats["mean_image"].shape == (8, 8, 3)
    np.testing.assert_allclose(stats["mean_image"][3, 5], stats["mean_channel"], rtol=1e-6)
    root, _ = stats_tree
    with pytest.raises(DataError, match=f"mean image of shape .*{S}, {S}, 3.* data.resize is 32"):
        datastats.load_stats(DataConfig(root=str(root), resize=32))
    with pytest.raises(DataError, match="data.stats .*nowhere.npz does not exist"):
        datastats.load_stats(DataConfig(root=str(root), stats=str(tmp_path / "nowhere.npz")))
