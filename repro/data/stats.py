"""Training-set statistics the pipelines need: the mean image (§2) and the RGB PCA (§4.1).

Both are taken over the pixels the network is fed from: each training image decoded,
shorter side rescaled to `resize`, central resize x resize square (the same DALI graph as
training, repro/data/pipelines.py `square_pipeline`).

- `mean_image` (resize, resize, 3) float32, 0-255: the per-pixel mean of those squares;
  `mean_channel` (3,), 0-255: its average over pixels.
- `eigval` (3,), descending, and `eigvec` (3, 3) whose column i is the eigenvector of
  eigval[i]: the eigen-decomposition of the 3x3 covariance of RGB values scaled to [0, 1],
  as the widely used ImageNet constants are written. Lighting in 0-255 pixels is
  255 * eigvec @ (alpha * eigval) (repro/data/pipelines.py `lighting_basis`). An eigenvector's
  sign is arbitrary; the noise is symmetric, so it does not matter.

`compute_stats(root)` writes `<root>/stats.npz`; `load_stats(cfg)` reads it back, or falls
back to the ImageNet constants of PAPER.md §3 with a warning.
Command line: `python -m repro.data.stats ROOT [--sample N] [--resize 256]`.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from repro.config import DataConfig, ReproWarning
from repro.data import imagecheck
from repro.data.folders import DataError
from repro.data.index import load_index

# PAPER.md §3: ImageNet RGB in [0, 1]; eigvec rows as published, columns are eigenvectors.
IMAGENET_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
IMAGENET_EIGVEC = np.array(
    [
        [-0.5675, 0.7192, 0.4009],
        [-0.5808, -0.0045, -0.8140],
        [-0.5836, -0.6948, 0.4203],
    ]
)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406]) * 255.0
STATS_NAME = "stats.npz"


def compute_stats(
    root: str | Path,
    out: str | Path | None = None,
    sample: int = 0,
    resize: int = 256,
    seed: int = 0,
    threads: int = 4,
    batch: int = 64,
    progress: bool = True,
    max_pixels: int = imagecheck.MAX_PIXELS,
) -> dict:
    """Mean image, channel mean and RGB PCA of root/train; saved to `out` (default <root>/stats.npz).

    sample > 0 uses that many training images drawn without replacement from `seed`;
    0 uses all of them. The files are the loaders' (the same index, bad files skipped with
    a warning); a folder already at resize x resize (the 256x256 store) is decoded as it is.
    """
    from repro.data import pipelines  # DALI: only when statistics are computed

    root = Path(root)
    target = Path(out) if out is not None else root / STATS_NAME
    target.parent.mkdir(parents=True, exist_ok=True)  # before the work, not after it
    index = load_index(root / "train", root, False, max_pixels)
    good = [i for i in range(len(index.paths)) if i not in index.reasons]
    paths = [str(root / "train" / index.paths[i]) for i in good]
    if 0 < sample < len(paths):
        chosen = np.sort(np.random.default_rng(seed).choice(len(paths), sample, replace=False))
        paths, good = [paths[i] for i in chosen], [good[i] for i in chosen]
    if not paths:
        raise DataError(f"no readable training images in {root / 'train'}")
    stored = bool((index.sizes[good] == resize).all())  # the 256x256 store: no resize pass

    runner = pipelines.FedPipeline(
        pipelines.square_pipeline,
        dict(decode="cpu", resize=resize, stored=stored),
        batch,
        threads,
        torch.device("cpu"),
        gpu=False,
    )
    chunks = [paths[i : i + batch] for i in range(0, len(paths), batch)]
    pixel_sum = np.zeros((resize, resize, 3))  # float64 sums: 1e11 pixels stay exact enough
    outer = np.zeros((3, 3))
    bar = tqdm(total=len(paths), desc="image statistics", unit="img", disable=not progress)
    for squares in runner.run(({}, chunk) for chunk in chunks):
        x = squares.numpy().astype(np.float64)  # (n, resize, resize, 3), 0-255
        pixel_sum += x.sum(axis=0)
        rgb = x.reshape(-1, 3) / 255.0
        outer += rgb.T @ rgb
        bar.update(len(x))
    bar.close()

    count = len(paths)
    mean_image = pixel_sum / count
    mean01 = mean_image.reshape(-1, 3).mean(axis=0) / 255.0
    cov = outer / (count * resize * resize) - np.outer(mean01, mean01)
    eigval, eigvec = np.linalg.eigh(cov)  # ascending
    # A covariance is positive semi-definite; rounding can leave -2e-17 for a flat direction
    # (a grey data set), which would print as a negative variance: clip at 0.
    eigval = np.clip(eigval, 0.0, None)
    order = np.argsort(eigval)[::-1]
    stats = {
        "eigval": eigval[order],
        "eigvec": eigvec[:, order],
        "mean_image": mean_image.astype(np.float32),
        "mean_channel": mean01 * 255.0,
        "cov": cov,
        "resize": np.int64(resize),
        "images": np.int64(count),
    }
    # A name of this process's own: two ranks computing the same file must not share a tmp.
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **stats)
    tmp.replace(target)
    stats["path"] = str(target)
    return stats


def _stats_path(cfg: DataConfig) -> Path | None:
    if cfg.stats:
        path = Path(cfg.stats)
        if not path.is_file():
            raise DataError(
                f"data.stats {path} does not exist; write it with "
                "`python launch/prepare_data.py stats ROOT --out PATH`, or leave data.stats empty"
            )
        return path
    path = Path(cfg.root) / STATS_NAME
    return path if cfg.root and path.is_file() else None


def imagenet_stats(resize: int) -> dict[str, np.ndarray]:
    """The ImageNet constants of PAPER.md §3 in load_stats' form: the mean image is the channel
    mean at every pixel of a resize x resize square."""
    return {
        "eigval": IMAGENET_EIGVAL.copy(),
        "eigvec": IMAGENET_EIGVEC.copy(),
        "mean_channel": IMAGENET_MEAN.copy(),
        "mean_image": np.broadcast_to(IMAGENET_MEAN, (resize, resize, 3)).astype(np.float32),
    }


def load_stats(cfg: DataConfig) -> dict:
    """eigval (3,), eigvec (3, 3), mean_image (resize, resize, 3) and mean_channel (3,), 0-255.

    From `data.stats`, else <root>/stats.npz; without either, the ImageNet constants of
    PAPER.md §3 with a warning (the mean image is then the channel mean at every pixel).
    """
    path = _stats_path(cfg)
    if path is None:
        warnings.warn(
            f"no statistics file {Path(cfg.root) / STATS_NAME}: using ImageNet's PCA and "
            "channel mean (a flat mean image); compute this data set's with "
            f"`python launch/prepare_data.py stats {cfg.root or 'ROOT'} --resize {cfg.resize}`",
            ReproWarning,
            stacklevel=2,
        )
        return {**imagenet_stats(cfg.resize), "path": None}
    with np.load(path) as z:
        stats = {k: z[k] for k in ("eigval", "eigvec", "mean_channel", "mean_image")}
    if stats["mean_image"].shape != (cfg.resize, cfg.resize, 3):
        raise DataError(
            f"{path} holds a mean image of shape {stats['mean_image'].shape} but data.resize is "
            f"{cfg.resize}: recompute it with "
            f"`python launch/prepare_data.py stats ROOT --resize {cfg.resize}`"
        )
    stats["path"] = str(path)
    return stats


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="data set folder holding train/<class>/*")
    parser.add_argument("--out", default=None, help="output .npz (default ROOT/stats.npz)")
    parser.add_argument("--sample", type=int, default=0, help="images to use (0: all)")
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args(argv)
    stats = compute_stats(
        args.root, args.out, args.sample, args.resize, args.seed, threads=args.threads
    )
    np.set_printoptions(precision=4, suppress=True)
    print(f"{stats['images']} images -> {stats['path']}")
    print(f"eigval {stats['eigval']}\neigvec\n{stats['eigvec']}\nmean {stats['mean_channel']}")


if __name__ == "__main__":
    main()
