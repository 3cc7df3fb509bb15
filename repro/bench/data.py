"""Data benchmark: images/s of the DALI training pipeline against a torch DataLoader.

Both do the same work per image on the same JPEG files with the same number of CPU
workers (DALI threads / DataLoader worker processes): decode, shorter side to 256,
central 256 square, per-pixel mean subtracted, random 224 patch, random flip, PCA
lighting, float32 CHW batch. The DataLoader side decodes with PIL and resizes and crops
with torchvision's functional transforms, as torchvision's ImageNet recipe does.

    python launch/bench.py data                       # makes 512 JPEGs of 500x375 first
    python launch/bench.py data --root data/flowers --workers 8 --batch 128 --seconds 30

Prints one table and writes a JSON file with the figures, the machine, the versions and
the git revision. Timing starts after one warm-up batch (pipeline build, worker start).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as tvf
from tqdm import tqdm

from repro.config import DataConfig
from repro.data import augment
from repro.data import loaders as data
from repro.data.stats import IMAGENET_EIGVAL, IMAGENET_EIGVEC, IMAGENET_MEAN
from repro.net.dist import single_process_layout


def make_jpegs(
    root: str | Path, images: int = 512, size: tuple[int, int] = (500, 375), seed: int = 0
) -> Path:
    """images JPEGs of size (w, h) in 8 class folders under root/train; smooth colour fields
    plus noise, so that files are about as large as ImageNet's (~100 kB at 500x375)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    w, h = size
    for i in tqdm(range(images), desc="writing JPEGs", unit="img"):
        folder = root / "train" / f"class{i % 8}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.uniform(0, 255, (h // 25 + 2, w // 25 + 2, 3)).astype(np.uint8)
        field = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        noisy = np.asarray(field, np.int16) + rng.integers(-20, 21, (h, w, 3))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(
            folder / f"{i:05d}.jpg", quality=90
        )
    return root


class AugmentedFiles(torch.utils.data.Dataset):
    """The DALI training graph's work, one image at a time in a DataLoader worker."""

    def __init__(self, paths, labels, resize: int, crop: int, sigma: float, seed: int = 0):
        self.paths, self.labels, self.resize, self.crop = paths, labels, resize, crop
        self.mean = torch.from_numpy(np.broadcast_to(IMAGENET_MEAN, (resize, resize, 3)).copy())
        self.mean = self.mean.float().permute(2, 0, 1)
        self.basis = augment.lighting_basis(IMAGENET_EIGVAL, IMAGENET_EIGVEC)
        self.sigma, self.seed = sigma, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, i])
        with Image.open(self.paths[i]) as im:
            im = tvf.center_crop(tvf.resize(im.convert("RGB"), self.resize), self.resize)
            x = torch.from_numpy(np.array(im)).permute(2, 0, 1).float() - self.mean
        oy, ox = rng.integers(0, self.resize - self.crop + 1, 2)
        x = x[:, oy : oy + self.crop, ox : ox + self.crop]
        if rng.random() < 0.5:
            x = x.flip(-1)
        shift = self.basis @ (rng.standard_normal(3) * self.sigma)
        return (x + torch.from_numpy(shift).float()[:, None, None]).contiguous(), self.labels[i]


def _time(batches, n_batches: int, seconds: float, batch: int) -> dict:
    """Images/s over the batches after the first, stopping at n_batches or seconds."""
    it = iter(batches)
    next(it)  # warm-up: build, start workers, first decode
    start, images, done = time.perf_counter(), 0, 0
    for x, _ in it:
        images += len(x)
        done += 1
        if done >= n_batches or time.perf_counter() - start >= seconds:
            break
    elapsed = time.perf_counter() - start
    return {"images": images, "seconds": elapsed, "images_per_s": images / elapsed}


def _epochs(loader):
    for epoch in range(10**6):
        yield from loader.epoch(epoch)


def bench_dali(root: Path, workers: int, batch: int, n_batches: int, seconds: float) -> dict:
    cfg = DataConfig(root=str(root), threads=workers, decode="cpu", mean="image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no stats file: ImageNet's constants do the same work
        loader = data.build_train_loader(cfg, single_process_layout(), batch, seed=0)
    return _time(_epochs(loader), n_batches, seconds, batch)


def bench_torch(root: Path, workers: int, batch: int, n_batches: int, seconds: float) -> dict:
    paths, labels, _ = data.scan_class_folders(root / "train")
    dataset = AugmentedFiles(paths, labels, 256, 224, 0.1)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
        persistent_workers=workers > 0,
    )  # fmt: skip

    def batches():
        while True:
            yield from loader

    result = _time(batches(), n_batches, seconds, batch)
    return {**result, "implementation": "torchvision"}


def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).resolve().parent,
        )  # fmt: skip
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in (
        "torch",
        "torchvision",
        "nvidia-dali-cuda130",
        "nvidia-dali-cuda120",
        "numpy",
        "pillow",
    ):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", help="data set with train/<class>/*.jpg (default: make one)")
    parser.add_argument("--images", type=int, default=512, help="JPEGs to make without --root")
    parser.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40, help="timed batches at most")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds at most")
    parser.add_argument("--out", default="runs/bench/data.json", help="JSON file of the figures")


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root = Path(args.root) if args.root else make_jpegs(tmp, args.images, tuple(args.size))
        settings = {k: getattr(args, k) for k in ("workers", "batch", "batches", "seconds")}
        dali = bench_dali(root, args.workers, args.batch, args.batches, args.seconds)
        base = bench_torch(root, args.workers, args.batch, args.batches, args.seconds)
    result = {
        "dali": dali,
        "dataloader": base,
        "ratio": dali["images_per_s"] / base["images_per_s"],
        "settings": {**settings, "root": args.root, "images": args.images, "size": args.size},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "versions": _versions(),
        "git_revision": _git_revision(),
    }
    rows = [("DALI, CPU decode", dali), (f"DataLoader, {base['implementation']}", base)]
    print(f"{'pipeline':<40} {'workers':>7} {'batch':>5} {'images':>7} {'s':>6} {'images/s':>9}")
    for name, r in rows:
        print(
            f"{name[:40]:<40} {args.workers:>7} {args.batch:>5} {r['images']:>7} "
            f"{r['seconds']:>6.1f} {r['images_per_s']:>9.1f}"
        )
    print(f"DALI / DataLoader: {result['ratio']:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"figures written to {out}")
    return result
