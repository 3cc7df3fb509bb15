"""Batches for training and evaluation: sharding, the towers' shared batch, normalisation.

Which files are read, and how their labels are found, is repro/data/sets.py; the layouts
('folders', 'imagenet', 'digits') are described there. 'synthetic' gives random tensors made
once on the device (repro/data/synthetic.py), without DALI.

Sharding (DESIGN.md, Data). An epoch visits the training files in a permutation drawn from
(seed, epoch). Global step s covers epoch positions [s*B, (s+1)*B), B = b * replicas;
replica r takes [s*B + r*b, s*B + (r+1)*b). The T tower ranks of a replica each decode a
1/T share of it and all-gather the uint8 patches (b x 3 x 224 x 224 bytes per step, a
quarter of float32), so both towers see the identical batch; then every rank subtracts the
mean image and the per-image offset itself (repro/data/augment.py), from draws it can make
for the whole batch. Every random choice is a function of (seed, epoch, position), so the
batch does not depend on how the work is split. A share may be uneven or empty (b not a
multiple of T, the last validation batch): shares are padded to equal size for the gather
and trimmed after. Labels are not exchanged: every rank knows the files of the whole replica
batch. An epoch has len(train) // B steps: the last partial batch is dropped.

Resume: `epoch(e, start_step=k)` yields exactly the batches k, k+1, ... that `epoch(e)`
yields, with no state carried between calls, so a run restarted at (e, k) continues as the
uninterrupted one would.

Evaluation: replicas split the validation set into disjoint contiguous shards covering
every image once; the last partial batch is kept.

DALI (repro/data/pipelines.py) is imported only by the loaders that decode images, so the
model, the synthetic source and the benchmarks run without it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist

from repro.config import DataConfig, batch_unit
from repro.data import augment
from repro.data.folders import DataError, ImageSet, class_folders, scan_class_folders
from repro.data.sets import root_of, train_set, val_set
from repro.data.synthetic import SyntheticLoader, finish_batch
from repro.net.dist import Layout

__all__ = ["DataError", "build_eval_loader", "build_train_loader", "scan_class_folders"]
__all__ += ["EvalLoader", "TrainLoader", "train_set", "val_set"]

SOURCES = ("folders", "imagenet", "digits", "synthetic")


def dali_pipelines():
    """repro.data.pipelines, or one DataError saying how to install DALI."""
    try:
        from repro.data import pipelines
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("nvidia"):
            raise
        raise DataError(
            "decoding images needs NVIDIA DALI, which is not installed: pip install "
            "nvidia-dali-cuda130 (or nvidia-dali-cuda120 for CUDA 12; it runs on CPU too), "
            "or set data.source=synthetic"
        ) from None
    return pipelines


def _check_cfg(cfg: DataConfig) -> None:
    if cfg.source not in SOURCES:
        raise DataError(f"data.source must be one of {SOURCES}, got {cfg.source!r}")
    if cfg.mean not in ("image", "channel", "none"):
        raise DataError(f"data.mean must be 'image', 'channel' or 'none', got {cfg.mean!r}")
    if cfg.decode not in ("auto", "cpu", "mixed"):
        raise DataError(f"data.decode must be 'auto', 'cpu' or 'mixed', got {cfg.decode!r}")
    if not 1 <= cfg.crop <= cfg.resize:
        raise DataError(f"need 1 <= data.crop <= data.resize, got {cfg.crop} and {cfg.resize}")
    if cfg.lighting_std < 0:
        raise DataError(f"data.lighting_std must be >= 0, got {cfg.lighting_std}")


def _decode_device(cfg: DataConfig, device: torch.device) -> str:
    """DALI's decoder placement: 'mixed' (GPU decode) or 'cpu'."""
    if cfg.decode == "mixed" and device.type != "cuda":
        raise DataError(f"data.decode 'mixed' decodes on a GPU but this rank runs on {device}")
    gpu = cfg.decode == "mixed" or (cfg.decode == "auto" and device.type == "cuda")
    return "mixed" if gpu else "cpu"


def _normalisation(cfg: DataConfig):
    """(mean image or None, channel mean (3,), lighting basis (3, 3)) in 0-255 units."""
    zeros = np.zeros(3)
    if cfg.mean == "none" and cfg.lighting_std == 0:
        return None, zeros, np.zeros((3, 3))
    from repro.data.stats import load_stats

    stats = load_stats(cfg)
    basis = augment.lighting_basis(stats["eigval"], stats["eigvec"])
    if cfg.mean == "image":
        return stats["mean_image"], zeros, basis
    return None, (stats["mean_channel"] if cfg.mean == "channel" else zeros), basis


def is_store(images: ImageSet, resize: int) -> bool:
    """True when every image is already resize x resize (the paper's store, §2)."""
    sizes = images.sizes
    return sizes is not None and len(sizes) > 0 and bool((sizes == resize).all())


def _fed(cfg: DataConfig, layout: Layout, pipeline: str, batch: int, images: ImageSet, **args):
    pipelines = dali_pipelines()
    decode = _decode_device(cfg, layout.device)
    stored = is_store(images, cfg.resize)
    args = dict(decode=decode, resize=cfg.resize, crop=cfg.crop, stored=stored, **args)
    graph = getattr(pipelines, pipeline)
    gpu = decode == "mixed"
    return pipelines.FedPipeline(graph, args, batch, cfg.threads, layout.device, gpu=gpu)


def _shares(n: int, towers: int) -> list[int]:
    """Sizes of the T tower ranks' shares of an n-image batch, as even as possible."""
    return [n // towers + (t < n % towers) for t in range(towers)]


def _gather(local: torch.Tensor | None, sizes: list[int], layout: Layout, shape) -> torch.Tensor:
    """Concatenate the tower ranks' uint8 shares in tower order; share t has sizes[t] * views rows."""
    rows = [s * shape[0] for s in sizes]
    if local is None:
        local = torch.empty((0, *shape[1:]), dtype=torch.uint8, device=layout.device)
    local = local.to(layout.device, non_blocking=True).reshape(-1, *shape[1:])
    if layout.tower_group is None:
        return local
    padded = local.new_zeros((max(rows), *shape[1:]))  # list all_gather needs equal shapes
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=layout.tower_group)
    return torch.cat([p[:r] for p, r in zip(parts, rows)])


class TrainLoader:
    """Training batches from image files: see the module docstring for order and sharding."""

    def __init__(self, cfg, layout, images: ImageSet, batch_size, seed, channels_last):
        if batch_size < 1:
            raise DataError(f"batch size per replica must be >= 1, got {batch_size}")
        if seed < 0:
            raise DataError(f"seed must be >= 0 (it seeds numpy generators), got {seed}")
        self.cfg, self.layout, self.images, self.seed = cfg, layout, images, seed
        self.batch_size = batch_size
        self.global_batch = batch_size * layout.replicas
        self.steps_per_epoch = len(images.paths) // self.global_batch
        if self.steps_per_epoch == 0:
            n = len(images.paths)
            unit = batch_unit(layout.towers, layout.replicas, layout.parallel)
            fix = (
                f"set train.batch_size={n - n % unit} or lower (a multiple of {unit})"
                if n >= unit
                else f"the smallest train.batch_size this layout can split is {unit}: add "
                "training images, or run fewer ranks"
            )
            raise DataError(
                f"{images.root}: {n} training images cannot fill one global batch of "
                f"train.batch_size = {self.global_batch}; {fix}"
            )
        self.class_names = images.class_names
        self.channels_last = channels_last
        mean_image, channel_mean, self._basis = _normalisation(cfg)
        self._norm = augment.Normalizer(mean_image, channel_mean, cfg.crop, layout.device)
        self._sizes = _shares(batch_size, layout.tower_size)
        self._start = sum(self._sizes[: layout.tower_rank])  # this rank's share in the batch
        self.stored = is_store(images, cfg.resize)  # the 256x256 store: no resize pass
        self._runner = _fed(cfg, layout, "train_pipeline", max(self._sizes), images)
        self._draws: tuple[int, augment.EpochDraws] | None = None

    def _epoch_draws(self, epoch: int) -> augment.EpochDraws:
        if self._draws is None or self._draws[0] != epoch:
            span = self.cfg.resize - self.cfg.crop
            draws = augment.EpochDraws.draw(self.seed, epoch, len(self.images.paths), span)
            self._draws = (epoch, draws)
        return self._draws[1]

    def drain(self) -> None:
        """Wait for the batches DALI still decodes for an abandoned epoch, and drop them."""
        self._runner.drain()

    def epoch(
        self, epoch: int, start_step: int = 0, lighting: bool = True
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images (b, 3, crop, crop) float32, labels (b,) int64) for steps start_step.. of an epoch."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise DataError(f"start_step must be in 0..{self.steps_per_epoch}, got {start_step}")
        from repro.data.pipelines import CROP_X, CROP_Y, MIRROR  # DALI: imported by _fed already

        cfg, b, paths = self.cfg, self.batch_size, self.images.paths
        order = augment.epoch_order(self.seed, epoch, len(paths))
        draws = self._epoch_draws(epoch)
        first = self.layout.replica * b  # this replica's offset inside a global batch
        sigma = cfg.lighting_std if lighting else 0.0
        own = np.arange(b)[self._start : self._start + self._sizes[self.layout.tower_rank]]
        span = cfg.resize - cfg.crop

        def feed():  # this rank's share: positions, crop anchors, mirror flags, file names
            for step in range(start_step, self.steps_per_epoch):
                positions = own + step * self.global_batch + first
                offsets, mirror, _ = draws.take(positions, cfg.flip, 0.0, self._basis)
                x, y = augment.crop_positions(offsets, span)
                inputs = {CROP_X: x, CROP_Y: y, MIRROR: mirror.astype(np.int32)}
                yield inputs, [paths[i] for i in order[positions]]

        shape = (1, 3, cfg.crop, cfg.crop)
        for step, local in zip(range(start_step, self.steps_per_epoch), self._runner.run(feed())):
            patches = _gather(local, self._sizes, self.layout, shape)  # (b, 3, c, c) uint8
            positions = np.arange(b) + step * self.global_batch + first
            images = self._norm.train(patches, *draws.take(positions, cfg.flip, sigma, self._basis))
            labels = torch.from_numpy(self.images.labels[order[positions]])
            yield (
                finish_batch(images, self.channels_last),
                labels.to(self.layout.device, non_blocking=True),
            )


class EvalLoader:
    """Validation batches of this replica's shard: centre patch or the 10 patches (§4.1)."""

    def __init__(self, cfg, layout, images: ImageSet, batch_size, patches, channels_last):
        if patches not in ("center", "ten"):
            raise DataError(f"patches must be 'center' or 'ten', got {patches!r}")
        if batch_size < 1:
            raise DataError(f"batch size per replica must be >= 1, got {batch_size}")
        n = len(images.paths)
        r, replicas = layout.replica, layout.replicas
        self._lo, self._hi = r * n // replicas, (r + 1) * n // replicas
        self.num_images = self._hi - self._lo
        self.class_names = images.class_names
        self.cfg, self.layout, self.images, self.batch_size = cfg, layout, images, batch_size
        self.patches, self.channels_last = patches, channels_last
        mean_image, channel_mean, _ = _normalisation(cfg)
        self._norm = augment.Normalizer(mean_image, channel_mean, cfg.crop, layout.device)
        largest_share = -(-batch_size // layout.tower_size)
        self._runner = _fed(cfg, layout, "eval_pipeline", largest_share, images, patches=patches)
        self._views = augment.view_offsets(patches, cfg.resize - cfg.crop)

    def __len__(self) -> int:
        return -(-self.num_images // self.batch_size)

    def _batches(self):
        """(first image, images, tower shares, this rank's first image) of each batch."""
        for start in range(self._lo, self._hi, self.batch_size):
            n = min(self.batch_size, self._hi - start)
            sizes = _shares(n, self.layout.tower_size)
            yield start, n, sizes, start + sum(sizes[: self.layout.tower_rank])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = list(self._batches())
        t, paths = self.layout.tower_rank, self.images.paths
        feed = (({}, paths[own : own + sizes[t]]) for _, _, sizes, own in batches)
        shape = (len(self._views), 3, self.cfg.crop, self.cfg.crop)
        for (start, n, sizes, _), local in zip(batches, self._runner.run(feed)):
            patches = _gather(local, sizes, self.layout, shape)  # (n * views, 3, c, c) uint8
            images = self._norm.views(patches, self._views)
            labels = torch.from_numpy(self.images.labels[start : start + n])
            yield (
                finish_batch(images, self.channels_last),
                labels.to(self.layout.device, non_blocking=True),
            )


def build_train_loader(
    cfg: DataConfig,
    layout: Layout,
    batch_size: int,
    seed: int,
    channels_last: bool = False,
    num_classes: int = 1000,
) -> TrainLoader | SyntheticLoader:
    """Training batches of `batch_size` per replica; `num_classes` is for source 'synthetic' only."""
    _check_cfg(cfg)
    if cfg.source == "synthetic":
        return SyntheticLoader(cfg, layout, batch_size, seed, num_classes, channels_last)
    dali_pipelines()  # the one clear error without DALI, before any scan
    return TrainLoader(cfg, layout, train_set(cfg, layout), batch_size, seed, channels_last)


def build_eval_loader(
    cfg: DataConfig,
    layout: Layout,
    batch_size: int,
    patches: str = "center",
    channels_last: bool = False,
    num_classes: int = 1000,
) -> EvalLoader | SyntheticLoader:
    """Validation batches of this replica's shard; 'ten' gives (b*10, 3, c, c), views of an image adjacent."""
    _check_cfg(cfg)
    if cfg.source == "synthetic":
        views = 10 if patches == "ten" else 1
        return SyntheticLoader(cfg, layout, batch_size, 0, num_classes, channels_last, views)
    dali_pipelines()
    classes = class_folders(root_of(cfg, layout) / "train")
    images = val_set(cfg, classes, layout)
    return EvalLoader(cfg, layout, images, batch_size, patches, channels_last)
