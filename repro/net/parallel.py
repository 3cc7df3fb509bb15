"""The cross-tower exchanges (§3.5) and the data-parallel gradient average.

Two exchanges, named by their backward (the idea of Megatron-LM's mappings.py):

- `gather_for_split_layer`: before a layer whose output halves live on different ranks
  (conv3, fc6, fc7, fc8). Forward: concatenate every tower's activation along channels.
  Backward: SUM the gradient over the tower group, then keep this tower's slice. Each rank's
  half of conv3 reads all of its input, so the input gradients of both halves must be added.
- `gather_for_replicated`: before a computation that every rank of the tower group repeats
  identically (the loss on the full logits). Forward: the same concatenation. Backward: keep
  this tower's slice, NO sum: every rank already holds the whole, identical gradient, and
  summing would multiply it by the number of towers (PAPER.md §5, first pitfall).

With all towers in one process the exchange is a plain `torch.cat` of the local towers,
whose autograd is exactly "keep own slice": the model calls the same function either way.
Only the stable list-form `dist.all_gather` and `dist.all_reduce` are used (PAPER.md §5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from repro.net.dist import Layout


def _all_gather_channels(x: Tensor, group: ProcessGroup, sizes: Sequence[int]) -> Tensor:
    """Concatenate every rank's x along dim 1; rank i contributes sizes[i] channels.

    Unequal shares (fc8 with an odd class count) are padded to the largest share for the
    collective and trimmed after, because the list-form all_gather wants equal shapes.
    """
    widest = max(sizes)
    if x.shape[1] < widest:
        pad = x.new_zeros((x.shape[0], widest - x.shape[1], *x.shape[2:]))
        x = torch.cat([x, pad], dim=1)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x, group=group)
    return torch.cat([p[:, :n] for p, n in zip(parts, sizes)], dim=1)


def _own_slice(grad: Tensor, sizes: Sequence[int], index: int) -> Tensor:
    start = sum(sizes[:index])
    return grad[:, start : start + sizes[index]].contiguous()


class _GatherSumBackward(torch.autograd.Function):
    """forward: all-gather along channels; backward: all-reduce (sum) over the group, own slice."""

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup, sizes: tuple[int, ...], index: int):
        ctx.group, ctx.sizes, ctx.index = group, sizes, index
        return _all_gather_channels(x, group, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # A private contiguous copy: all_reduce works in place and autograd may share `grad`.
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=ctx.group)
        return _own_slice(total, ctx.sizes, ctx.index), None, None, None


class _GatherSliceBackward(torch.autograd.Function):
    """forward: all-gather along channels; backward: own slice of the (identical) gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup, sizes: tuple[int, ...], index: int):
        ctx.sizes, ctx.index = sizes, index
        return _all_gather_channels(x, group, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _own_slice(grad, ctx.sizes, ctx.index), None, None, None


def _exchange(
    fn: type[torch.autograd.Function], parts: Sequence[Tensor], layout: Layout, sizes: Sequence[int]
) -> Tensor:
    if len(sizes) != layout.towers:
        raise ValueError(f"need one size per tower ({layout.towers}), got {list(sizes)}")
    if layout.tower_group is None:
        # Every tower is here: the exchange is a concatenation (group of one member).
        return parts[0] if len(parts) == 1 else torch.cat(list(parts), dim=1)
    if len(parts) != 1:
        raise ValueError(f"a rank holds one tower, got {len(parts)} activations")
    return fn.apply(parts[0], layout.tower_group, tuple(sizes), layout.tower_rank)


def gather_for_split_layer(parts: Sequence[Tensor], layout: Layout, sizes: Sequence[int]) -> Tensor:
    """Whole activation for a layer split across towers (conv3, fc6, fc7, fc8).

    parts: this process's towers' activations, each (B, sizes[t], ...). Returns (B, sum(sizes), ...).
    Backward sums over the tower group and keeps the own slice.
    """
    return _exchange(_GatherSumBackward, parts, layout, sizes)


def gather_for_replicated(parts: Sequence[Tensor], layout: Layout, sizes: Sequence[int]) -> Tensor:
    """Whole tensor for a computation every rank repeats (the loss on full logits).

    Same forward as `gather_for_split_layer`; backward keeps the own slice without a sum.
    """
    return _exchange(_GatherSliceBackward, parts, layout, sizes)


def average_gradients(params: Sequence[torch.nn.Parameter], layout: Layout) -> None:
    """Data parallel: average each tower's gradients over its replica group, in one bucket.

    Every replica computed a mean loss over its own b images; averaging the gradients over
    the R replicas gives the gradient of the mean over all R*b images, as one process would.
    """
    if layout.replica_group is None:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=layout.replica_group)  # gloo has no AVG: sum, then divide
    flat /= layout.replicas
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def gather_named_tensors(local: dict[str, Tensor], layout: Layout) -> dict[str, Tensor]:
    """Union of the tower group's named tensors (a full state dict from each rank's towers).

    Collective over the tower group; every rank gets the whole dict, on the CPU.
    """
    local = {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in local.items()}
    if layout.tower_group is None:
        return local
    gathered: list[dict | None] = [None] * layout.tower_size
    dist.all_gather_object(gathered, local, group=layout.tower_group)
    merged: dict[str, Tensor] = {}
    for part in gathered:
        merged.update(part)
    return merged
