"""The exchanges of "one weird trick" (PAPER.md §7): convolutions per rank, fc6-fc8 split by units.

Under train.parallel='owt' each of the K ranks of the replica group runs both towers'
convolutions on its own b images, then computes 1/K of the output units of fc6, fc7 and fc8
(units of the whole layer, tower 0's first) for all K*b images (repro/net/hybrid_model.py).
Three exchanges, named by their backward as in repro/net/parallel.py:

- `gather_batch_for_split_layer`: pool5 before fc6. Forward: all-gather along the batch,
  (b, 9216) -> (K*b, 9216). Backward: sum over the ranks and keep the own rows (a
  reduce-scatter): every rank's fc6 slice read every image, so the gradient of this rank's
  images is the sum of what the K slices send back.
- `gather_units_for_split_layer`: fc6 -> fc7 and fc7 -> fc8. Forward: all-gather along the
  units, (K*b, U/K) -> (K*b, U). Backward: sum over the ranks, keep the own units.
- `gather_units_for_replicated`: the logits, (K*b, C/K) -> (K*b, C). Forward: the same
  gather. Backward: the own classes, NO sum: every rank computes the identical loss over the
  K*b images, so each already holds the whole gradient (PAPER.md §5, first pitfall).

Loss normalisation: that loss is the mean over all K*b images, so the fc gradients each
rank gets are already the whole net's (they stay local), while a rank's convolution
gradients cover only its own images' terms of that mean: they are SUMMED over the ranks,
not averaged (repro/net/schemes.py reduce_gradients).

Shares of a layer's units are as even as possible (`split_classes`); unequal shares (10
classes on 4 ranks: 3, 3, 2, 2) are padded to the widest for the collective and trimmed
after. Each exchange returns at once when the group has one member. The collectives are the
single-tensor forms `all_gather_single` and `reduce_scatter_single`: in the pinned torch
2.14.1 `all_gather_into_tensor` and `reduce_scatter_tensor` (PAPER.md §5) warn that they are
deprecated in their favour.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from repro.net.dist import Layout


def _gather_rows(x: Tensor, group: ProcessGroup, ranks: int) -> Tensor:
    """(b, ...) on each rank -> (ranks * b, ...), rank 0's rows first."""
    out = x.new_empty((ranks * x.shape[0], *x.shape[1:]))
    dist.all_gather_single(out, x.contiguous(), group=group)
    return out


def _reduce_scatter_rows(grad: Tensor, group: ProcessGroup, ranks: int) -> Tensor:
    """(ranks * b, ...) on each rank -> this rank's b rows of the sum over ranks."""
    out = grad.new_empty((grad.shape[0] // ranks, *grad.shape[1:]))
    dist.reduce_scatter_single(out, grad.contiguous(), group=group)
    return out


def _gather_units(x: Tensor, group: ProcessGroup, sizes: Sequence[int]) -> Tensor:
    """(N, sizes[k]) on rank k -> (N, sum(sizes)), rank 0's units first."""
    widest = max(sizes)
    if x.shape[1] < widest:
        x = torch.nn.functional.pad(x, (0, widest - x.shape[1]))
    blocks = _gather_rows(x, group, len(sizes)).view(len(sizes), *x.shape)  # (K, N, widest)
    return torch.cat([blocks[k, :, :n] for k, n in enumerate(sizes)], dim=1)


def _reduce_scatter_units(grad: Tensor, group: ProcessGroup, sizes: Sequence[int], own: int):
    """(N, sum(sizes)) on each rank -> (N, sizes[own]): this rank's units of the sum over ranks."""
    widest = max(sizes)
    blocks = grad.new_zeros((len(sizes), grad.shape[0], widest))  # (K, N, widest)
    for k, part in enumerate(grad.split(list(sizes), dim=1)):
        blocks[k, :, : part.shape[1]] = part
    mine = _reduce_scatter_rows(blocks.view(-1, widest), group, len(sizes))  # (N, widest)
    return mine[:, : sizes[own]]


class _GatherBatchSumBackward(torch.autograd.Function):
    """forward: all-gather along the batch; backward: sum over the ranks, own rows (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup, ranks: int):
        ctx.group, ctx.ranks = group, ranks
        return _gather_rows(x, group, ranks)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _reduce_scatter_rows(grad, ctx.group, ctx.ranks), None, None


class _GatherUnitsSumBackward(torch.autograd.Function):
    """forward: all-gather along the units; backward: sum over the ranks, own units (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup, sizes: tuple[int, ...], own: int):
        ctx.group, ctx.sizes, ctx.own = group, sizes, own
        return _gather_units(x, group, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _reduce_scatter_units(grad, ctx.group, ctx.sizes, ctx.own), None, None, None


class _GatherUnitsSliceBackward(torch.autograd.Function):
    """forward: all-gather along the units; backward: own units of the (identical) gradient, no sum."""

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup, sizes: tuple[int, ...], own: int):
        ctx.start, ctx.size = sum(sizes[:own]), sizes[own]
        return _gather_units(x, group, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad[:, ctx.start : ctx.start + ctx.size].contiguous(), None, None, None


def gather_batch_for_split_layer(x: Tensor, layout: Layout) -> Tensor:
    """Every rank's images for a layer split by units (pool5 before fc6): (b, F) -> (K*b, F)."""
    if layout.replica_group is None:
        return x
    return _GatherBatchSumBackward.apply(x, layout.replica_group, layout.replicas)


def _units(fn, x: Tensor, layout: Layout, sizes: Sequence[int]) -> Tensor:
    if len(sizes) != layout.replicas:
        raise ValueError(f"need one share per rank ({layout.replicas}), got {list(sizes)}")
    if layout.replica_group is None:
        return x
    return fn.apply(x, layout.replica_group, tuple(sizes), layout.replica)


def gather_units_for_split_layer(x: Tensor, layout: Layout, sizes: Sequence[int]) -> Tensor:
    """All units of a layer for the next split layer (fc6 -> fc7, fc7 -> fc8).

    x: (K*b, sizes[rank]) this rank's units. Returns (K*b, sum(sizes)); backward sums over
    the ranks and keeps the own units.
    """
    return _units(_GatherUnitsSumBackward, x, layout, sizes)


def gather_units_for_replicated(x: Tensor, layout: Layout, sizes: Sequence[int]) -> Tensor:
    """All classes' logits for the loss every rank computes alike: (K*b, C/K) -> (K*b, C).

    Backward keeps the own classes without a sum.
    """
    return _units(_GatherUnitsSliceBackward, x, layout, sizes)


def gather_batch(x: Tensor, layout: Layout) -> Tensor:
    """Every rank's rows of a tensor that needs no gradient (the labels): (b, ...) -> (K*b, ...)."""
    if layout.replica_group is None:
        return x
    return _gather_rows(x, layout.replica_group, layout.replicas)
