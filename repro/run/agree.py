"""How the ranks of one run agree: on a flag any rank raised, and on what rank 0 decided.

Every rank must take the same branch at the same point (stop now or go on, start or refuse),
or one of them waits in a collective that the others never join until `train.dist_timeout_s`
ends the job with a timeout. These helpers are collectives: every rank calls them, in the
same order; with one process they cost nothing.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist

from repro.net.dist import Layout

T = TypeVar("T")


def any_rank(flag: bool, layout: Layout) -> bool:
    """True on every rank if `flag` is True on any rank (one all-reduce of one number)."""
    if not layout.distributed:
        return flag
    t = torch.tensor([float(flag)], device=layout.device)  # NCCL reduces only GPU tensors
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def on_main(fn: Callable[[], T], layout: Layout) -> T | None:
    """Run fn on rank 0 alone; if it raises, every rank raises that exception.

    For steps that read or write the run folder, which only rank 0 touches: the other ranks
    learn of a failure (a refused folder, a full disk) at once, instead of waiting for rank
    0 in their next collective until it times out. Returns fn's result on rank 0, None on
    the others. The exception must pickle (ours and OSError do).
    """
    result, error = None, None
    if layout.is_main:
        try:
            result = fn()
        except Exception as e:  # shared below, then raised on every rank
            error = e
    if layout.distributed:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error
    return result


@contextmanager
def main_may_take(layout: Layout, seconds: float) -> Iterator[None]:
    """The body may keep rank 0 for up to `seconds`; every rank leaves together after it.

    For a slow step that only rank 0 takes (starting wandb): the other ranks would otherwise
    wait in their next collective, whose timeout (train.dist_timeout_s) may be shorter. They
    wait instead at a barrier with this explicit timeout, in a gloo group of its own (made
    before the body, while every rank is here; NCCL has no barrier with a timeout).
    """
    if not layout.distributed:
        yield
        return
    timeout = datetime.timedelta(seconds=seconds)
    group = dist.new_group(backend="gloo", timeout=timeout)
    try:
        yield
        dist.monitored_barrier(group=group, timeout=timeout)
    finally:
        dist.destroy_process_group(group)
