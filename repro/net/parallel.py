"""The cross-tower exchanges (§3.5): one buffer each way, overlapped with the layer that reads it.

Two exchanges, named by their backward (the idea of Megatron-LM's mappings.py):

- before a layer whose output halves live on different ranks (conv3, fc6, fc7, fc8), every
  tower's activation is gathered and the backward SUMS the input gradient over the tower
  group, each rank keeping its own share: each rank's half of conv3 reads all of its input,
  so the input gradients of both halves must be added. The model's cross-tower layers
  (`LinkedConv2d`, `LinkedLinear`) do this exchange inside the layer (`_LinkedLayer`), so that
  the rank's own share is multiplied while the other shares are in flight, and the input
  gradients travel while the weight gradient is computed; `gather_for_split_layer` is the
  same exchange alone, for a layer that wants the whole input at once.
- `gather_for_replicated`: before a computation that every rank of the tower group repeats
  identically (the loss on the full logits). Forward: the same gather. Backward: keep this
  tower's slice, NO sum: every rank already holds the whole, identical gradient, and summing
  would multiply it by the number of towers (PAPER.md §5, first pitfall).

The collectives are single-buffer ones: forward `all_gather_single` of every rank's share into
one (T*B, ...) buffer, backward `reduce_scatter_single` of the stacked share gradients, which
sums over the group and leaves each rank its own share. A rank sends one share each way: the
backward moves the bytes the forward does, half of an all-reduce of the whole gradient.
(torch 2.14 names them so and deprecates all_gather_into_tensor / reduce_scatter_tensor;
older torch has only those.) They work on gloo and NCCL alike. Buffers keep the activation's
memory format: a channels_last share travels in its own NHWC order and is viewed back.

With all towers in one process the exchange alone is a plain `torch.cat` of the local towers,
whose autograd is exactly "keep own slice", and a linked layer reads the local parts directly:
the model calls the same functions either way. The replica half of the layout, the gradient
average, is in repro/net/replicas.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.nn import functional as F

from repro.net.dist import Layout
from repro.net.replicas import GradientAverage, average_gradients  # noqa: F401  (re-exported)

# -- the collectives, on one buffer -----------------------------------------------------------


def _launch(name: str, legacy: str, *args, async_op: bool):
    """Call dist.<name> (or its pre-2.14 name). Async in eager mode; under torch.compile the call
    is synchronous, since dynamo traces only those (it schedules the wait itself)."""
    fn = getattr(dist, name, None) or getattr(dist, legacy)
    return fn(*args, async_op=async_op and not torch.compiler.is_compiling())


def _all_gather(out: Tensor, x: Tensor, group: ProcessGroup, async_op: bool = False):
    """out (T*B, ...) <- every rank's x (B, ...), rank order; a work handle if async."""
    return _launch("all_gather_single", "all_gather_into_tensor", out, x, group, async_op=async_op)


def _reduce_scatter(out: Tensor, x: Tensor, group: ProcessGroup, async_op: bool = False):
    """out (B, ...) <- the sum over ranks of x's (T*B, ...) chunk for this rank."""
    reduce = dist.ReduceOp.SUM
    return _launch(
        "reduce_scatter_single", "reduce_scatter_tensor", out, x, reduce, group, async_op=async_op
    )


def _wait(work) -> None:
    if work is not None:
        work.wait()


def _channels_last(x: Tensor) -> bool:
    return (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def _dense(x: Tensor, channels_last: bool | None = None) -> Tensor:
    """x in a dense buffer's order: (B, H, W, C) for a channels_last map (a view when x is
    one), else (B, C, ...) contiguous. `channels_last` forces the order (default: x's own)."""
    if channels_last is None:
        channels_last = _channels_last(x)
    return x.permute(0, 2, 3, 1).contiguous() if channels_last else x.contiguous()


def _logical(x: Tensor, channels_last: bool) -> Tensor:
    """The inverse of `_dense`: (B, C, H, W) again, as a view."""
    return x.permute(0, 3, 1, 2) if channels_last else x


def _gather_shares(x: Tensor, group: ProcessGroup, towers: int) -> list[Tensor]:
    """Every rank's share of x (B, C, ...), in rank order, in x's memory format."""
    dense, cl = _dense(x), _channels_last(x)
    buffer = dense.new_empty((towers * dense.shape[0], *dense.shape[1:]))
    _all_gather(buffer, dense, group)
    return [_logical(chunk, cl) for chunk in buffer.chunk(towers)]


def _padded(x: Tensor, width: int) -> Tensor:
    """x with zero channels appended up to `width` (equal shares for the collective)."""
    return x if x.shape[1] == width else F.pad(x, [0, 0] * (x.dim() - 2) + [0, width - x.shape[1]])


# -- the exchange alone -------------------------------------------------------------------------


class _GatherSumBackward(torch.autograd.Function):
    """forward: all_gather, concatenated along channels; backward: reduce_scatter (sum), own share."""

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup, sizes: tuple[int, ...], index: int):
        ctx.group, ctx.sizes, ctx.index = group, sizes, index
        shares = _gather_shares(_padded(x, max(sizes)), group, len(sizes))
        return torch.cat([s[:, :n] for s, n in zip(shares, sizes)], dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        sizes, widest = ctx.sizes, max(ctx.sizes)
        cl = _channels_last(grad)
        parts = [_dense(_padded(g, widest), cl) for g in grad.split(list(sizes), dim=1)]
        stacked = torch.cat(parts)  # (T*B, ...): every share's gradient, rank order
        own = stacked.new_empty(parts[0].shape)
        _reduce_scatter(own, stacked, ctx.group)
        return _logical(own, cl)[:, : sizes[ctx.index]], None, None, None


class _GatherSliceBackward(torch.autograd.Function):
    """forward: all_gather, concatenated along channels; backward: own slice, no sum."""

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup, sizes: tuple[int, ...], index: int):
        ctx.sizes, ctx.index = sizes, index
        shares = _gather_shares(_padded(x, max(sizes)), group, len(sizes))
        return torch.cat([s[:, :n] for s, n in zip(shares, sizes)], dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        start = sum(ctx.sizes[: ctx.index])
        return grad[:, start : start + ctx.sizes[ctx.index]], None, None, None


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


# -- the exchange fused with the layer that reads it: overlap ----------------------------------


# A conv's geometry (stride, padding, dilation, groups), or None for a Linear layer.
Geometry = tuple | None


def _geometry(layer: nn.Module) -> Geometry:
    if isinstance(layer, nn.Conv2d):
        return (layer.stride, layer.padding, layer.dilation, layer.groups)
    return None


def _share_op(geo: Geometry, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The layer applied to one tower's share of its input with that share's weight columns."""
    return F.linear(x, weight, bias) if geo is None else F.conv2d(x, weight, bias, *geo)


def _conv_backward(geo: Geometry, grad: Tensor, x: Tensor, weight: Tensor, mask: list[bool]):
    stride, padding, dilation, groups = geo
    bias_sizes = [weight.shape[0]] if mask[2] else None
    return torch.ops.aten.convolution_backward(
        grad, x, weight, bias_sizes, stride, padding, dilation, False, [0, 0], groups, mask
    )


def _input_grad(geo: Geometry, grad: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    if geo is None:
        return grad @ weight
    return _conv_backward(geo, grad, x, weight, [True, False, False])[0]


def _all_grads(geo: Geometry, grad: Tensor, x: Tensor, weight: Tensor, bias: bool):
    """Input, weight and bias gradients of the whole layer in one product (one process)."""
    if geo is None:
        return grad @ weight, grad.t() @ x, grad.sum(0) if bias else None
    return _conv_backward(geo, grad, x, weight, [True, True, bias])


def _weight_grads(geo: Geometry, grad: Tensor, x: Tensor, weight: Tensor, bias: bool):
    if geo is None:
        return grad.t() @ x, grad.sum(0) if bias else None
    _, grad_weight, grad_bias = _conv_backward(geo, grad, x, weight, [False, True, bias])
    return grad_weight, grad_bias


class _LinkedLayer(torch.autograd.Function):
    """One tower's output of a layer that reads every tower (conv3, fc6, fc7, fc8).

    forward: all_gather the towers' input shares (async, across ranks); the tower's own share
    times its weight's columns for that share while the others are in flight, then every
    other share times its columns, added in tower order.
    backward: the input gradient of every share (across ranks: reduce_scatter, async, which
    adds the other towers' and keeps the own share) while the weight gradient is computed.

    In one process every share is an input, the forward runs the same arithmetic, so every
    layout's activations are bit for bit the same. That matters: a max-pool downstream
    routes its gradient by argmax, and the rounding of a whole-input product can flip a
    near-tie between layouts (the paper's init makes conv5's maps nearly flat). The backward,
    which no argmax reads, is one whole-layer product there, and autograd adds the towers'
    input gradients. The weight (out, T*C_in, ...) is the same parameter in every layout;
    only the order of the forward's sum over input channels is by tower.
    """

    @staticmethod
    def forward(ctx, geo, group, towers, tower, weight, bias, *parts):
        cl = _channels_last(parts[0])
        if group is not None:  # one tower here: the other shares come over the link
            dense = _dense(parts[0])
            buffer = dense.new_empty((towers * dense.shape[0], *dense.shape[1:]))
            work = _all_gather(buffer, dense, group, async_op=True)
            own = parts[0]
        else:
            own = parts[tower]
        columns = weight.chunk(towers, dim=1)  # each tower's input channels
        out = _share_op(geo, own, columns[tower], bias)  # needs nothing from the link
        if group is not None:
            _wait(work)
            shares = [_logical(chunk, cl) for chunk in buffer.chunk(towers)]
        else:
            shares = list(parts)
        for s, share in enumerate(shares):
            if s != tower:
                out = out + _share_op(geo, share, columns[s], None)
        ctx.save_for_backward(weight, *shares)
        ctx.setup = (geo, group, towers, tower, cl, bias is not None, out.dtype, own.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        geo, group, towers, tower, cl, has_bias, dtype, x_dtype = ctx.setup
        weight, *shares = ctx.saved_tensors
        # Autocast is off in backward: compute in the forward's dtype, as autocast did.
        grad, weight_c = grad.to(dtype), weight.to(dtype)
        shares = [s.to(dtype) for s in shares]
        whole = torch.cat(shares, dim=1)  # (B, T*C_in, ...): the input the weight saw
        if group is None:
            # Nothing to send: one product for every gradient, the cheapest on any device.
            # (Only the forward must round as the ranks do; see the class docstring.)
            grad_whole, grad_weight, grad_bias = _all_grads(geo, grad, whole, weight_c, has_bias)
            share_grads = list(grad_whole.chunk(towers, dim=1))
        else:  # the other ranks add theirs; this rank keeps its own share
            columns = weight_c.chunk(towers, dim=1)
            share_grads = [_input_grad(geo, grad, x, w) for x, w in zip(shares, columns)]
            stacked = torch.cat([_dense(g, cl) for g in share_grads])  # (T*B, ...), rank order
            own = stacked.new_empty(stacked.chunk(towers)[0].shape)
            work = _reduce_scatter(own, stacked, group, async_op=True)
            # The weight gradient while the input gradients travel.
            grad_weight, grad_bias = _weight_grads(geo, grad, whole, weight_c, has_bias)
            _wait(work)
            share_grads = [_logical(own, cl)]
        grad_weight = grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(weight.dtype)
        grad_parts = [g.to(x_dtype) for g in share_grads]
        return None, None, None, None, grad_weight, grad_bias, *grad_parts


class _Linked:
    """What the cross-tower layers share: forward(parts, layout) reads every tower's part.

    parts: this process's towers' activations in tower order, each (B, C, ...): all of them
    in one process, the rank's own across ranks (the others come over the link).
    """

    tower: int

    def forward(self, parts: Sequence[Tensor], layout: Layout) -> Tensor:
        if len(parts) != len(layout.local_towers):
            raise ValueError(f"need one activation per local tower {layout.local_towers}")
        geo = _geometry(self)
        return _LinkedLayer.apply(
            geo, layout.tower_group, layout.towers, self.tower, self.weight, self.bias, *parts
        )


class LinkedConv2d(_Linked, nn.Conv2d):
    """conv3 (§3.5): a convolution over every tower's maps, the weight's input channels in
    tower order. Same parameters as nn.Conv2d; `tower` is the tower whose output it makes."""

    def __init__(self, *args, tower: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.tower = tower


class LinkedLinear(_Linked, nn.Linear):
    """fc6, fc7, fc8 (§3.5): a fully connected layer over every tower's units, in tower order.
    Same parameters as nn.Linear; `tower` is the tower whose output it makes."""

    def __init__(self, *args, tower: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.tower = tower


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
