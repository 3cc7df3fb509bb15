"""Multi-rank layouts against the one-process net, the reference for every layout.

Proves, on gloo ranks standing in for GPUs: each exchange alone gives the one-process forward,
input gradient and weight gradient (and the wrong exchange would double a gradient); the whole
net on 2 ranks gives the same logits, loss and every parameter's gradient, in eval mode and in
train mode with dropout (same masks), and the same parameters after 5 SGD steps; 4 ranks
(2 replicas x 2 towers) equal one process fed the concatenated batch; weights and checkpoints
move between layouts; a world size the layout cannot use is refused.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from spawn import run_ranks

from repro.config import ModelConfig
from repro.net import dist
from repro.net.dist import LayoutError, grid_shape, single_process_layout
from repro.net.model import AlexNet
from repro.net.parallel import average_gradients, gather_for_replicated, gather_for_split_layer

SMALL = ModelConfig(num_classes=7, widths=(8, 12, 16, 16, 12), fc_width=32, image_size=67)
TOL = 1e-5  # issue 2: relative error <= 1e-5 in float32


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# -- each exchange alone ------------------------------------------------------------------


def _exchange_case(kind: str):
    """Two towers: producer p_t makes a (B, 3, 5, 5) half, the exchange joins them, then a
    split conv (out channels split across towers) or a replicated loss consumes the whole."""
    torch.manual_seed(0)
    x = torch.randn(4, 2, 5, 5)
    producers = [torch.nn.Conv2d(2, 3, 3, padding=1) for _ in range(2)]
    consumers = [torch.nn.Conv2d(6, 4, 3, padding=1) for _ in range(2)]
    target = torch.randn(4, 8, 5, 5)

    def loss_from(whole_out):  # every rank computes this on the whole output
        return ((whole_out - target) ** 2).mean()

    return x, producers, consumers, loss_from


def _run_exchange(kind: str, layout, towers):
    x, producers, consumers, loss_from = _exchange_case(kind)
    halves = [producers[t](x) for t in towers]
    if kind == "split":
        whole = gather_for_split_layer(halves, layout, [3, 3])
        outs = [consumers[t](whole) for t in towers]
        out = gather_for_replicated(outs, layout, [4, 4])
    else:  # replicated: the loss reads the gathered halves directly
        out = gather_for_replicated(halves, layout, [3, 3])
        out = torch.cat([out, out[:, :2]], dim=1)
    loss = loss_from(out)
    loss.backward()
    grads = {f"p{t}": producers[t].weight.grad for t in towers}
    if kind == "split":
        grads.update({f"c{t}": consumers[t].weight.grad for t in towers})
    return out.detach(), loss.detach(), grads


def _exchange_rank(kind: str):
    layout = dist.init_distributed(towers=2, device="cpu")
    out, loss, grads = _run_exchange(kind, layout, layout.local_towers)
    ref_out, ref_loss, ref_grads = _run_exchange(kind, single_process_layout(2), (0, 1))
    return {
        "out": rel_err(out, ref_out),
        "loss": rel_err(loss, ref_loss),
        **{k: rel_err(g, ref_grads[k]) for k, g in grads.items()},
    }


@pytest.mark.parametrize("kind", ["split", "replicated"])
def test_exchange_alone_matches_one_process(kind):
    errors = run_ranks(_exchange_rank, 2, kind)
    for rank, errs in enumerate(errors):
        assert len(errs) >= 3
        for name, err in errs.items():
            assert err <= TOL, (rank, name, err)


def _wrong_gather_rank():
    """Using the sum-backward gather before a replicated loss doubles the gradient."""
    layout = dist.init_distributed(towers=2, device="cpu")
    x = torch.ones(2, 3, requires_grad=True)
    whole = gather_for_split_layer([x], layout, [3, 3])
    whole.sum().backward()
    wrong = x.grad.clone()
    x.grad = None
    gather_for_replicated([x], layout, [3, 3]).sum().backward()
    return wrong, x.grad


def test_sum_backward_before_a_replicated_loss_would_double_gradients():
    for wrong, right in run_ranks(_wrong_gather_rank, 2):
        assert torch.equal(right, torch.ones(2, 3))
        assert torch.equal(wrong, 2 * torch.ones(2, 3))


# -- the whole net ------------------------------------------------------------------------


def _net_rank(cfg: ModelConfig, train: bool, batch: int):
    layout = dist.init_distributed(towers=2, device="cpu")
    model = AlexNet(cfg, layout, seed=5).train(train)
    ref = AlexNet(cfg, seed=5).train(train)
    torch.manual_seed(42)
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    y = torch.randint(0, cfg.num_classes, (batch,))
    logits, ref_logits = model(x), ref(x)
    loss = torch.nn.functional.cross_entropy(logits, y)
    ref_loss = torch.nn.functional.cross_entropy(ref_logits, y)
    loss.backward()
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())
    errs = {"logits": rel_err(logits, ref_logits), "loss": rel_err(loss, ref_loss)}
    for name, p in model.named_parameters():
        errs[name] = rel_err(p.grad, ref_params[name].grad)
    return errs, sorted(n for n, _ in model.named_parameters())


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train_dropout"])
def test_paper_net_two_ranks_equal_one_process(train):
    """The full 1000-class net: logits, loss and all 16 tensors' gradients on each rank."""
    results = run_ranks(_net_rank, 2, ModelConfig(), train, 2)
    names = set()
    for errs, params in results:
        names.update(params)
        for name, err in errs.items():
            assert err <= TOL, (name, err)
    assert len(names) == 32  # 2 towers x 8 layers x (weight, bias): every parameter checked


@pytest.mark.parametrize(
    "cfg",
    [
        dataclasses.replace(SMALL, exchange="fc8_only"),
        dataclasses.replace(SMALL, num_classes=5, cnorm2=True, lrn_before_relu_conv1=True),
        dataclasses.replace(SMALL, pool="non_overlapping", lrn=False),
    ],
    ids=["fc8_only", "odd_classes_original_extras", "no_overlap_no_lrn"],
)
def test_variants_two_ranks_equal_one_process(cfg):
    for errs, _ in run_ranks(_net_rank, 2, cfg, True, 3):
        for name, err in errs.items():
            assert err <= TOL, (name, err)


def _sgd_steps_rank(cfg: ModelConfig, steps: int, batch: int, towers_total: int):
    """`steps` SGD steps in this layout and in one process fed the whole global batch."""
    layout = dist.init_distributed(towers=2, device="cpu")
    model = AlexNet(cfg, layout, seed=1).train()
    ref = AlexNet(cfg, seed=1).train()
    make = lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)  # noqa: E731
    opt, ref_opt = make(model), make(ref)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(11)
    b = batch // layout.replicas
    losses = []
    for _ in range(steps):
        x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=gen)
        y = torch.randint(0, cfg.num_classes, (batch,), generator=gen)
        mine = slice(layout.replica * b, (layout.replica + 1) * b)
        loss = torch.nn.functional.cross_entropy(model(x[mine]), y[mine])
        opt.zero_grad()
        loss.backward()
        average_gradients(list(model.parameters()), layout)
        opt.step()
        ref_loss = torch.nn.functional.cross_entropy(ref(x), y)
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        losses.append((loss.item(), ref_loss.item()))
    ref_params = dict(ref.named_parameters())
    errs = {n: rel_err(p.detach(), ref_params[n].detach()) for n, p in model.named_parameters()}
    moved = min(rel_err(p.detach(), start[n]) for n, p in model.named_parameters())
    return errs, losses, layout.replicas, moved


def test_parameters_after_five_sgd_steps_two_ranks():
    for errs, losses, _, moved in run_ranks(_sgd_steps_rank, 2, SMALL, 5, 6, 2):
        assert max(errs.values()) <= TOL, max(errs.items(), key=lambda kv: kv[1])
        # The steps are real: every parameter moved. (This asserted a lower last loss, which
        # random labels give only by chance: so with the old dropout generator, not the new.)
        assert moved > 1e-4
        for mine, ref in losses:
            assert abs(mine - ref) <= TOL * abs(ref)


def test_four_ranks_two_replicas_equal_one_process_on_the_whole_batch():
    """2 replicas x 2 towers, dropout on: same parameters as one process after 5 steps."""
    results = run_ranks(_sgd_steps_rank, 4, SMALL, 5, 8, 2)
    for errs, _, replicas, _ in results:
        assert replicas == 2
        assert max(errs.values()) <= TOL, max(errs.items(), key=lambda kv: kv[1])


# -- weights and checkpoints across layouts -----------------------------------------------


def _state_rank(cfg: ModelConfig):
    layout = dist.init_distributed(towers=2, device="cpu")
    model = AlexNet(cfg, layout, seed=2).eval()
    x = torch.randn(
        3, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0)
    )
    logits = model(x)
    full, grouped = model.full_state_dict(), model.grouped_state_dict()
    # A one-process checkpoint (other seed) loaded into this two-rank model.
    single = AlexNet(cfg, seed=99).eval()
    model.load_full_state_dict(single.full_state_dict())
    moved_in = rel_err(model(x), single(x))
    return logits.detach(), full, grouped, moved_in, sorted(model.state_dict())


def test_state_moves_between_one_process_and_two_ranks():
    cfg = SMALL
    results = run_ranks(_state_rank, 2, cfg)
    reference = AlexNet(cfg, seed=2).eval()
    x = torch.randn(
        3, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0)
    )
    for rank, (logits, full, grouped, moved_in, local_keys) in enumerate(results):
        # Names on rank t are exactly the one-process names of tower t.
        assert all(k.startswith(f"towers.{rank}.") for k in local_keys)
        # Same initial weights as one process (drawn in full, sliced).
        assert rel_err(logits, reference(x)) <= TOL
        # Gathered state from two ranks loads into one process: same function.
        fresh = AlexNet(cfg, seed=77).eval()
        fresh.load_full_state_dict(full)
        torch.testing.assert_close(fresh(x), reference(x), rtol=0, atol=0)
        for k, v in reference.grouped_state_dict().items():
            assert torch.equal(grouped[k], v), k
        assert moved_in <= TOL


# -- layouts that cannot be -----------------------------------------------------------------


def test_grid_shapes():
    assert grid_shape(1, 2) == (1, 1)
    assert grid_shape(2, 2) == (1, 2)
    assert grid_shape(16, 2) == (8, 2)
    assert grid_shape(3, 1) == (3, 1)
    for world in (3, 5, 7):
        with pytest.raises(LayoutError, match=f"world size {world} cannot hold 2-tower"):
            grid_shape(world, 2)


def test_odd_world_size_refused_before_any_process_group(monkeypatch):
    monkeypatch.setitem(os.environ, "WORLD_SIZE", "3")
    monkeypatch.setitem(os.environ, "RANK", "0")
    with pytest.raises(LayoutError, match="multiple of 2 ranks"):
        dist.init_distributed(towers=2, device="cpu")
    assert not torch.distributed.is_initialized()


def test_cuda_without_gpu_is_named():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(LayoutError, match="no CUDA GPU is visible"):
        dist.resolve_device("cuda")


def test_model_and_layout_tower_counts_must_agree():
    with pytest.raises(ValueError, match="layout has 2 towers but model.towers=1"):
        AlexNet(dataclasses.replace(SMALL, towers=1), single_process_layout(2))
