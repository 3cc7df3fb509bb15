"""What differs between the three schemes (train.parallel), in one place for the loop to call.

    towers  the paper (§3.5): one tower per rank, R replicas x 2 towers; AlexNet
    data    every rank holds both towers and its own images; AlexNet; the gradients of all
            parameters are averaged over the K ranks
    owt     "one weird trick" (PAPER.md §7): convolutions as 'data', fc6-fc8 split by units
            over the K ranks (HybridAlexNet); every rank computes the same loss over all K*b
            images, so the convolution gradients are summed over the ranks and the fc
            gradients stay local

Each function is the identity, or the existing replicas x towers code, for 'towers'.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from repro.config import ModelConfig
from repro.net.dist import Layout
from repro.net.hybrid import gather_batch
from repro.net.hybrid_model import HybridAlexNet, is_split
from repro.net.model import AlexNet
from repro.net.parallel import average_gradients, gather_named_tensors


def build_model(cfg: ModelConfig, layout: Layout, seed: int = 0) -> AlexNet:
    """The net this layout's scheme runs: HybridAlexNet under 'owt', else AlexNet."""
    if layout.parallel == "owt":
        return HybridAlexNet(cfg, layout, seed)
    return AlexNet(cfg, layout, seed)


# -- the gradients --------------------------------------------------------------------------


def gradient_reduction(model: nn.Module, layout: Layout) -> tuple[list[nn.Parameter], int]:
    """(the parameters whose gradients the replica group adds up, the divisor of that sum).

    'towers'/'data': every parameter, averaged over the R replicas (each replica's loss is
    the mean over its own images). 'owt': the convolutions only, summed (each rank's loss is
    already the mean over all K*b images, its convolutions saw b of them); the fc shares stay.
    """
    if isinstance(model, HybridAlexNet):
        return [p for n, p in model.named_parameters() if not is_split(n)], 1
    return list(model.parameters()), layout.replicas


def reduce_gradients(model: nn.Module, layout: Layout) -> None:
    """Combine the replicated parameters' gradients over the replica group, in one bucket."""
    params, divisor = gradient_reduction(model, layout)
    if layout.replica_group is None:
        return
    if divisor == layout.replicas:
        average_gradients(params, layout)  # 'towers', 'data': the replicas' average
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # one all-reduce, not one per tensor
    dist.all_reduce(flat, group=layout.replica_group)
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def batch_labels(labels: Tensor, layout: Layout) -> Tensor:
    """The labels the loss reads: this replica's under 'towers'/'data'; all K*b under 'owt'."""
    return gather_batch(labels, layout) if layout.parallel == "owt" else labels


# -- state in the one-process form (checkpoints, momentum) ----------------------------------


def full_tensors(model: nn.Module, local: dict) -> dict:
    """Whole named tensors (all towers, whole fc layers) from this process's (a collective)."""
    if isinstance(model, HybridAlexNet):
        return model.gather_shares(local)
    return gather_named_tensors(local, model.layout)


def local_tensors(model: nn.Module, full: dict) -> dict:
    """This process's parts of whole named tensors (its fc rows under 'owt')."""
    return model.take_shares(full) if isinstance(model, HybridAlexNet) else full


# -- evaluation: every rank calls the net together ------------------------------------------


def lockstep_batches(
    batches: Iterable[tuple[Tensor, Tensor]], layout: Layout, views: int, model: AlexNet
) -> Iterator[tuple[Tensor, Tensor]]:
    """'owt': batches of one size on every rank, as many as the longest shard has.

    Under 'owt' a forward is a collective over all ranks with equal batches, but validation
    shards differ by an image and their last batches in size. Each step agrees on the
    largest batch (one small all-reduce); shorter ones are padded with zero images labelled
    -1, and a rank whose shard is done sends only padding. `own_rows` drops the padding.
    """
    if layout.parallel != "owt" or layout.replica_group is None:
        yield from batches
        return
    it = iter(batches)
    while True:
        batch = next(it, None)
        most = torch.tensor([0 if batch is None else len(batch[1])], device=layout.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=layout.replica_group)
        n = int(most.item())
        if n == 0:
            return
        if batch is None:
            side = model.cfg.image_size
            shape = (0, 3, side, side)
            empty = torch.zeros(0, dtype=torch.long, device=layout.device)
            batch = torch.zeros(shape, device=layout.device), empty
        images, labels = batch
        images = torch.cat([images, images.new_zeros((n * views - len(images), *images.shape[1:]))])
        labels = torch.cat([labels, labels.new_full((n - len(labels),), -1)])
        yield images, labels


def own_rows(probs: Tensor, labels: Tensor, layout: Layout) -> tuple[Tensor, Tensor]:
    """'owt': this rank's rows of the (K*b, C) class probabilities, padding dropped."""
    if layout.parallel != "owt" or layout.replica_group is None:
        return probs, labels
    b = len(labels)
    mine = probs[layout.replica * b : (layout.replica + 1) * b]
    keep = (labels >= 0).to(mine.device)
    return mine[keep], labels[keep]
