"""Data benchmark: images/s of the DALI training loader against a torch DataLoader, alternated.

Both do the same work per image on the same files with the same number of CPU workers (DALI
threads / DataLoader worker processes): decode, shorter side to 256, central 256 square,
random 224 patch, random flip, per-pixel mean subtracted, PCA lighting, a float32 CHW batch.
The DataLoader side decodes with PIL and resizes and crops with torchvision's functional
transforms, as torchvision's ImageNet recipe does.

The contenders take turns, round by round (the first of a round rotates), so background
load on a shared machine falls on all of them alike. A round times `--batches` batches after
one warm-up batch, from a fresh iterator; between rounds DALI's batches in flight are drained
and the DataLoader's workers stopped, so no contender works while another is timed. Reported:
the median images/s over the rounds with min-max, per core (images/s / workers), the CPU
time per image (this process's threads and the DataLoader's workers over the timed batches:
unlike images/s it hardly moves when other jobs share the cores), and the ratios DALI /
DataLoader from each round's pair.

    python launch/bench.py data --workers 2                  # makes 256 JPEGs of 500x375 first
    python launch/bench.py data --prepared --workers 2       # ... and their 256x256 store
    python launch/bench.py data --root data/flowers --wait configs/flowers.yaml
    python launch/bench.py data --root .cache/digits --wait configs/demo.yaml   # the demo

`--wait CONFIG` trains CONFIG's net (its model, data settings and batch) for a few steps on
the DALI loader over the same folder and reports the share of each step spent waiting for
the next batch (`--root .cache/digits --wait configs/demo.yaml`: the demo itself).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torchvision.transforms import functional as tvf
from tqdm import tqdm

from repro.bench import kit
from repro.config import DataConfig, load_config
from repro.data import augment
from repro.data import loaders as data
from repro.data.folders import DataError
from repro.data.stats import imagenet_stats
from repro.net.dist import single_process_layout

EXAMPLE = """examples:
  python launch/bench.py data --workers 2                # 256 natural-looking 500x375 JPEGs
  python launch/bench.py data --prepared --rounds 10     # also their 256x256 store
  python launch/bench.py data --root data/flowers --wait configs/flowers.yaml"""


def make_jpegs(
    root: str | Path, images: int = 256, size: tuple[int, int] = (500, 375), seed: int = 0
) -> Path:
    """`images` natural-looking JPEGs (smooth gradients and soft shapes, quality 90) of size
    (w, h) in 8 class folders under root/train."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in tqdm(range(images), desc="writing JPEGs", unit="img"):
        folder = root / "train" / f"class{i % 8}"
        folder.mkdir(parents=True, exist_ok=True)
        c0, c1, angle = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3), rng.uniform(0, 6.3)
        t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h + 1)[..., None] / 2
        image = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(8):
            x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(min(10, w / 4), w / 4)
            colour = tuple(int(v) for v in rng.uniform(0, 255, 3))
            draw.ellipse([x - r, y - 0.7 * r, x + r, y + 0.7 * r], fill=colour)
        image.filter(ImageFilter.GaussianBlur(2)).save(folder / f"{i:05d}.jpg", quality=90)
    return root


class AugmentedFiles(torch.utils.data.Dataset):
    """The DALI training graph's work, one image at a time in a DataLoader worker."""

    def __init__(self, paths, labels, resize: int, crop: int, sigma: float, seed: int = 0):
        self.paths, self.labels, self.resize, self.crop = paths, labels, resize, crop
        imagenet = imagenet_stats(resize)  # what the DALI side is given too
        self.mean = torch.from_numpy(imagenet["mean_image"]).permute(2, 0, 1)  # (3, H, W)
        self.basis = augment.lighting_basis(imagenet["eigval"], imagenet["eigvec"])
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


class DaliContender:
    """repro's DALI training loader; a round reads on from where the last one stopped."""

    kind = "DALI, CPU decode"

    def worker_pids(self) -> list[int]:
        return []  # DALI's threads are this process's

    def __init__(self, root: Path, workers: int, batch: int):
        # ImageNet's constants, as the DataLoader side uses, whatever statistics file the folder
        # holds (the demo's is for resize 72, not this bench's 256): the same work either way.
        self._stats_dir = tempfile.TemporaryDirectory(prefix="repro-bench-stats-")
        stats = Path(self._stats_dir.name) / "imagenet.npz"
        np.savez(stats, **imagenet_stats(DataConfig().resize))
        cfg = DataConfig(
            root=str(root), threads=workers, decode="cpu", mean="image", stats=str(stats)
        )
        self.loader = data.build_train_loader(cfg, single_process_layout(), batch, seed=0)
        self.stored = self.loader.stored
        self.epoch, self.step = 0, 0

    @contextlib.contextmanager
    def round(self):
        batches = self._batches()
        yield batches
        batches.close()
        self.loader.drain()  # the batches still in flight finish here, untimed

    def _batches(self):
        while True:
            for item in self.loader.epoch(self.epoch, self.step):
                self.step += 1
                if self.step == self.loader.steps_per_epoch:
                    self.epoch, self.step = self.epoch + 1, 0
                yield item


class TorchContender:
    """A torchvision DataLoader doing the same work; its workers live for one round."""

    kind = "DataLoader, torchvision"

    def __init__(self, root: Path, workers: int, batch: int):
        paths, labels, _ = data.scan_class_folders(root / "train")
        dataset = AugmentedFiles(paths, labels, 256, 224, 0.1)
        self.make = lambda: torch.utils.data.DataLoader(
            dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
            persistent_workers=workers > 0,  # an epoch boundary inside a round: same workers
        )  # fmt: skip
        self.loader = None

    def worker_pids(self) -> list[int]:
        iterator = getattr(self.loader, "_iterator", None)
        return [w.pid for w in getattr(iterator, "_workers", [])]

    @contextlib.contextmanager
    def round(self):
        self.loader = self.make()

        def forever():
            while True:
                yield from self.loader

        batches = forever()
        yield batches
        batches.close()
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None:  # stop the workers: nothing runs while another is timed
            iterator._shutdown_workers()
        self.loader = None


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) of this process, all its threads, and the live processes pids."""
    total = time.process_time()  # every thread of this process, at the clock's resolution
    tick = os.sysconf("SC_CLK_TCK")  # /proc counts the workers' time in these (10 ms)
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def _time_round(contender, batches: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) over `batches` batches after one warm-up batch.

    The CPU time counts this process (DALI's threads, the normalisation, the DataLoader's
    collation) and the DataLoader's workers over the timed batches: unlike images/s it hardly
    moves when other jobs load the machine.
    """
    with contender.round() as it:
        next(it)  # warm-up: worker start, first decode
        pids = contender.worker_pids()
        start, cpu0, images = time.perf_counter(), _cpu_seconds(pids), 0
        for _, (x, _) in zip(range(batches), it):
            images += len(x)
        wall, cpu = time.perf_counter() - start, _cpu_seconds(pids) - cpu0
        return images / wall, 1e3 * cpu / images


def alternate(contenders: dict, rounds: int, batches: int) -> dict[str, list[tuple]]:
    """{name: (images/s, CPU ms per image) of each round}; contenders take turns, the first
    rotating per round."""
    names = list(contenders)
    figures: dict[str, list[tuple]] = {name: [] for name in names}
    for r in tqdm(range(rounds), desc="rounds", unit="round"):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            figures[name].append(_time_round(contenders[name], batches))
    return figures


def data_wait(config: str, root: str | None, steps: int, batch: int = 0) -> dict:
    """Share of each training step spent waiting for the batch: CONFIG's net on its data
    (or on `root`), at the config's batch size (or `batch`)."""
    from repro.net.model import AlexNet
    from repro.run.optim import build_optimizer

    cfg = load_config(config)
    if root:  # a class-folder tree (train/<class>/...), whatever the config's source
        data_cfg = dataclasses.replace(cfg.data, root=root, source="folders", val_labels="")
        cfg = dataclasses.replace(cfg, data=data_cfg)
    if batch:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch))
    layout = single_process_layout(cfg.model.towers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = data.build_train_loader(cfg.data, layout, cfg.train.batch_size, seed=0)
    model = AlexNet(dataclasses.replace(cfg.model, num_classes=len(loader.class_names)), layout)
    optimizer = build_optimizer(model, cfg.optim)
    waits, totals = [], []
    batches = (item for epoch in range(10**6) for item in loader.epoch(epoch))
    for step in range(steps + 1):  # step 0: warm-up
        begin = time.perf_counter()
        images, labels = next(batches)
        got = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:
            waits.append(got - begin)
            totals.append(time.perf_counter() - begin)
    batches.close()
    return {
        "config": config,
        "root": cfg.data.root,
        "batch": cfg.train.batch_size,
        "steps": steps,
        "step_s": kit.spread(totals),
        "wait_share": sum(waits) / sum(totals),
        "wait_s": kit.spread(waits),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLE
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--root", help="data set with train/<class>/*.jpg (default: make one)")
    parser.add_argument(
        "--images", type=kit.at_least(1), default=256, help="JPEGs to make without --root"
    )
    parser.add_argument(
        "--size", type=kit.at_least(1), nargs=2, default=(500, 375), metavar=("W", "H")
    )
    parser.add_argument("--prepared", action="store_true", help="also the 256x256 store of it")
    parser.add_argument("--workers", type=kit.at_least(1), default=os.cpu_count() or 1)
    parser.add_argument("--batch", type=kit.at_least(1), default=64)
    parser.add_argument("--rounds", type=kit.at_least(1), default=10, help="alternated rounds")
    parser.add_argument(
        "--batches", type=kit.at_least(1), default=4, help="timed batches per round"
    )
    parser.add_argument("--wait", nargs="*", default=[], metavar="CONFIG", help="data-wait share")
    parser.add_argument(
        "--wait-steps", type=kit.at_least(1), default=10, help="timed steps of --wait"
    )
    parser.add_argument(
        "--wait-batch", type=kit.at_least(0), default=0, help="batch of --wait (0: config's)"
    )
    parser.add_argument("--out", default="runs/bench/data.json", help="JSON file of the figures")


def run(args: argparse.Namespace) -> dict:
    if not args.root and args.images < args.batch:  # else the loaders' line names train.*
        raise DataError(
            f"--images {args.images} cannot fill one --batch {args.batch}: "
            f"give --images {args.batch} or more, or --batch {args.images} or less"
        )
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        made_root = Path(tmp) / "originals"
        root = (
            Path(args.root) if args.root else make_jpegs(made_root, args.images, tuple(args.size))
        )
        sets = {"originals": root}
        if args.prepared:
            from repro.data.store import resize_store

            sets["256x256 store"] = Path(tmp) / "store"
            resize_store(root, sets["256x256 store"], threads=args.workers, progress=True)
        contenders = {}
        for label, folder in sets.items():
            contenders[f"{DaliContender.kind} | {label}"] = DaliContender(
                folder, args.workers, args.batch
            )
            contenders[f"{TorchContender.kind} | {label}"] = TorchContender(
                folder, args.workers, args.batch
            )
        figures = alternate(contenders, args.rounds, args.batches)
        waits = [data_wait(c, str(root), args.wait_steps, args.wait_batch) for c in args.wait]
    return report(args, figures, waits)


def report(args: argparse.Namespace, figures: dict[str, list[tuple]], waits: list[dict]) -> dict:
    cores = min(args.workers, os.cpu_count() or 1)
    rows, results, ratios = [], {}, {}
    for name, per_round in figures.items():
        speed, cpu = [r[0] for r in per_round], [r[1] for r in per_round]
        s, c = kit.spread(speed), kit.spread(cpu)
        results[name] = {
            "images_per_s": s,
            "per_core": s["median"] / cores,
            "rounds": speed,
            "cpu_ms_per_image": c,
            "cpu_rounds": cpu,
        }
        rows.append([name, args.workers, args.batch, f"{s['median']:.0f}",
                     f"{s['min']:.0f}-{s['max']:.0f}", f"{s['median'] / cores:.0f}",
                     f"{c['median']:.2f}", f"{c['min']:.2f}-{c['max']:.2f}"])  # fmt: skip
    for name in figures:
        if name.startswith(DaliContender.kind):
            other = name.replace(DaliContender.kind, TorchContender.kind)
            label = name.split(" | ")[1]
            speed = [a[0] / b[0] for a, b in zip(figures[name], figures[other])]
            cpu = [b[1] / a[1] for a, b in zip(figures[name], figures[other]) if a[1] > 0]
            ratios[label] = {"images_per_s": kit.spread(speed), "cpu_per_image": kit.spread(cpu)}
    header = ["loader | data", "workers", "batch", "images/s", "min-max", "per core"]
    kit.print_table([*header, "CPU ms/img", "min-max"], rows)
    for label, r in ratios.items():
        s, c = r["images_per_s"], r["cpu_per_image"]
        print(
            f"DALI / DataLoader on {label}: {s['median']:.2f}x images/s (rounds "
            f"{s['min']:.2f}-{s['max']:.2f}); {c['median']:.2f}x less CPU per image "
            f"(rounds {c['min']:.2f}-{c['max']:.2f})"
        )
    crop = 224
    gathered = args.batch // 2 * 3 * crop * crop  # what a tower rank receives per step
    print(
        f"tower gather per rank per step at batch {args.batch}: {gathered / 1e6:.1f} MB as uint8 "
        f"({4 * gathered / 1e6:.1f} MB as float32 before)"
    )
    for w in waits:
        print(
            f"data wait, {w['config']} on {w['root']}: {100 * w['wait_share']:.1f}% of each step "
            f"(step {1e3 * w['step_s']['median']:.0f} ms, wait {1e3 * w['wait_s']['median']:.1f} ms)"
        )
    settings = {k: getattr(args, k) for k in ("workers", "batch", "rounds", "batches", "prepared")}
    result = {
        "loaders": results,
        "ratio_dali_over_dataloader": ratios,
        "gather_bytes_per_rank_step": {"uint8": gathered, "float32": 4 * gathered},
        "data_wait": waits,
        "settings": {**settings, "root": args.root, "images": args.images, "size": args.size},
        "context": kit.context(),  # machine, versions, git revision, load at start and end
    }
    kit.write_json(args.out, result)
    return result
