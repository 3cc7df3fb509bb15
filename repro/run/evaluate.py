"""Top-1 / top-5 error the paper's way: the centre patch, or the softmax averaged over 10 patches.

§4.1: at test time the net sees the four corner 224 patches and the centre patch of the
256x256 image and their reflections, and the softmax of the ten is averaged. The eval
loader keeps an image's ten views consecutive, so (b*10, C) logits reshape to (b, 10, C).

Replicas evaluate disjoint shards; their counts are summed over the replica group, so every
rank returns the figures of the whole validation set. Under train.parallel='owt' the net's
forward spans all ranks: they step through their shards together and each counts its own rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from repro.net.dist import Layout
from repro.net.schemes import lockstep_batches, own_rows
from repro.run.agree import any_rank

VIEWS = {"center": 1, "ten": 10}


def class_probabilities(model: torch.nn.Module, images: Tensor, views: int, autocast) -> Tensor:
    """(b, C) softmax, averaged over each image's `views` consecutive patches (§4.1)."""
    with torch.no_grad(), autocast():
        logits = model(images).float()
    probs = logits.softmax(dim=1)
    return probs.view(-1, views, probs.shape[1]).mean(dim=1)


def evaluate(
    model: torch.nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    layout: Layout,
    num_classes: int,
    patches: str = "center",
    autocast=None,
    progress=None,
    stop: Callable[[], bool] | None = None,
) -> dict | None:
    """Top-1/top-5 error, per-class accuracy, the confusion matrix and the loss over the whole set.

    `autocast` is a zero-argument callable returning a context manager (bf16 on GPU).
    Every rank of a replica runs the same batches (its towers need each other); `progress`
    (a tqdm-like object or None) is advanced by the number of images.

    `stop`: this rank's stop flag (a signal handler's). It is read before each batch and
    agreed over all ranks (one all-reduce of one number per batch, on the batches every
    replica has: shards may differ by one batch); when any rank's flag is up, every rank
    returns None at the same batch. A validation pass on ImageNet takes minutes, longer
    than a launcher's grace period after SIGTERM.
    """
    if patches not in VIEWS:
        raise ValueError(f"patches must be one of {sorted(VIEWS)}, got {patches!r}")
    views = VIEWS[patches]
    autocast = autocast or _no_autocast
    was_training = model.training
    model.eval()
    k = min(5, num_classes)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    top_k_hits = torch.zeros((), dtype=torch.float64)
    nll = torch.zeros((), dtype=torch.float64)  # sum of -log p(true class), p as averaged
    checked = _batches_on_every_rank(batches, layout) if stop is not None else 0
    for i, (images, labels) in enumerate(
        lockstep_batches(batches, layout, views, model)
    ):  # owt: in step
        if i < checked and any_rank(stop(), layout):
            model.train(was_training)
            return None
        probs = class_probabilities(model, images, views, autocast)
        probs, labels = own_rows(probs, labels.view(-1).to(probs.device), layout)
        if probs.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{patches} evaluation got {images.shape[0]} images for {labels.shape[0]} "
                f"labels; expected {views} views per label"
            )
        best = probs.topk(k, dim=1).indices
        top_k_hits += (best == labels[:, None]).any(dim=1).sum().double().cpu()
        nll -= probs.gather(1, labels[:, None]).clamp_min(1e-30).log().sum().double().cpu()
        index = labels.cpu() * num_classes + best[:, 0].cpu()
        confusion += torch.bincount(index, minlength=num_classes**2).view_as(confusion)
        if progress is not None:
            progress.update(labels.shape[0])
    model.train(was_training)
    if layout.replica_group is not None:
        packed = torch.cat([confusion.flatten(), top_k_hits.view(1), nll.view(1)])
        packed = packed.to(layout.device)  # NCCL reduces only GPU tensors
        dist.all_reduce(packed, group=layout.replica_group)
        packed = packed.cpu()
        confusion, top_k_hits, nll = packed[:-2].view_as(confusion), packed[-2], packed[-1]
    result = summarize_confusion(confusion, top_k_hits.item(), patches)
    # The validation loss (cross-entropy of the averaged softmax), per image.
    result["loss"] = nll.item() / result["images"]
    return result


def _batches_on_every_rank(batches: Iterable, layout: Layout) -> int:
    """The number of batches that every rank's shard has (the fewest over all ranks)."""
    n = torch.tensor([len(batches)], device=layout.device)  # type: ignore[arg-type]
    if layout.distributed:
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
    return int(n.item())


def _no_autocast():
    return torch.autocast("cpu", enabled=False)


def summarize_confusion(confusion: Tensor, top_k_hits: float, patches: str) -> dict:
    """Errors in percent, as the paper reports them, from (true, predicted) counts.

    With fewer than 5 classes, 'top5_error' counts the top min(5, classes) guesses (so it is 0).
    """
    images = confusion.sum().item()
    if images == 0:
        raise ValueError("evaluation saw no images: is the validation folder empty?")
    correct = confusion.diag()
    per_class_total = confusion.sum(dim=1)
    per_class = torch.where(per_class_total > 0, correct / per_class_total.clamp_min(1), torch.nan)
    return {
        "patches": patches,
        "images": int(images),
        "top1_error": 100.0 * (1 - correct.sum().item() / images),
        "top5_error": 100.0 * (1 - top_k_hits / images),
        "per_class_accuracy": [None if torch.isnan(a) else float(a) for a in per_class],
        "confusion": confusion.long().tolist(),
    }
