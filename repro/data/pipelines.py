"""The DALI pipelines (§2, §4.1) and the random draws that steer them.

Every pipeline takes its inputs from Python through `fn.external_source`: the encoded file
bytes and, for training, each sample's crop position, mirror flag and colour offset. DALI
itself draws nothing at random. The draws are a pure function of (seed, epoch, position of
the sample in the epoch), made with numpy here, so that

- one process with global batch B and any number of replica or tower ranks produce the
  same samples bit for bit with CPU decode (a sample's draws do not depend on who decodes
  it; for GPU decode see `_central_square`), and
- a run resumed at (epoch, step) continues exactly as the uninterrupted run would.

Graphs (HWC uint8 until the last op, which writes float32 CHW):
  train:  decode the central square -> rescale it to `resize`^2 (= shorter side to `resize`,
          central square) -> [- mean image]
          -> `crop`^2 patch at the drawn position, mirrored if drawn, minus the per-sample
          offset (channel mean - PCA lighting shift)
  eval:   same square -> centre patch, or the 10 patches stacked as (10, 3, crop, crop)
  square: decode -> central square, uint8 HWC (for the statistics in repro/data/stats.py)

`FedPipeline` runs one of them on batches fed from Python, a few batches ahead of the
consumer, and names the file when DALI fails to decode one.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
import torch
from nvidia.dali import pipeline_def

from repro.data.folders import DecodeError

ENCODED = "encoded"
CROP_X = "crop_x"
CROP_Y = "crop_y"
MIRROR = "mirror"
OFFSET = "offset"

# §4.1 test patches: (crop_pos_x, crop_pos_y) of the four corners and the centre, in
# torchvision's TenCrop order; each is repeated mirrored (the reflection of that patch).
TEN_PATCHES = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5))

# Independent numpy streams per (seed, epoch): the epoch order and the per-sample draws.
_ORDER_STREAM = 0
_SAMPLE_STREAM = 1


def _central_square(encoded, decode: str, resize: int):
    """§2: rescale the shorter side to `resize` and keep the central resize^2 square.

    Done in the other order, which is the same map: decode only the central square of side
    min(h, w), then rescale it to resize^2. Skipping the sides' pixels in decode and resize
    is about 20% faster on CPU than the literal order (which also rounds the long side and
    the crop anchor to whole pixels; the two differ by about one grey level on average).
    """
    shape = fn.peek_image_shape(encoded, dtype=types.FLOAT)  # (h, w, 3) from the header
    side = dmath.min(shape[0], shape[1])
    # On a GPU with a hardware JPEG engine DALI sends part of each batch to it; its rounding
    # may differ from the CUDA decoder's, so there one process and a split batch can differ
    # by a grey level. The towers of a replica still agree: they share one gathered batch.
    images = fn.decoders.image_crop(
        encoded, device=decode, output_type=types.RGB, crop_w=side, crop_h=side
    )  # crop_pos 0.5: the central square
    return fn.resize(images, size=[resize, resize])  # antialiased linear, rounds to uint8


def _minus_mean_image(square, mean_image: np.ndarray | None, decode: str):
    if mean_image is None:
        return square
    device = "gpu" if decode == "mixed" else "cpu"
    # §2: the per-pixel mean image (resize, resize, 3) in 0-255; the result is float32.
    return square - types.Constant(mean_image.astype(np.float32), device=device)


@pipeline_def
def train_pipeline(decode: str, resize: int, crop: int, mean_image: np.ndarray | None):
    """(b, 3, crop, crop) float32: a random patch of the mean-subtracted square (§4.1)."""
    encoded = fn.external_source(name=ENCODED, dtype=types.UINT8, ndim=1)
    crop_x = fn.external_source(name=CROP_X, dtype=types.FLOAT, ndim=0)
    crop_y = fn.external_source(name=CROP_Y, dtype=types.FLOAT, ndim=0)
    mirror = fn.external_source(name=MIRROR, dtype=types.INT32, ndim=0)
    # Per-sample (3,) RGB value subtracted from every pixel: channel mean - PCA lighting
    # shift. DALI has no lighting op; folding it into the normalisation's per-sample mean
    # costs no extra pass over the pixels.
    offset = fn.external_source(name=OFFSET, dtype=types.FLOAT, ndim=1)
    square = _minus_mean_image(_central_square(encoded, decode, resize), mean_image, decode)
    return fn.crop_mirror_normalize(
        square,
        crop=(crop, crop),
        crop_pos_x=crop_x,
        crop_pos_y=crop_y,
        mirror=mirror,
        mean=offset,
        std=[1.0, 1.0, 1.0],  # §2: no division by a standard deviation
        dtype=types.FLOAT,
        output_layout="CHW",
    )


@pipeline_def
def eval_pipeline(
    decode: str,
    resize: int,
    crop: int,
    mean_image: np.ndarray | None,
    channel_mean: tuple[float, float, float],
    patches: str,
):
    """'center': (b, 3, crop, crop); 'ten': (b, 10, 3, crop, crop), the §4.1 test patches."""
    encoded = fn.external_source(name=ENCODED, dtype=types.UINT8, ndim=1)
    square = _minus_mean_image(_central_square(encoded, decode, resize), mean_image, decode)
    views = (
        [(0.5, 0.5, 0)]
        if patches == "center"
        else [(x, y, m) for m in (0, 1) for x, y in TEN_PATCHES]
    )
    outs = [
        fn.crop_mirror_normalize(
            square,
            crop=(crop, crop),
            crop_pos_x=x,
            crop_pos_y=y,
            mirror=m,
            mean=list(channel_mean),
            std=[1.0, 1.0, 1.0],
            dtype=types.FLOAT,
            output_layout="CHW",
        )
        for x, y, m in views
    ]
    return outs[0] if patches == "center" else fn.stack(*outs)


@pipeline_def
def square_pipeline(decode: str, resize: int):
    """(b, resize, resize, 3) uint8: the central square the patches are cut from (§2)."""
    encoded = fn.external_source(name=ENCODED, dtype=types.UINT8, ndim=1)
    return _central_square(encoded, decode, resize)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which an epoch visits the n training files: a permutation from (seed, epoch)."""
    return np.random.default_rng([seed, epoch, _ORDER_STREAM]).permutation(n)


def lighting_basis(eigval: np.ndarray, eigvec: np.ndarray) -> np.ndarray:
    """(3, 3) matrix L with shift = L @ alpha in 0-255 units (§4.1).

    eigval (3,) and eigvec (3, 3), columns p_i, describe RGB in [0, 1]:
    shift = [p1 p2 p3] [a1 l1, a2 l2, a3 l3]^T, times 255 for 0-255 pixels.
    """
    return 255.0 * np.asarray(eigvec, np.float64) * np.asarray(eigval, np.float64)[None, :]


def draw_train_inputs(
    seed: int,
    epoch: int,
    positions: np.ndarray,
    resize: int,
    crop: int,
    flip: bool,
    lighting_std: float,
    basis: np.ndarray,
    channel_mean: np.ndarray,
) -> dict[str, np.ndarray]:
    """The external-source inputs (all but the bytes) of the samples at these epoch positions.

    Each sample's generator is seeded with (seed, epoch, position) alone, and every draw is
    made whether or not it is used, so switching flips or lighting off leaves the crops as
    they were.
    """
    n = len(positions)
    span = resize - crop
    offsets = np.zeros((n, 2), np.int64)
    flips = np.zeros(n, np.float64)
    alphas = np.zeros((n, 3), np.float64)
    for i, pos in enumerate(positions):
        rng = np.random.default_rng([seed, epoch, _SAMPLE_STREAM, int(pos)])
        offsets[i] = rng.integers(0, span + 1, size=2)  # §4.1: any of the (span+1)^2 patches
        flips[i] = rng.random()
        alphas[i] = rng.standard_normal(3)  # §4.1: a_i ~ N(0, sigma), scaled below
    # crop_pos is relative: anchor = pos * (resize - crop), exact for these integer offsets.
    rel = offsets / span if span else np.zeros_like(offsets, np.float64)
    shift = (alphas * lighting_std) @ basis.T  # (n, 3): one RGB shift per image, 0-255
    return {
        CROP_X: rel[:, 0].astype(np.float32),
        CROP_Y: rel[:, 1].astype(np.float32),
        MIRROR: ((flips < 0.5) & flip).astype(np.int32),
        OFFSET: (channel_mean[None, :] - shift).astype(np.float32),
    }


def read_encoded(paths: Iterable[str]) -> list[np.ndarray]:
    return [np.fromfile(p, dtype=np.uint8) for p in paths]


def _to_torch(tensor_list, device: torch.device, cuda: bool) -> torch.Tensor:
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    dense = tensor_list.as_tensor()  # (b, ...): every output here has one shape per batch
    dtype = to_torch_type[dense.dtype]
    if cuda:  # mixed decode: the output is on this rank's GPU already
        out = torch.empty(dense.shape(), dtype=dtype, device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    out = torch.empty(dense.shape(), dtype=dtype)
    feed_ndarray(dense, out)
    return out.to(device, non_blocking=device.type == "cuda")


class FedPipeline:
    """Runs a pipeline whose every input is fed from Python, `lookahead` batches ahead.

    `run(batches)` takes an iterable of (inputs, paths): `inputs` maps external-source
    names to per-batch arrays (the encoded bytes are read here from `paths`). It yields one
    tensor per batch on `device`, in order, or None for a batch of no samples. While
    the caller works on batch i, DALI's threads decode batches i+1..i+lookahead.
    """

    def __init__(
        self,
        pipeline: Callable[..., Any],
        args: dict[str, Any],
        batch_size: int,
        num_threads: int,
        device: torch.device,
        gpu: bool,
        lookahead: int = 2,
    ):
        def build():
            return pipeline(
                **args,
                batch_size=batch_size,
                num_threads=num_threads,
                device_id=(device.index or 0) if gpu else None,
                # Depth 1: the first schedule_run of a deeper pipeline runs that many
                # iterations at once and asks for inputs not fed yet. Our own lookahead
                # keeps several batches in flight instead.
                prefetch_queue_depth=1,
                exec_dynamic=True,  # outputs stay valid while referenced (see _fetch)
            )

        self._build = build
        self._device = device
        self._gpu = gpu
        self._lookahead = lookahead
        self._pipe = None
        self._pending: deque[list[str]] = deque()  # paths of each batch scheduled, in order
        self._hold: deque = deque()  # (DALI output, CUDA event) until the copy is done

    def _submit(self, inputs: dict[str, np.ndarray], paths: list[str]) -> None:
        if paths:
            if self._pipe is None:
                self._pipe = self._build()
                self._pipe.build()
            self._pipe.feed_input(ENCODED, read_encoded(paths))
            for name, value in inputs.items():
                self._pipe.feed_input(name, value)
            self._pipe.schedule_run()
        self._pending.append(paths)

    def _fetch(self) -> torch.Tensor | None:
        paths = self._pending.popleft()
        if not paths:
            return None
        try:
            (out,) = self._pipe.outputs()
        except RuntimeError as e:
            self._pipe = None  # DALI marks a pipeline unusable after an error
            self._pending.clear()
            raise DecodeError(_name_bad_file(str(e), paths)) from e
        tensor = _to_torch(out, self._device, self._gpu)
        if self._gpu:
            # Keep DALI's buffer alive until the asynchronous copy out of it has run.
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self._device))
            self._hold.append((out, event))
            if len(self._hold) > 2:
                self._hold.popleft()[1].synchronize()
        return tensor

    def drain(self) -> None:
        """Discard batches still scheduled (a consumer stopped early) so the next run starts clean."""
        while self._pending:
            self._fetch()

    def run(self, batches: Iterable[tuple[dict[str, np.ndarray], list[str]]]) -> Iterator:
        self.drain()
        feed = iter(batches)
        for item in feed:
            self._submit(*item)
            if len(self._pending) >= self._lookahead:
                break
        while self._pending:
            out = self._fetch()
            nxt = next(feed, None)
            if nxt is not None:
                self._submit(*nxt)
            yield out


def _name_bad_file(message: str, paths: list[str]) -> str:
    from repro.data.imagecheck import full_check

    found = re.search(r"sample #(\d+)", message)
    named = [paths[int(found.group(1))]] if found and int(found.group(1)) < len(paths) else []
    broken = [f"{p} ({r})" for p in paths if (r := full_check(p)) is not None]
    if broken:
        which = "these file(s) do not decode: " + "; ".join(broken)
    elif named:
        which = f"DALI failed on {named[0]}"
    else:
        which = "the batch held: " + ", ".join(paths)
    first = message.strip().splitlines()
    return (
        f"DALI could not decode an image, {which}. List every bad file with "
        "`python -m repro.data.imagecheck ROOT` (the loaders skip files in ROOT/bad_files.txt). "
        f"DALI said: {' | '.join(line for line in first if line.strip())[:600]}"
    )
