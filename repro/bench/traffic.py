"""What the towers send each other (§3.5), what that costs on a link, and a local stand-in.

Five cross-tower points per step, all in repro/net/parallel.py and called from repro/net/model.py:

    link     per-tower tensor (paper net)   forward             backward
    conv3    (B, 128, 13, 13) after pool2   all_gather_single   reduce_scatter_single
    fc6      (B, 4608) = 128 x 6 x 6        all_gather_single   reduce_scatter_single
    fc7      (B, 2048)                      all_gather_single   reduce_scatter_single
    fc8      (B, 2048)                      all_gather_single   reduce_scatter_single
    logits   (B, 500)                       all_gather_single   none (each rank keeps its slice)

What `exchange_volume` counts, per image, for ONE rank of a T-tower group (T = 2 here):
- forward all_gather: the elements this rank sends, (T - 1) x its share; on 2 ranks that is
  its own share, the activation the other tower reads. Unequal fc8 shares are padded to the
  widest for the single-buffer collective, so the widest share is what travels.
- backward reduce_scatter of the T stacked share gradients: a rank sends the (T - 1) shares
  that other ranks keep, the same count as forward. (The all_reduce of the whole gradient
  this replaced sent 2 (T - 1) / T x T shares, twice that: `allreduce_elements` keeps it.)
- bytes = elements x the element size of the activation: 4 for fp32, 2 under bf16 autocast.
Received bytes equal sent bytes on 2 ranks. Data-parallel gradient averaging between
replicas is not a cross-tower link and is not counted here.

`local_collectives()` swaps the collectives repro/net/parallel.py and repro/net/replicas.py
call for stand-ins that move nothing between processes (the gather copies the own share into
every slot; the reduce-scatter copies the first share's gradient into the output, standing
for the sum; the replica all_reduce leaves the gradients as they are), so every local copy
and the arithmetic on every share still run: the time difference to the real step is the
time of the communication, the part of it not hidden behind arithmetic. With
`one_tower_layout()` it runs one tower of the two-tower net in a single process, what one
GPU of a two-GPU run computes.
`timed_collectives()` keeps the real collectives and records how long each one held the
caller: the call, plus the wait on its handle when it was launched asynchronously (the time
the exchange was exposed, not hidden behind arithmetic).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from repro.config import ModelConfig
from repro.net import parallel, replicas
from repro.net.dist import Layout
from repro.net.layers import spatial_sizes
from repro.net.model import split_classes


def exchange_volume(cfg: ModelConfig, dtype_bytes: int = 4) -> list[dict]:
    """One dict per cross-tower link, in forward order, with per-image element and byte counts.

    Keys: link, shape (one tower's activation for one image), forward ('all_gather'),
    forward_elements / forward_bytes (sent by one rank), backward ('reduce_scatter' or
    'none'), backward_elements / backward_bytes (sent by one rank), allreduce_elements /
    allreduce_bytes (what an all_reduce of the whole gradient would send instead). Empty for
    a one-tower net.
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
        forward = (towers - 1) * share
        backward = forward if summed else 0
        allreduce = 2 * (towers - 1) * share if summed else 0  # ring: 2 (T-1)/T x T shares
        links.append(
            {
                "link": link,
                "shape": shape,
                "forward": "all_gather",
                "forward_elements": forward,
                "forward_bytes": forward * dtype_bytes,
                "backward": "reduce_scatter" if summed else "none",
                "backward_elements": backward,
                "backward_bytes": backward * dtype_bytes,
                "allreduce_elements": allreduce,
                "allreduce_bytes": allreduce * dtype_bytes,
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


class _Done:
    """The handle of a stand-in collective: nothing to wait for."""

    def wait(self) -> bool:
        return True


class _Timed:
    """A real collective's handle whose wait() adds the time it blocks to the call's record."""

    def __init__(self, work, record: list, index: int, tensor: torch.Tensor):
        self.work, self.record, self.index, self.tensor = work, record, index, tensor

    def wait(self) -> bool:
        start = _now(self.tensor)
        done = self.work.wait()
        op, shape, size, seconds = self.record[self.index]
        self.record[self.index] = (op, shape, size, seconds + _now(self.tensor) - start)
        return done


class _Collectives:
    """Looks like torch.distributed to repro/net/parallel.py; overrides the two exchanges.

    Each call is noted as (op, share shape, element size, seconds): 'all_gather' with the share
    a rank sends, 'reduce_scatter' with the share it keeps.
    """

    def __init__(self, mode: str, record: list | None):
        self.mode, self.record = mode, record

    def __getattr__(self, name: str):
        return getattr(torch_dist, name)  # everything else is the real module

    def _call(self, op: str, share: torch.Tensor, real, local, async_op: bool):
        if self.mode == "local":
            local()
            if self.record is not None:
                self.record.append((op, tuple(share.shape), share.element_size(), 0.0))
            return _Done() if async_op else None
        start = _now(share)
        work = real()
        if self.record is None:
            return work
        self.record.append((op, tuple(share.shape), share.element_size(), _now(share) - start))
        return _Timed(work, self.record, len(self.record) - 1, share) if async_op else None

    def all_gather_single(self, out, tensor, group=None, async_op=False):
        def local():  # the same writes the collective makes, with no peer
            for chunk in out.chunk(out.shape[0] // tensor.shape[0]):
                chunk.copy_(tensor)

        def real():
            return torch_dist.all_gather_single(out, tensor, group=group, async_op=async_op)

        return self._call("all_gather", tensor, real, local, async_op)

    def reduce_scatter_single(self, out, tensor, op=None, group=None, async_op=False):
        def local():  # the first share's gradient stands for the sum
            out.copy_(tensor[: out.shape[0]])

        def real():
            reduce = torch_dist.ReduceOp.SUM if op is None else op
            return torch_dist.reduce_scatter_single(out, tensor, reduce, group, async_op=async_op)

        return self._call("reduce_scatter", out, real, local, async_op)

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        """The replica gradient average (repro/net/replicas.py): left as it is when local."""

        def real():
            reduce = torch_dist.ReduceOp.SUM if op is None else op
            return torch_dist.all_reduce(tensor, reduce, group, async_op=async_op)

        return self._call("all_reduce", tensor, real, lambda: None, async_op)


def _now(tensor: torch.Tensor) -> float:
    """perf_counter after the device has finished: NCCL calls return before the transfer does."""
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    return time.perf_counter()


@contextlib.contextmanager
def _swapped(mode: str, record: list | None) -> Iterator[list | None]:
    real = parallel.dist
    stand_in = _Collectives(mode, record)
    parallel.dist = replicas.dist = stand_in  # type: ignore[assignment]
    try:
        yield record
    finally:
        parallel.dist = replicas.dist = real


def local_collectives(record: list | None = None) -> contextlib.AbstractContextManager:
    """Exchanges with no communication, same shapes, copies and arithmetic (module docstring).

    `record`, if given, receives (op, shape, element size, 0.0) for every call.
    """
    return _swapped("local", record)


def timed_collectives(record: list) -> contextlib.AbstractContextManager:
    """The real collectives, each timed with the device synchronized before and after.

    `record` receives (op, share shape, element size, seconds) for every call; the seconds are
    the time the call (and its wait, if launched asynchronously) held this rank, waiting for
    the other rank included.
    """
    return _swapped("timed", record)


def _calls_by_link(volume: list[dict], calls: list[tuple], steps: int, backward: bool):
    """(link, direction, call) for every recorded call, named from the order calls come in:
    each step makes one all_gather per link in forward order and, in training, one
    reduce_scatter per summed link in reverse order."""
    gathers = [row["link"] for row in volume]
    reduces = [row["link"] for row in reversed(volume) if row["backward"] != "none"]
    per_step = len(gathers) + (len(reduces) if backward else 0)
    calls = [c for c in calls if c[0] != "all_reduce"]  # the replica average is no link
    if len(calls) != per_step * steps:
        raise ValueError(f"expected {per_step} collectives per step x {steps}, got {len(calls)}")
    for start in range(0, len(calls), per_step):
        step = calls[start : start + per_step]
        g = [c for c in step if c[0] == "all_gather"]
        r = [c for c in step if c[0] == "reduce_scatter"]
        yield from ((link, "forward", call) for link, call in zip(gathers, g))
        yield from ((link, "backward", call) for link, call in zip(reduces, r))


def attribute_calls(volume: list[dict], calls: list[tuple], steps: int, backward: bool) -> dict:
    """Sum recorded call seconds per link and direction: {(link, 'forward'|'backward'): s}."""
    totals: dict[tuple[str, str], float] = {}
    for link, direction, call in _calls_by_link(volume, calls, steps, backward):
        totals[(link, direction)] = totals.get((link, direction), 0.0) + call[3]
    return totals


def sent_bytes_per_image(
    volume: list[dict], calls: list[tuple], steps: int, backward: bool, towers: int = 2
) -> dict:
    """Bytes one rank sent per image at each link and direction, read off the recorded calls.

    A call's share is (B, ...): the rank sends it to the T - 1 others (all_gather), or sends
    the T - 1 shares the others keep (reduce_scatter). {(link, direction): bytes per image}.
    """
    sent: dict[tuple[str, str], int] = {}
    for link, direction, (_, shape, size, _) in _calls_by_link(volume, calls, steps, backward):
        per_image = (towers - 1) * size * torch.Size(shape[1:]).numel()
        sent[(link, direction)] = per_image  # the same every step
    return sent
