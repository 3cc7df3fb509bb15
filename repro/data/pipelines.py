"""The DALI pipelines (§2, §4.1): file paths in, uint8 patches out.

Every pipeline takes its inputs from Python through `fn.external_source`: the file paths
and, for training, each sample's crop position and mirror flag (drawn in repro/data/augment.py
as a pure function of (seed, epoch, position); DALI draws nothing at random). DALI reads the
files (`fn.io.file.read`, in its own threads), decodes and cuts the patches; nothing runs per
sample in Python. The output is uint8, CHW: the tower ranks gather it at a quarter of the
bytes of float32, and augment.Normalizer subtracts the mean image and the per-sample offset
after the gather.

Graphs:
  train:  decode the central square -> rescale it to `resize`^2 (= shorter side to `resize`,
          central square, §2) -> `crop`^2 patch at the drawn position, mirrored if drawn
  eval:   same square -> the given views (centre patch, or the 10 patches of §4.1)
  square: decode -> central square, uint8 HWC (for the statistics in repro/data/stats.py and
          the 256x256 store of repro/data/store.py)
With `stored=True` every image is already `resize`^2 (the paper's store, §2): no crop-decode,
no resize, and the training patch is decoded alone (a region-of-interest decode; same pixels
as decoding the whole square and cutting the patch).

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

from repro.data.augment import view_offsets
from repro.data.folders import DecodeError

PATHS = "paths"
CROP_X = "crop_x"
CROP_Y = "crop_y"
MIRROR = "mirror"


def _read():
    paths = fn.external_source(name=PATHS, dtype=types.UINT8, ndim=1)
    return fn.io.file.read(paths)  # in DALI's threads, not on the training thread


def _central_square(encoded, decode: str, resize: int, stored: bool):
    """§2: rescale the shorter side to `resize` and keep the central resize^2 square.

    Done in the other order, which is the same map: decode only the central square of side
    min(h, w), then rescale it to resize^2. Skipping the sides' pixels in decode and resize
    is about 20% faster on CPU than the literal order (which also rounds the long side and
    the crop anchor to whole pixels; the two differ by about one grey level on average).
    A stored square is decoded as it is.
    """
    if stored:
        return fn.decoders.image(encoded, device=decode, output_type=types.RGB)
    shape = fn.peek_image_shape(encoded, dtype=types.FLOAT)  # (h, w, 3) from the header
    side = dmath.min(shape[0], shape[1])
    # On a GPU with a hardware JPEG engine DALI sends part of each batch to it; its rounding
    # may differ from the CUDA decoder's, so there one process and a split batch can differ
    # by a grey level. The towers of a replica still agree: they share one gathered batch.
    images = fn.decoders.image_crop(
        encoded, device=decode, output_type=types.RGB, crop_w=side, crop_h=side
    )  # crop_pos 0.5: the central square
    return fn.resize(images, size=[resize, resize])  # antialiased linear, rounds to uint8


def _patch(images, crop: int, x, y, mirror):
    """uint8 CHW crop^2 patch at relative anchor (x, y), mirrored where `mirror` is 1."""
    return fn.crop_mirror_normalize(
        images,
        crop=(crop, crop),
        crop_pos_x=x,
        crop_pos_y=y,
        mirror=mirror,
        dtype=types.UINT8,  # no arithmetic: augment.Normalizer does it after the gather
        output_layout="CHW",
    )


@pipeline_def
def train_pipeline(decode: str, resize: int, crop: int, stored: bool = False):
    """(b, 3, crop, crop) uint8: a patch of the central square at the drawn position (§4.1)."""
    encoded = _read()
    crop_x = fn.external_source(name=CROP_X, dtype=types.FLOAT, ndim=0)
    crop_y = fn.external_source(name=CROP_Y, dtype=types.FLOAT, ndim=0)
    mirror = fn.external_source(name=MIRROR, dtype=types.INT32, ndim=0)
    if stored:  # decode only the patch: 23% fewer pixels at 224 of 256
        patch = fn.decoders.image_crop(
            encoded,
            device=decode,
            output_type=types.RGB,
            crop=(crop, crop),
            crop_pos_x=crop_x,
            crop_pos_y=crop_y,
        )
        return fn.crop_mirror_normalize(
            patch, mirror=mirror, dtype=types.UINT8, output_layout="CHW"
        )
    square = _central_square(encoded, decode, resize, stored)
    return _patch(square, crop, crop_x, crop_y, mirror)


@pipeline_def
def eval_pipeline(decode: str, resize: int, crop: int, patches: str, stored: bool = False):
    """'center': (b, 3, crop, crop) uint8; 'ten': (b, 10, 3, crop, crop), the §4.1 patches."""
    square = _central_square(_read(), decode, resize, stored)
    span = resize - crop
    outs = [
        _patch(square, crop, x / span if span else 0.0, y / span if span else 0.0, int(m))
        for x, y, m in view_offsets(patches, span)
    ]
    return outs[0] if patches == "center" else fn.stack(*outs)


@pipeline_def
def square_pipeline(decode: str, resize: int, stored: bool = False):
    """(b, resize, resize, 3) uint8: the central square the patches are cut from (§2)."""
    return _central_square(_read(), decode, resize, stored)


@pipeline_def
def shape_pipeline():
    """(b, 3) int64: the decoded shape of each whole image (for `check`: decode, keep nothing)."""
    return fn.decoders.image(_read(), output_type=types.RGB).shape(dtype=types.INT64)


def encode_paths(paths: Iterable[str]) -> list[np.ndarray]:
    """File names as the byte arrays fn.io.file.read takes."""
    return [np.frombuffer(p.encode("utf-8", "surrogateescape"), np.uint8) for p in paths]


def _to_torch(tensor_list, device: torch.device, cuda: bool) -> torch.Tensor:
    dense = tensor_list.as_tensor()  # (b, ...): every output here has one shape per batch
    if cuda:  # mixed decode: the output is on this rank's GPU already
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

        out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    # No copy: a view of DALI's buffer, which stays valid while referenced (exec_dynamic);
    # copying a float32 batch out used to take a third of the loader's time.
    out = torch.from_numpy(np.asarray(dense))
    return out.to(device, non_blocking=device.type == "cuda")


class FedPipeline:
    """Runs a pipeline whose every input is fed from Python, `lookahead` batches ahead.

    `run(batches)` takes an iterable of (inputs, paths): `inputs` maps external-source
    names to per-batch arrays (DALI reads the files named in `paths`). It yields one
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
            self._pipe.feed_input(PATHS, encode_paths(paths))
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
        "`python launch/prepare_data.py check ROOT` (the loaders skip files in ROOT/bad_files.txt). "
        f"DALI said: {' | '.join(line for line in first if line.strip())[:600]}"
    )
