"""Replicas: the data-parallel gradient average over the replica group.

Every replica computes a mean loss over its own b images; averaging each tower's gradients
over the R replicas gives the gradient of the mean over all R*b images, as one process fed
the whole batch would compute it (tests/test_net_parallel.py checks that on 4 ranks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from repro.net.dist import Layout


def average_gradients(params: Sequence[nn.Parameter], layout: Layout) -> None:
    """Data parallel after backward: average each tower's gradients over its replica group at once.

    Every replica computed a mean loss over its own b images; averaging the gradients over
    the R replicas gives the gradient of the mean over all R*b images, as one process would.
    `GradientAverage` does the same in buckets during backward; this is the plain form.
    """
    if layout.replica_group is None:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.AVG, group=layout.replica_group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


class _Bucket:
    """Parameters whose gradients travel in one all_reduce, and the flat buffer they travel in."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.offsets = [0]
        for p in params:
            self.offsets.append(self.offsets[-1] + p.numel())
        self.flat = params[0].new_empty(self.offsets[-1])
        self.arrived = 0
        self.work = None

    def slice(self, i: int) -> Tensor:
        """Parameter i's share of the buffer, laid out as the parameter is (a channels_last
        weight gets a channels_last gradient: fused SGD needs the two alike, and would refuse
        them on CUDA or pair the wrong elements on the CPU)."""
        p = self.params[i]
        return self.flat[self.offsets[i] : self.offsets[i + 1]].as_strided(p.shape, p.stride())


class GradientAverage:
    """Data parallel during backward: gradients averaged over the replica group in buckets.

    A hook on each parameter copies its gradient into a flat bucket as soon as autograd has
    accumulated it; the bucket's last gradient launches an async all_reduce with AVG (gloo and
    NCCL both have it in torch 2.14) while backward goes on below. Buckets hold parameters in
    reverse registration order (fc8 first, the order backward finishes them), `bucket_mb` at
    most each (DDP's default, 25). `finish()` waits for every bucket and points each .grad at
    its averaged slice (no copy back). `remove()` takes the hooks off. With one replica
    nothing is hooked and `finish()` does nothing. `summed`: add instead of average (the
    'owt' convolutions, whose every rank's loss is already the mean over all ranks' images). Every replica launches its buckets in the
    same order, since every replica runs the same graph.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        layout: Layout,
        bucket_mb: float = 25.0,
        summed: bool = False,
    ):
        self.group = layout.replica_group
        self.op = dist.ReduceOp.SUM if summed else dist.ReduceOp.AVG
        self.buckets: list[_Bucket] = []
        self.where: dict[nn.Parameter, tuple[_Bucket, int]] = {}
        self.handles = []
        if self.group is None:
            return
        trained = [p for p in reversed(list(params)) if p.requires_grad]
        groups: list[list[nn.Parameter]] = []
        size = 0
        for p in trained:
            nbytes = p.numel() * p.element_size()
            if not groups or size + nbytes > bucket_mb * 2**20 or groups[-1][0].dtype != p.dtype:
                groups.append([])
                size = 0
            groups[-1].append(p)
            size += nbytes
        for members in groups:
            bucket = _Bucket(members)
            self.buckets.append(bucket)
            self.where.update({p: (bucket, i) for i, p in enumerate(members)})
        self.handles = [p.register_post_accumulate_grad_hook(self._arrived) for p in trained]

    def _arrived(self, p: nn.Parameter) -> None:
        bucket, i = self.where[p]
        bucket.slice(i).copy_(p.grad)
        bucket.arrived += 1
        if bucket.arrived == len(bucket.params):
            self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        bucket.work = dist.all_reduce(bucket.flat, op=self.op, group=self.group, async_op=True)

    def finish(self) -> None:
        """Wait for every bucket; each trained parameter's .grad becomes its averaged slice."""
        for bucket in self.buckets:
            if bucket.work is None and bucket.arrived:  # a gradient did not come: send the rest
                self._launch(bucket)
        for bucket in self.buckets:
            if bucket.work is None:
                continue
            bucket.work.wait()
            for i, p in enumerate(bucket.params):
                if p.grad is not None:
                    p.grad = bucket.slice(i)
            bucket.work, bucket.arrived = None, 0

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
