"""A capturable training step: the whole net traces as one graph, in one process and on 2 ranks.

Proves: torch.compile(fullgraph=True) with the `aot_eager` backend (no compiler needed)
traces the net in train mode, dropout and the cross-tower exchanges included, with no graph
break (fullgraph raises on one) and no recompile from one step to the next (the dropout
counter is a device tensor); the compiled step gives the eager step's logits and gradients,
and draws a new mask each step, the ones eager mode draws.
"""

from __future__ import annotations

import pytest
import torch
from spawn import run_ranks
from torch.nn import functional as F

from repro.config import ModelConfig
from repro.net import dist
from repro.net.model import AlexNet

SMALL = ModelConfig(num_classes=7, widths=(8, 12, 16, 16, 12), fc_width=32, image_size=67)


def _steps(model, forward, x, y, n: int = 2):
    """n training forwards and backwards; logits and parameter gradients of each."""
    out = []
    for _ in range(n):
        model.zero_grad(set_to_none=True)
        logits = forward(x)
        F.cross_entropy(logits, y).backward()
        out.append((logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    return out


def _compare(layout=None) -> dict:
    torch._dynamo.reset()
    x = torch.randn(4, 3, 67, 67, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 3, 6, 2])
    eager, traced = AlexNet(SMALL, layout, seed=4).train(), AlexNet(SMALL, layout, seed=4).train()
    compiled = torch.compile(traced, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = _steps(traced, compiled, x, y)
    want = _steps(eager, eager, x, y)
    logits_err = max((g[0] - w[0]).abs().max().item() for g, w in zip(got, want))
    grad_err = max(
        (g[1][k] - w[1][k]).abs().max().item() / w[1][k].abs().max().clamp_min(1e-12).item()
        for g, w in zip(got, want)
        for k in w[1]
    )
    return {
        "logits_err": logits_err,
        "grad_err": grad_err,
        "new_mask_each_step": not torch.equal(got[0][0], got[1][0]),
        "draws": traced.towers[next(iter(traced.towers))].dropout_draws,
    }


def _compare_rank():
    return _compare(dist.init_distributed(towers=2, device="cpu"))


@pytest.mark.parametrize("where", ["one_process", "two_ranks"])
def test_training_step_traces_whole_without_breaks_or_recompiles(where):
    results = [_compare()] if where == "one_process" else run_ranks(_compare_rank, 2)
    for r in results:
        assert r["logits_err"] <= 1e-5 and r["grad_err"] <= 1e-4, r
        assert r["new_mask_each_step"] and r["draws"] == 2
