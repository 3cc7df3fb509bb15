"""The cross-tower layers and the bucketed replica average against their one-process forms.

Proves, on gloo ranks: a linked conv (NCHW and channels_last) and a linked linear layer on 2
ranks give the one-process outputs bit for bit and the same input, weight and bias gradients,
and the exchange alone keeps a channels_last map channels_last, forward and backward;
the exchange inside them is overlapped (the all_gather is launched before the own share's
product and waited after it; the reduce_scatter is launched before the weight gradient and
waited after it); the replica average done in buckets during backward gives the parameters
one process reaches on the whole batch, over several buckets, with the run's fused SGD, in
NCHW and channels_last (each averaged gradient keeps its weight's strides).
"""

from __future__ import annotations

import dataclasses

import torch
from spawn import run_ranks
from torch.nn import functional as F

from repro.config import ModelConfig, OptimConfig
from repro.net import dist, parallel
from repro.net.dist import single_process_layout
from repro.net.model import AlexNet
from repro.net.parallel import LinkedConv2d, LinkedLinear, gather_for_split_layer
from repro.net.replicas import GradientAverage
from repro.run.optim import build_optimizer

OPTIM = OptimConfig(lr=0.05)  # the paper's momentum and weight decay, a larger step


def _layers(kind: str, tower: int) -> torch.nn.Module:
    torch.manual_seed(10 + tower)  # each tower's layer its own weights, the same on every rank
    if kind == "linear":
        return LinkedLinear(2 * 6, 5, tower=tower)
    return LinkedConv2d(2 * 4, 3, 3, padding=1, tower=tower)


def _inputs(kind: str, channels_last: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shape = (3, 6) if kind == "linear" else (3, 4, 5, 5)
    parts = [torch.randn(shape, generator=gen) for _ in range(2)]
    if channels_last:
        parts = [p.contiguous(memory_format=torch.channels_last) for p in parts]
    return [p.requires_grad_() for p in parts]


def _loss(outs: list[torch.Tensor]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)


CASES = (("conv", False), ("conv", True), ("linear", False))


def _linked_rank():
    layout = dist.init_distributed(towers=2, device="cpu")
    cases = [_linked_case(layout, kind, channels_last) for kind, channels_last in CASES]
    return cases, _gather_channels_last(layout)


def _gather_channels_last(layout) -> dict:
    """The exchange alone on channels_last maps: the one-process concatenation and gradient."""
    t = layout.tower_rank
    parts = _inputs("conv", channels_last=True)
    whole = gather_for_split_layer([parts[t]], layout, [4, 4])
    ref_parts = _inputs("conv", channels_last=True)
    ref = gather_for_split_layer(ref_parts, single_process_layout(2), [4, 4])
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5))
    (whole * weight).sum().backward()  # each rank's loss term; the sum adds both ranks'
    (2 * ref * weight).sum().backward()  # one process: both ranks' terms at once
    return {
        "forward": torch.equal(whole, ref),
        "grad": (parts[t].grad - ref_parts[t].grad).abs().max().item(),
        "kept": whole.is_contiguous(memory_format=torch.channels_last),
    }


def _linked_case(layout, kind: str, channels_last: bool) -> dict:
    t = layout.tower_rank
    # One process: both towers' layers read both parts.
    ref_layers = [_layers(kind, 0), _layers(kind, 1)]
    ref_parts = _inputs(kind, channels_last)
    ref_outs = [layer(ref_parts, single_process_layout(2)) for layer in ref_layers]
    _loss(ref_outs).backward()
    # This rank: its tower's layer and its part; the other part comes over the link.
    layer, parts = _layers(kind, t), _inputs(kind, channels_last)
    out = layer([parts[t]], layout)
    outs = [torch.zeros_like(ref_outs[0]), torch.zeros_like(ref_outs[1])]
    outs[t] = out  # the same loss terms for this tower's output as in one process
    _loss(outs).backward()
    return {
        "out_equal": torch.equal(out, ref_outs[t]),
        "channels_last_kept": out.is_contiguous(memory_format=torch.channels_last)
        if channels_last
        else None,
        "input_grad": (parts[t].grad - ref_parts[t].grad).abs().max().item(),
        "weight_grad": (layer.weight.grad - ref_layers[t].weight.grad).abs().max().item(),
        "bias_grad": (layer.bias.grad - ref_layers[t].bias.grad).abs().max().item(),
        "scale": ref_parts[t].grad.abs().max().item(),
    }


def test_linked_layers_on_two_ranks_equal_one_process():
    for results, gathered in run_ranks(_linked_rank, 2):
        assert gathered["forward"] and gathered["kept"] and gathered["grad"] <= 1e-6
        for (kind, channels_last), r in zip(CASES, results):
            assert r["out_equal"], (kind, channels_last)  # the same arithmetic, bit for bit
            assert r["scale"] > 0.1
            for name in ("input_grad", "weight_grad", "bias_grad"):
                assert r[name] <= 1e-6 * max(1.0, r["scale"]), (kind, channels_last, name, r)
            if channels_last:
                assert r["channels_last_kept"]


class _Log:
    """Stands in for torch.distributed inside parallel.py: logs launches and waits, sends nothing."""

    def __init__(self, events: list):
        self.events = events

    def __getattr__(self, name):
        return getattr(torch.distributed, name)

    def _work(self, name: str):
        events = self.events

        class Work:
            def wait(self):
                events.append(f"wait {name}")

        events.append(f"launch {name}")
        return Work()

    def all_gather_single(self, out, x, group=None, async_op=False):
        out.copy_(torch.cat([x] * (out.shape[0] // x.shape[0])))
        return self._work("all_gather") if async_op else None

    def reduce_scatter_single(self, out, x, op=None, group=None, async_op=False):
        out.copy_(x[: out.shape[0]])
        return self._work("reduce_scatter") if async_op else None


def test_the_exchange_overlaps_the_layers_own_arithmetic(monkeypatch):
    """Forward: launch, own share's product, wait, the other share. Backward: launch, weight
    gradient, wait. (One rank of two: a group that the logging stand-in ignores.)"""
    events: list[str] = []
    monkeypatch.setattr(parallel, "dist", _Log(events))
    real_op, real_weights = parallel._share_op, parallel._weight_grads

    def share_op(geo, x, weight, bias):
        events.append("product " + ("own" if bias is not None else "other"))
        return real_op(geo, x, weight, bias)

    def weight_grads(*args):
        events.append("weight gradient")
        return real_weights(*args)

    monkeypatch.setattr(parallel, "_share_op", share_op)
    monkeypatch.setattr(parallel, "_weight_grads", weight_grads)
    # One rank of a 2-rank tower group (tower 1), with a group only the stand-in sees.
    layout = dataclasses.replace(single_process_layout(2), local_towers=(1,), tower_group=object())
    layer = LinkedLinear(8, 3, tower=1)
    x = torch.randn(2, 4, requires_grad=True)
    layer([x], layout).sum().backward()
    assert events == [
        "launch all_gather",
        "product own",  # tower 1's own share, while tower 0's is in flight
        "wait all_gather",
        "product other",
        "launch reduce_scatter",
        "weight gradient",  # while the input gradients travel
        "wait reduce_scatter",
    ]
    assert x.grad.shape == (2, 4) and layer.weight.grad.shape == (3, 8)


def _replicas_rank(steps: int, bucket_mb: float):
    """2 replicas of a one-tower net (world 2 = 2 x 1): bucketed average vs one process, with
    the run's own optimizer (fused SGD), in NCHW and in channels_last."""
    cfg = ModelConfig(
        towers=1, num_classes=5, widths=(8, 12, 16, 16, 12), fc_width=32, image_size=67
    )
    layout = dist.init_distributed(towers=1, device="cpu")
    results = {}
    for channels_last in (False, True):
        memory = torch.channels_last if channels_last else torch.contiguous_format
        model = AlexNet(cfg, layout, seed=1).train().to(memory_format=memory)
        ref = AlexNet(cfg, seed=1).train().to(memory_format=memory)
        opt, ref_opt = build_optimizer(model, OPTIM), build_optimizer(ref, OPTIM)
        average = GradientAverage(list(model.parameters()), layout, bucket_mb=bucket_mb)
        gen = torch.Generator().manual_seed(3)
        strides_kept = True
        for _ in range(steps):
            x = torch.randn(6, 3, 67, 67, generator=gen).contiguous(memory_format=memory)
            y = torch.randint(0, 5, (6,), generator=gen)
            mine = slice(3 * layout.replica, 3 * layout.replica + 3)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[mine]), y[mine]).backward()
            average.finish()
            # fused SGD on CUDA refuses a gradient laid out unlike its weight (and on the CPU
            # it pairs the wrong elements): the averaged slice keeps the weight's strides.
            strides_kept &= all(p.grad.stride() == p.stride() for p in model.parameters())
            opt.step()
            ref_opt.zero_grad(set_to_none=True)
            F.cross_entropy(ref(x), y).backward()
            ref_opt.step()
        average.remove()
        ref_params = dict(ref.named_parameters())
        errs = {
            n: ((p - ref_params[n]).norm() / ref_params[n].norm()).item()
            for n, p in model.named_parameters()
        }
        results[channels_last] = (errs, strides_kept)
    return results, len(average.buckets), layout.replicas


def test_bucketed_replica_average_equals_one_process():
    # 0.01 MB buckets: the 16 tensors travel in several all_reduces launched during backward.
    for results, buckets, replicas in run_ranks(_replicas_rank, 2, 3, 0.01):
        assert replicas == 2 and buckets >= 3
        for channels_last, (errs, strides_kept) in results.items():
            assert strides_kept, channels_last
            worst = max(errs.items(), key=lambda kv: kv[1])
            assert worst[1] <= 1e-5, (channels_last, worst)
