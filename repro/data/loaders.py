"""Batches for training and evaluation: data set layouts, sharding, the towers' shared batch.

Layouts (`DataConfig.source`):
- 'folders' / 'digits': root/train/<class>/*.{jpg,jpeg,png} and root/val/<class>/*; class
  order is the sorted folder names (`class_names`). 'digits' first writes scikit-learn's
  digits there when root/train is missing (repro.data.convert.write_digits).
- 'imagenet': root/train/<class>/* and, when `val_labels` is set, ImageNet's flat root/val/*
  with a label file in one of two formats:
    one integer per line, for the images in sorted file-name order, 1-based. The official
    ILSVRC2012_validation_ground_truth.txt holds ILSVRC2012 ids, which are not the sorted
    wnid order: when the devkit's meta.mat lies beside the file (or in root) the ids are
    mapped to wnids through it; without it, class folders named like wnids are an error,
    other class folders take id i as the i-th sorted class.
    or `file_name class_name` per line (class_name a training class folder).
  With `val_labels` empty, root/val/<class>/* as for 'folders' (a prepared ImageNet).
- 'synthetic': random tensors made once on the device; the same batch every step
  (`synthetic_images // B` steps per epoch; evaluation yields 4 batches).

Sharding (DESIGN.md, Data). An epoch visits the training files in a permutation drawn from
(seed, epoch). Global step s covers epoch positions [s*B, (s+1)*B), B = b * replicas;
replica r takes [s*B + r*b, s*B + (r+1)*b). The T tower ranks of a replica each decode a
1/T share of it and all-gather, so both towers see the identical batch; every random
choice is a function of (seed, epoch, position), so the batch does not depend on how the
work is split. A share may be uneven or empty (b not a multiple of T, the last
validation batch): shares are padded to equal size for the gather and trimmed after.
Labels are not exchanged: every rank knows the files of the whole replica batch. An epoch
has len(train) // B steps: the last partial batch is dropped.

Resume: `epoch(e, start_step=k)` yields exactly the batches k, k+1, ... that `epoch(e)`
yields, with no state carried between calls, so a run restarted at (e, k) continues as the
uninterrupted one would.

Evaluation: replicas split the validation set into disjoint contiguous shards covering
every image once; the last partial batch is kept.

Bad files: empty, non-image and truncated files (repro/data/imagecheck.py) and those listed in
<root>/bad_files.txt are skipped at build time with a warning naming each.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from repro.config import DataConfig
from repro.data import imagecheck
from repro.data.folders import DataError, ImageSet, class_folders, images_in, scan_class_folders
from repro.data.synthetic import SyntheticLoader, finish_batch
from repro.net.dist import Layout

SOURCES = ("folders", "imagenet", "digits", "synthetic")
_WNID = re.compile(r"^n\d{8}$")


def _pipelines():
    """repro.data.pipelines, imported only where images are decoded: the synthetic source,
    the model and the benchmarks run without DALI installed."""
    try:
        from repro.data import pipelines
    except ImportError as err:
        raise DataError(
            f"decoding images needs NVIDIA DALI, which does not import here ({err}); install "
            "nvidia-dali-cuda130 (or -cuda120) to match your CUDA, or use data.source=synthetic"
        ) from None
    return pipelines


def _root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise DataError(
            f"data.root is empty: set it to the data set folder (source {cfg.source!r})"
        )
    root = Path(cfg.root)
    if cfg.source == "digits" and not (root / "train").is_dir():
        try:  # lazy: needs scikit-learn
            from repro.data.convert import write_digits
        except ImportError:
            from repro.data.prepare import write_digits

        write_digits(root, val_fraction=cfg.val_fraction, seed=0)
    if cfg.source == "digits" and not cfg.stats and not (root / "stats.npz").is_file():
        # The demo set's own mean and PCA (§3: from the training set's pixels); 1.4k tiny
        # images take about a second, so the demo needs no separate preparation step.
        from repro.data.stats import compute_stats

        compute_stats(root, resize=cfg.resize, progress=False)
    if not root.is_dir():
        raise DataError(f"data.root {root} does not exist")
    return root


def _screened(root: Path, paths: list[str], labels: np.ndarray, classes: list[str], where: str):
    skipped = imagecheck.screen(paths, root, progress=len(paths) > 20000)
    imagecheck.warn_skipped(skipped, where)
    if skipped:
        drop = {p for p, _ in skipped}
        keep = np.array([p not in drop for p in paths], bool)
        paths = [p for p, k in zip(paths, keep) if k]
        labels = labels[keep]
    if len(paths) == 0:
        raise DataError(f"no readable images left in {where}")
    return ImageSet(root, paths, labels, classes)


def train_set(cfg: DataConfig) -> ImageSet:
    """The training images of root/train/<class>/*, bad files skipped."""
    root = _root(cfg)
    paths, labels, classes = scan_class_folders(root / "train")
    return _screened(root, paths, labels, classes, str(root / "train"))


def val_set(cfg: DataConfig, class_names: list[str]) -> ImageSet:
    """The validation images, labelled with the training classes' indices."""
    root = _root(cfg)
    val = root / "val"
    if cfg.val_labels:
        if not val.is_dir():
            raise DataError(f"validation folder {val} does not exist")
        paths = images_in(str(val))
        labels = _read_val_labels(cfg.val_labels, root, paths, class_names)
    else:
        if not val.is_dir():
            raise DataError(
                f"validation folder {val} does not exist: expected {val}/<class>/*.jpg, or a "
                "flat folder of images with data.val_labels set"
            )
        subdirs = [e for e in os.scandir(val) if e.is_dir()]
        if not subdirs and images_in(str(val)):
            raise DataError(
                f"{val} is a flat folder of images: set data.val_labels to its label file"
            )
        paths, local, val_classes = scan_class_folders(val)
        index = {name: i for i, name in enumerate(class_names)}
        unknown = [c for c in val_classes if c not in index]
        if unknown:
            raise DataError(
                f"validation class folder(s) {unknown[:5]} in {val} are not training classes "
                f"(training has {len(class_names)}: {class_names[:5]}...)"
            )
        labels = np.asarray([index[c] for c in val_classes], np.int64)[local]
    return _screened(root, paths, labels, class_names, str(val))


def _read_val_labels(
    label_file: str, root: Path, paths: list[str], class_names: list[str]
) -> np.ndarray:
    """Labels of the flat validation images from a label file (formats: module docstring)."""
    path = Path(label_file)
    if not path.is_file() and not path.is_absolute() and (root / path).is_file():
        path = root / path
    if not path.is_file():
        raise DataError(f"data.val_labels {label_file} not found (also tried {root / label_file})")
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    index = {name: i for i, name in enumerate(class_names)}
    if all(ln.isdigit() for ln in lines):
        if len(lines) != len(paths):
            raise DataError(
                f"{path} has {len(lines)} labels but {root / 'val'} holds {len(paths)} images: "
                "one label per image, in sorted file-name order"
            )
        ids = np.asarray([int(ln) for ln in lines], np.int64)
        wnid_of = _devkit_wnids(path, root)
        if wnid_of is not None:
            missing = sorted({wnid_of.get(i, f"id {i}") for i in ids} - index.keys())
            if missing:
                raise DataError(f"{path}: classes {missing[:5]} are not training classes")
            return np.asarray([index[wnid_of[i]] for i in ids], np.int64)
        if all(_WNID.match(c) for c in class_names):
            raise DataError(
                f"{path} holds integer labels and the classes are wnids: ILSVRC2012 ids do not "
                "follow sorted wnid order, so put the devkit's meta.mat beside the label file "
                f"or in {root}, or write the labels as 'file_name wnid' lines"
            )
        if ids.min() < 1 or ids.max() > len(class_names):
            raise DataError(
                f"{path}: labels must be 1..{len(class_names)} (1-based), got {ids.min()}..{ids.max()}"
            )
        return ids - 1
    by_name = {}
    for number, ln in enumerate(lines, 1):
        parts = ln.split(maxsplit=1)
        if len(parts) != 2 or parts[1] not in index:
            raise DataError(
                f"{path} line {number}: expected 'file_name class_name' with a training class "
                f"(e.g. {class_names[0]!r}) or one integer label per line, got {ln!r}"
            )
        by_name[parts[0]] = index[parts[1]]
    names = [os.path.basename(p) for p in paths]
    missing = [n for n in names if n not in by_name]
    if missing or len(by_name) != len(names):
        raise DataError(
            f"{path} labels {len(by_name)} files but {root / 'val'} holds {len(names)} images; "
            f"unlabelled: {missing[:5]}"
        )
    return np.asarray([by_name[n] for n in names], np.int64)


def _devkit_wnids(label_file: Path, root: Path) -> dict[int, str] | None:
    """ILSVRC2012 id -> wnid from the devkit's meta.mat, if one lies beside the labels or in root."""
    for meta in (label_file.parent / "meta.mat", root / "meta.mat"):
        if meta.is_file():
            from scipy.io import loadmat  # scipy comes with scikit-learn

            synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
            return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    return None


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
    basis = _pipelines().lighting_basis(stats["eigval"], stats["eigvec"])
    if cfg.mean == "image":
        return stats["mean_image"], zeros, basis
    return None, (stats["mean_channel"] if cfg.mean == "channel" else zeros), basis


def _fed(cfg: DataConfig, layout: Layout, pipeline, batch: int, **args):
    decode = _decode_device(cfg, layout.device)
    args = dict(decode=decode, resize=cfg.resize, crop=cfg.crop, **args)
    gpu = decode == "mixed"
    return _pipelines().FedPipeline(pipeline, args, batch, cfg.threads, layout.device, gpu=gpu)


def _shares(n: int, towers: int) -> list[int]:
    """Sizes of the T tower ranks' shares of an n-image batch, as even as possible."""
    return [n // towers + (t < n % towers) for t in range(towers)]


def _gather(local: torch.Tensor | None, sizes: list[int], layout: Layout, shape) -> torch.Tensor:
    """Concatenate the tower ranks' shares in tower order; each share's rows are sizes[t] * views."""
    rows = [s * shape[0] for s in sizes]
    if local is None:
        local = torch.empty((0, *shape[1:]), device=layout.device)
    local = local.reshape(-1, *shape[1:])
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
            raise DataError(
                f"{images.root}: {len(images.paths)} training images cannot fill one global "
                f"batch of {self.global_batch}; lower the batch size"
            )
        self.class_names = images.class_names
        self.channels_last = channels_last
        mean_image, self._channel_mean, self._basis = _normalisation(cfg)
        self._sizes = _shares(batch_size, layout.tower_size)
        self._start = sum(self._sizes[: layout.tower_rank])  # this rank's share in the batch
        self._runner = _fed(
            cfg, layout, _pipelines().train_pipeline, max(self._sizes), mean_image=mean_image
        )

    def epoch(
        self, epoch: int, start_step: int = 0, lighting: bool = True
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images (b, 3, crop, crop) float32, labels (b,) int64) for steps start_step.. of an epoch."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise DataError(f"start_step must be in 0..{self.steps_per_epoch}, got {start_step}")
        cfg, b = self.cfg, self.batch_size
        pipelines = _pipelines()
        order = pipelines.epoch_order(self.seed, epoch, len(self.images.paths))
        first = self.layout.replica * b  # this replica's offset inside a global batch
        sigma = cfg.lighting_std if lighting else 0.0
        own = slice(self._start, self._start + self._sizes[self.layout.tower_rank])

        def feed():
            for step in range(start_step, self.steps_per_epoch):
                positions = np.arange(b)[own] + step * self.global_batch + first
                inputs = pipelines.draw_train_inputs(
                    self.seed,
                    epoch,
                    positions,
                    cfg.resize,
                    cfg.crop,
                    cfg.flip,
                    sigma,
                    self._basis,
                    self._channel_mean,
                )
                yield inputs, [self.images.paths[i] for i in order[positions]]

        shape = (1, 3, cfg.crop, cfg.crop)
        for step, local in zip(range(start_step, self.steps_per_epoch), self._runner.run(feed())):
            images = _gather(local, self._sizes, self.layout, shape)
            start = step * self.global_batch + first
            # Labels need no exchange: every rank knows the whole replica batch's files.
            labels = torch.from_numpy(self.images.labels[order[start : start + b]])
            yield finish_batch(images, self.channels_last), labels.to(self.layout.device)


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
        self._runner = _fed(
            cfg,
            layout,
            _pipelines().eval_pipeline,
            -(-batch_size // layout.tower_size),  # the largest tower share
            mean_image=mean_image,
            channel_mean=tuple(map(float, channel_mean)),
            patches=patches,
        )

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
        views = 10 if self.patches == "ten" else 1
        shape = (views, 3, self.cfg.crop, self.cfg.crop)
        for (start, n, sizes, _), local in zip(batches, self._runner.run(feed)):
            images = _gather(local, sizes, self.layout, shape)  # (n * views, 3, c, c)
            labels = torch.from_numpy(self.images.labels[start : start + n])
            yield finish_batch(images, self.channels_last), labels.to(self.layout.device)


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
    _pipelines()  # images are decoded: without DALI, say so before anything else
    return TrainLoader(cfg, layout, train_set(cfg), batch_size, seed, channels_last)


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
    _pipelines()
    classes = class_folders(_root(cfg) / "train")
    return EvalLoader(cfg, layout, val_set(cfg, classes), batch_size, patches, channels_last)
