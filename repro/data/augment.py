"""The random choices of §4.1 and the normalisation of §2, without DALI.

Draws. An epoch visits the n training files in `epoch_order(seed, epoch, n)`. The sample at
position p of the epoch gets a crop offset, a mirror flag and three PCA lighting
coefficients, each element p of its own numpy stream seeded with (seed, epoch, kind). A
numpy stream is consumed in order, so element p does not depend on how many elements are
drawn: the draws are a pure function of (seed, epoch, position), whoever decodes the sample
and whatever step the run resumed at. `EpochDraws` draws a whole epoch at once (about 60 ms
for ImageNet's 1.28M images, once per epoch), so a step only slices arrays: nothing runs
per sample in Python on the training thread.

Normalisation. DALI hands over uint8 patches (§4.1 crops, mirrored where drawn); after the
tower ranks have gathered them (4x fewer bytes than float32), `normalize_train` computes
patch - mean image under the patch - (channel mean - lighting shift), in float32, in the
same order of operations in every layout, so every layout gets the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Independent numpy streams per (seed, epoch): the order, and one stream per kind of draw.
_ORDER_STREAM = 0
_OFFSET_STREAM, _FLIP_STREAM, _ALPHA_STREAM = 2, 3, 4


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which an epoch visits the n training files: a permutation from (seed, epoch)."""
    return np.random.default_rng([seed, epoch, _ORDER_STREAM]).permutation(n)


def lighting_basis(eigval: np.ndarray, eigvec: np.ndarray) -> np.ndarray:
    """(3, 3) matrix L with shift = L @ alpha in 0-255 units (§4.1).

    eigval (3,) and eigvec (3, 3), columns p_i, describe RGB in [0, 1]:
    shift = [p1 p2 p3] [a1 l1, a2 l2, a3 l3]^T, times 255 for 0-255 pixels.
    """
    return 255.0 * np.asarray(eigvec, np.float64) * np.asarray(eigval, np.float64)[None, :]


@dataclass(frozen=True)
class EpochDraws:
    """The draws of epoch positions 0..n-1. Every draw is made whether or not it is used, so
    switching flips or lighting off leaves the crops as they were."""

    offsets: np.ndarray  # (n, 2) int64 (x, y): any of the (span + 1)^2 patches (§4.1)
    mirror: np.ndarray  # (n,) bool: a fair coin (§4.1 horizontal reflection)
    alpha: np.ndarray  # (n, 3) float64 ~ N(0, 1), scaled by the lighting sigma later

    @classmethod
    def draw(cls, seed: int, epoch: int, n: int, span: int) -> EpochDraws:
        def stream(kind: int) -> np.random.Generator:
            return np.random.default_rng([seed, epoch, kind])

        return cls(
            offsets=stream(_OFFSET_STREAM).integers(0, span + 1, size=(n, 2)),
            mirror=stream(_FLIP_STREAM).random(n) < 0.5,
            alpha=stream(_ALPHA_STREAM).standard_normal((n, 3)),
        )

    def take(self, positions: np.ndarray, flip: bool, sigma: float, basis: np.ndarray):
        """(offsets (k, 2) int64, mirror (k,) bool, lighting shift (k, 3) float64 in 0-255)."""
        mirror = self.mirror[positions] & flip
        shift = (self.alpha[positions] * sigma) @ basis.T  # §4.1: [p1 p2 p3] [a_i l_i]^T
        return self.offsets[positions], mirror, shift


def draw_train_inputs(
    seed: int,
    epoch: int,
    positions: np.ndarray,
    resize: int,
    crop: int,
    flip: bool,
    lighting_std: float,
    basis: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, mirror, shift) of the samples at these epoch positions (see EpochDraws.take)."""
    positions = np.asarray(positions, np.int64)
    n = int(positions.max()) + 1 if len(positions) else 0
    draws = EpochDraws.draw(seed, epoch, n, resize - crop)
    return draws.take(positions, flip, lighting_std, basis)


# §4.1 test patches: (x, y) of the four corners and the centre as fractions of the span, in
# torchvision's TenCrop order; each is repeated mirrored (the reflection of that patch).
TEN_PATCHES = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5))


def view_offsets(patches: str, span: int) -> list[tuple[int, int, bool]]:
    """(x, y, mirrored) of each evaluation view in the square: the centre patch (at span // 2),
    or the 10 patches of §4.1 (the corners and the centre, then their mirrors)."""
    at = [(int(px * span) if px != 0.5 else span // 2, int(py * span) if py != 0.5 else span // 2)
          for px, py in TEN_PATCHES]  # fmt: skip
    if patches == "center":
        return [(*at[4], False)]
    return [(x, y, m) for m in (False, True) for x, y in at]


def crop_positions(offsets: np.ndarray, span: int) -> tuple[np.ndarray, np.ndarray]:
    """DALI's relative crop anchors (x, y) float32: anchor = pos * span, exact for integers."""
    rel = offsets / span if span else np.zeros(offsets.shape, np.float64)
    return rel[:, 0].astype(np.float32), rel[:, 1].astype(np.float32)


class Normalizer:
    """uint8 patches (b, 3, c, c) -> float32 patch - mean image under it - per-image offset (§2).

    `mean_image` (resize, resize, 3) in 0-255 or None; `channel_mean` (3,). The per-image
    offset is channel mean - lighting shift (§4.1: the shift is added to every pixel).
    The same float32 operations, in the same order, on either device: (patch - mean) - offset.
    On the CPU they run in numpy, on one thread: torch's would start a parallel region per
    image, and its threads' spin-waiting beside DALI's busy threads made the loader use 3.5x
    the CPU per image (measured: 2.8 against 0.8 ms per image on 2 shared cores).
    """

    def __init__(self, mean_image: np.ndarray | None, channel_mean: np.ndarray, crop: int, device):
        self.crop, self.device = crop, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.channel_mean = np.asarray(channel_mean, np.float64)
        self.mean = self.mean_mirrored = None
        if mean_image is not None:
            chw = np.ascontiguousarray(np.asarray(mean_image, np.float32).transpose(2, 0, 1))
            # The mirrored mean image, so that the mean under a mirrored patch is a plain slice.
            self.mean, self.mean_mirrored = chw, np.ascontiguousarray(chw[:, :, ::-1])
            if self.cuda:
                self.mean = torch.from_numpy(self.mean).to(self.device)
                self.mean_mirrored = torch.from_numpy(self.mean_mirrored).to(self.device)

    def _offsets(self, shift: np.ndarray) -> np.ndarray:
        """(k, 3, 1, 1) float32 per-image value to subtract: channel mean - lighting shift."""
        return (self.channel_mean[None, :] - shift).astype(np.float32)[:, :, None, None]

    def train(
        self, patches: torch.Tensor, offsets: np.ndarray, mirror: np.ndarray, shift: np.ndarray
    ) -> torch.Tensor:
        """Training patches cut at `offsets` (x, y) of the square, mirrored where drawn."""
        if self.cuda:
            out = self._sent(patches).float()
            if self.mean is not None:
                out -= self._gathered(*self._anchors(offsets, mirror), mirror)
            return out.sub_(self._sent(self._offsets(shift)))
        out = patches.numpy().astype(np.float32)
        if self.mean is not None:  # k slices: 4x faster than a gather here (measured)
            x, y = self._anchors(offsets, mirror)
            c = self.crop
            for i, m in enumerate(mirror):
                src = self.mean_mirrored if m else self.mean
                out[i] -= src[:, y[i] : y[i] + c, x[i] : x[i] + c]
        out -= self._offsets(shift)
        return torch.from_numpy(out)

    def views(self, patches: torch.Tensor, views: list[tuple[int, int, bool]]) -> torch.Tensor:
        """(n * V, 3, c, c) evaluation patches, V fixed views (x, y, mirrored) per image."""
        c = self.crop
        if self.cuda:
            out = self._sent(patches).float()
        else:
            out = patches.numpy().astype(np.float32)
        out = out.reshape(-1, len(views), 3, c, c)
        if self.mean is not None:
            mirror = np.array([m for _, _, m in views], bool)
            x, y = self._anchors(np.array([(x, y) for x, y, _ in views]).reshape(-1, 2), mirror)
            srcs = [self.mean_mirrored if m else self.mean for m in mirror]
            means = [s[:, b : b + c, a : a + c] for s, a, b in zip(srcs, x, y)]
            out -= torch.stack(means) if self.cuda else np.stack(means)
        offset = self._offsets(np.zeros((1, 3)))[None]
        if self.cuda:
            return (out - self._sent(offset)).reshape(-1, 3, c, c)
        out -= offset
        return torch.from_numpy(out.reshape(-1, 3, c, c))

    def _sent(self, host: np.ndarray | torch.Tensor) -> torch.Tensor:
        """`host` copied to the GPU without waiting: a blocking copy waits for the whole
        stream (the previous step), so the host could never run ahead. Pageable memory is
        staged before the call returns, so `host` may be freed or reused at once."""
        host = torch.from_numpy(host) if isinstance(host, np.ndarray) else host
        return host.to(self.device, non_blocking=True)

    def _anchors(self, offsets: np.ndarray, mirror: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-left (x, y) of each patch in the mean image, or in the mirrored one if mirrored:
        mirror(patch of M at x) = patch of mirror(M) at side - c - x."""
        side = self.mean.shape[-1]
        return np.where(mirror, side - self.crop - offsets[:, 0], offsets[:, 0]), offsets[:, 1]

    def _gathered(self, x: np.ndarray, y: np.ndarray, mirror: np.ndarray) -> torch.Tensor:
        """(k, 3, c, c) mean patches on the GPU: one gather kernel, not k small copies."""
        ar = torch.arange(self.crop, device=self.device)
        rows = self._sent(y)[:, None, None] + ar[None, :, None]  # (k, c, 1)
        cols = self._sent(x)[:, None, None] + ar[None, None, :]  # (k, 1, c)
        flip = self._sent(mirror)[:, None, None, None]
        plain = self.mean[:, rows, cols].transpose(0, 1)
        mirrored = self.mean_mirrored[:, rows, cols].transpose(0, 1)
        return torch.where(flip, mirrored, plain)
