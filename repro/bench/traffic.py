"""What the towers send each other (§3.5), what that costs on a link, and a local stand-in.

Five cross-tower points per step, all in repro/net/parallel.py and called from repro/net/model.py:

    link     per-tower tensor (paper net)   forward          backward
    conv3    (B, 128, 13, 13) after pool2   all_gather       all_reduce of (B, 256, 13, 13)
    fc6      (B, 4608) = 128 x 6 x 6        all_gather       all_reduce of (B, 9216)
    fc7      (B, 2048)                      all_gather       all_reduce of (B, 4096)
    fc8      (B, 2048)                      all_gather       all_reduce of (B, 4096)
    logits   (B, 500)                       all_gather       none (each rank keeps its slice)

What `exchange_volume` counts, per image, for ONE rank of a T-tower group (T = 2 here):
- forward all_gather: the elements this rank sends, (T - 1) x its share; on 2 ranks that is
  its own share, the activation the other tower reads. Unequal fc8 shares are padded to the
  widest for the list-form all_gather, so the widest share is what travels.
- backward all_reduce of the whole gathered gradient (N = T x share elements): a ring (and
  gloo's or NCCL's algorithms on 2 ranks) sends 2 (T - 1) / T x N per rank, i.e. N = the
  WHOLE tensor on 2 ranks: half in the reduce-scatter phase, half in the all-gather phase.
  A rank needs only its own slice afterwards, so a reduce_scatter would send N / T; that
  figure is given as `backward_needed_*`.
- bytes = elements x the element size of the activation: 4 for fp32, 2 under bf16 autocast.
Received bytes equal sent bytes on 2 ranks. Data-parallel gradient averaging between
replicas is not a cross-tower link and is not counted here.

`local_collectives()` swaps the two collectives repro/net/parallel.py calls for stand-ins that
move nothing between processes (all_gather copies the own tensor into every slot; all_reduce
leaves the tensor as it is), so every local copy, pad and slice of the exchange still runs:
the time difference to the real step is the time of the communication. With
`one_tower_layout()` it runs one tower of the two-tower net in a single process, what one
GPU of a two-GPU run computes. `timed_collectives()` keeps the real collectives and records
how long each call took.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from repro.config import ModelConfig
from repro.net import parallel
from repro.net.dist import Layout
from repro.net.layers import spatial_sizes
from repro.net.model import split_classes


def exchange_volume(cfg: ModelConfig, dtype_bytes: int = 4) -> list[dict]:
    """One dict per cross-tower link, in forward order, with per-image element and byte counts.

    Keys: link, shape (one tower's activation for one image), forward ('all_gather'),
    forward_elements / forward_bytes (sent by one rank), backward ('all_reduce' or 'none'),
    backward_elements / backward_bytes (sent by one rank), backward_needed_elements /
    backward_needed_bytes (what a reduce_scatter would send). Empty for a one-tower net.
    """
    towers = cfg.towers
    if towers == 1:
        return []  # layers-145-half: one tower, nothing crosses
    sizes = spatial_sizes(cfg)
    side2, side5 = sizes["pool2"], sizes["pool5"]
    w = cfg.widths
    shapes: list[tuple[str, tuple[int, ...], bool]] = []  # (link, shape per tower, summed back)
    if cfg.exchange == "paper":
        shapes += [
            ("conv3", (w[1], side2, side2), True),  # after pool2 (§3.5: the cheapest point)
            ("fc6", (w[4] * side5 * side5,), True),
            ("fc7", (cfg.fc_width,), True),
        ]
    shapes.append(("fc8", (cfg.fc_width,), True))  # every variant links before fc8
    shapes.append(("logits", (max(split_classes(cfg.num_classes, towers)),), False))

    links = []
    for link, shape, summed in shapes:
        share = 1
        for d in shape:
            share *= d
        whole = share * towers
        forward = (towers - 1) * share
        backward = 2 * (towers - 1) * whole // towers if summed else 0
        needed = (towers - 1) * share if summed else 0
        links.append(
            {
                "link": link,
                "shape": shape,
                "forward": "all_gather",
                "forward_elements": forward,
                "forward_bytes": forward * dtype_bytes,
                "backward": "all_reduce" if summed else "none",
                "backward_elements": backward,
                "backward_bytes": backward * dtype_bytes,
                "backward_needed_elements": needed,
                "backward_needed_bytes": needed * dtype_bytes,
            }
        )
    return links


@dataclass(frozen=True)
class LinkModel:
    """An assumed link between two devices: time = bytes / bandwidth + latency per collective."""

    name: str
    bandwidth_gb_s: float
    """One direction, GB/s (1e9 bytes/s)."""
    latency_us: float


def modelled_seconds(volume: list[dict], batch: int, link: LinkModel, backward: bool) -> float:
    """Seconds one step spends in the exchanges under `link` (no overlap with compute)."""
    total = 0.0
    for row in volume:
        calls = [row["forward_bytes"]]
        if backward and row["backward"] != "none":
            calls.append(row["backward_bytes"])
        for per_image in calls:
            total += per_image * batch / (link.bandwidth_gb_s * 1e9) + link.latency_us * 1e-6
    return total


def dtype_bytes(precision: str) -> int:
    """Element size of the exchanged activations: bf16 autocast makes conv/linear outputs bf16."""
    return 2 if precision == "bf16" else 4


# -- stand-ins for the collectives repro/net/parallel.py calls -------------------------------------


class _NoGroup:
    """A tower group that is never used for communication (the local stand-in ignores it)."""

    def __repr__(self) -> str:
        return "<local stand-in tower group>"


def one_tower_layout(device: torch.device | str = "cpu", tower: int = 0) -> Layout:
    """One tower of the two-tower net in one process, as one rank of a 2-rank run sees it.

    Use under `local_collectives()`: the exchanges then take the multi-rank code path with a
    group that nothing is sent to.
    """
    return Layout(
        world_size=1,
        rank=0,
        towers=2,
        replicas=1,
        replica=0,
        local_towers=(tower,),
        tower_group=_NoGroup(),  # type: ignore[arg-type]  # only the stand-in collectives see it
        replica_group=None,
        device=torch.device(device),
    )


class _Collectives:
    """Looks like torch.distributed to repro/net/parallel.py; overrides all_gather and all_reduce."""

    def __init__(self, mode: str, record: list | None):
        self.mode, self.record = mode, record

    def __getattr__(self, name: str):
        return getattr(torch_dist, name)  # everything else is the real module

    def _note(self, op: str, tensor: torch.Tensor, seconds: float) -> None:
        if self.record is not None:
            self.record.append((op, tuple(tensor.shape), tensor.element_size(), seconds))

    def all_gather(self, outputs: list[torch.Tensor], tensor: torch.Tensor, group=None) -> None:
        if self.mode == "local":
            for out in outputs:  # the same writes the collective makes, with no peer
                out.copy_(tensor)
            self._note("all_gather", tensor, 0.0)
            return
        start = _now(tensor)
        torch_dist.all_gather(outputs, tensor, group=group)
        self._note("all_gather", tensor, _now(tensor) - start)

    def all_reduce(self, tensor: torch.Tensor, group=None, op=None) -> None:
        if self.mode == "local":
            self._note("all_reduce", tensor, 0.0)  # the own gradient stands for the sum
            return
        start = _now(tensor)
        if op is None:
            torch_dist.all_reduce(tensor, group=group)
        else:
            torch_dist.all_reduce(tensor, op=op, group=group)
        self._note("all_reduce", tensor, _now(tensor) - start)


def _now(tensor: torch.Tensor) -> float:
    """perf_counter after the device has finished: NCCL calls return before the transfer does."""
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    return time.perf_counter()


@contextlib.contextmanager
def _swapped(mode: str, record: list | None) -> Iterator[list | None]:
    real = parallel.dist
    parallel.dist = _Collectives(mode, record)  # type: ignore[assignment]
    try:
        yield record
    finally:
        parallel.dist = real


def local_collectives(record: list | None = None) -> contextlib.AbstractContextManager:
    """Exchanges with no communication, same shapes and local copies (see the module docstring).

    `record`, if given, receives (op, shape, element size, 0.0) for every call.
    """
    return _swapped("local", record)


def timed_collectives(record: list) -> contextlib.AbstractContextManager:
    """The real collectives, each timed with the device synchronized before and after.

    `record` receives (op, shape, element size, seconds) for every call; the seconds include
    waiting for the other rank to arrive at the collective.
    """
    return _swapped("timed", record)


def attribute_calls(volume: list[dict], calls: list[tuple], steps: int, backward: bool) -> dict:
    """Sum recorded call seconds per link and direction, from the order the calls come in.

    Each step makes one all_gather per link in forward order and, in training, one
    all_reduce per summed link in reverse order. Returns {(link, 'forward'|'backward'): s}.
    """
    gathers = [row["link"] for row in volume]
    reduces = [row["link"] for row in reversed(volume) if row["backward"] != "none"]
    per_step = len(gathers) + (len(reduces) if backward else 0)
    if len(calls) != per_step * steps:
        raise ValueError(f"expected {per_step} collectives per step x {steps}, got {len(calls)}")
    totals: dict[tuple[str, str], float] = {}
    for start in range(0, len(calls), per_step):
        step = calls[start : start + per_step]
        g = [c for c in step if c[0] == "all_gather"]
        r = [c for c in step if c[0] == "all_reduce"]
        for link, call in zip(gathers, g):
            totals[(link, "forward")] = totals.get((link, "forward"), 0.0) + call[3]
        for link, call in zip(reduces, r):
            totals[(link, "backward")] = totals.get((link, "backward"), 0.0) + call[3]
    return totals
