"""Random images on the device: a data source for benchmarks and model tests (no DALI needed)."""

from __future__ import annotations

import numpy as np
import torch

from repro.config import DataConfig
from repro.data.folders import DataError
from repro.net.dist import Layout

# The spread of mean-subtracted 0-255 pixels: ImageNet's channel std is ~0.226 * 255.
_SYNTHETIC_STD = 58.0
_SYNTHETIC_EVAL_BATCHES = 4


def finish_batch(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


class SyntheticLoader:
    """Random images and labels made once on the device; every step yields the same batch.

    For benchmarks and model tests: no files, no decoding. Draws depend on (seed, replica)
    only, so the tower ranks of a replica agree without an exchange.
    """

    def __init__(
        self,
        cfg: DataConfig,
        layout: Layout,
        batch_size: int,
        seed: int,
        num_classes: int,
        channels_last: bool,
        views: int = 1,
    ):
        if batch_size < 1 or cfg.synthetic_images < batch_size * layout.replicas:
            raise DataError(
                f"data.synthetic_images ({cfg.synthetic_images}) must hold at least one global "
                f"batch of {batch_size} x {layout.replicas} replica(s), and the batch must be >= 1"
            )
        rng = np.random.default_rng([seed, layout.replica])
        shape = (batch_size * views, 3, cfg.crop, cfg.crop)
        images = torch.from_numpy(rng.standard_normal(shape, np.float32) * _SYNTHETIC_STD)
        self._images = finish_batch(images.to(layout.device), channels_last)
        labels = rng.integers(0, num_classes, batch_size)
        self._labels = torch.from_numpy(labels).to(layout.device)
        self.class_names = [str(i) for i in range(num_classes)]
        self.steps_per_epoch = cfg.synthetic_images // (batch_size * layout.replicas)
        self.num_images = batch_size * _SYNTHETIC_EVAL_BATCHES

    def epoch(self, epoch: int, start_step: int = 0, lighting: bool = True):
        for _ in range(start_step, self.steps_per_epoch):
            yield self._images, self._labels

    def __len__(self) -> int:
        return _SYNTHETIC_EVAL_BATCHES

    def __iter__(self):
        for _ in range(_SYNTHETIC_EVAL_BATCHES):
            yield self._images, self._labels
