"""train.parallel 'data' and 'owt' on gloo ranks against the one-process net fed the whole batch.

Proves, for K = 2 and K = 4 ranks (one spawn per K): under 'data' (both towers on every
rank) and 'owt' (convolutions per rank, fc6-fc8 split by units, PAPER.md §7) the logits, the
loss and every parameter's gradient equal one process fed the concatenated K*b batch, in
train mode with dropout (the same masks), and so do the parameters and momentum after 5 SGD
steps; 'owt' with K = 4 splits one tower's fc rows over two ranks and fc8's 7 classes 2, 2,
2, 1. A checkpoint's state moves from 'owt' to 'towers' ranks and from one process to 'owt',
and the next step still equals one process; evaluation under 'owt' with shards of unequal
length gives one process's figures; on one process 'owt' is the one-process net, the
layers-150 variant (fc8_only) and an odd class count included. Bad world sizes and batches
are refused naming what fits.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from spawn import run_ranks

from repro.config import ConfigError, ModelConfig, load_config, validate_for_layout
from repro.net import dist
from repro.net.dist import grid_shape, single_process_layout
from repro.net.hybrid_model import HybridAlexNet
from repro.net.model import AlexNet
from repro.net.schemes import (
    batch_labels,
    build_model,
    full_tensors,
    gradient_reduction,
    local_tensors,
    reduce_gradients,
)
from repro.run.evaluate import evaluate
from repro.run.optim import load_momentum_by_name, momentum_by_name

SMALL = ModelConfig(num_classes=7, widths=(8, 12, 16, 16, 12), fc_width=32, image_size=67)
TOL = 1e-5  # relative error in float32, as tests/test_net_parallel.py
STEPS, BATCH = 5, 8
ONE = single_process_layout(2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def sgd(model: torch.nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def batches(steps: int, cfg: ModelConfig, seed: int = 11):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(BATCH, 3, cfg.image_size, cfg.image_size, generator=gen)
        yield x, torch.randint(0, cfg.num_classes, (BATCH,), generator=gen)


def share(layout) -> slice:
    """This replica's rows of the global batch."""
    b = BATCH // layout.replicas
    return slice(layout.replica * b, (layout.replica + 1) * b)


def forward_backward(model, layout, x, y) -> tuple[torch.Tensor, float]:
    """Logits and loss of `model` on its share of the global batch; gradients reduced."""
    mine = share(layout)
    logits = model(x[mine])
    loss = torch.nn.functional.cross_entropy(logits, batch_labels(y[mine], layout))
    model.zero_grad()
    loss.backward()
    reduce_gradients(model, layout)
    return logits.detach(), loss.item()


def whole(model, opt) -> tuple[dict, dict]:
    """(full state, full momentum) as a checkpoint holds them (a collective)."""
    return model.full_state_dict(), full_tensors(model, momentum_by_name(model, opt))


def max_err(mine: dict, ref: dict) -> tuple[float, str]:
    """The largest relative error over the 32 parameters (2 towers x 8 layers x (w, b))."""
    names = [k for k in ref if not k.endswith("_extra_state")]  # the dropout counters
    assert len(names) == 32 and set(names) <= set(mine)
    return max((rel_err(mine[k], ref[k]), k) for k in names)


def _scheme_vs_one_process(cfg: ModelConfig, layout):
    """5 SGD steps in `layout` and in one process fed the whole batch, dropout on."""
    model, ref = build_model(cfg, layout, seed=1).train(), AlexNet(cfg, seed=1).train()
    opt, ref_opt = sgd(model), sgd(ref)
    start = {k: v.clone() for k, v in model.full_state_dict().items() if "_extra" not in k}
    out = {"losses": [], "logits": 0.0, "grads": (0.0, "")}
    for x, y in batches(STEPS, cfg):
        logits, loss = forward_backward(model, layout, x, y)
        ref_logits, ref_loss = forward_backward(ref, ONE, x, y)
        # 'data': this rank's rows of the logits; 'owt': every rank's rows, on every rank.
        expect = ref_logits if layout.parallel == "owt" else ref_logits[share(layout)]
        out["logits"] = max(out["logits"], rel_err(logits, expect))
        grads = full_tensors(model, {n: p.grad for n, p in model.named_parameters()})
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}
        out["grads"] = max(out["grads"], max_err(grads, ref_grads))
        out["losses"].append((loss, ref_loss))
        opt.step(), ref_opt.step()
    (params, momentum), (ref_params, ref_momentum) = whole(model, opt), whole(ref, ref_opt)
    out["params"], out["momentum"] = max_err(params, ref_params), max_err(momentum, ref_momentum)
    out["moved"] = max_err(params, start)[0]  # the steps changed the weights
    return out, (model, opt, ref, ref_opt)


def _moves(cfg: ModelConfig, layouts: dict, trained) -> dict:
    """owt -> towers and one process -> owt, momentum included; the next step equals one process."""
    owt, owt_opt, ref, ref_opt = trained
    # Initial weights here, trained ones loaded; seed 1 as the run's (it seeds the dropout masks).
    towers = AlexNet(cfg, layouts["towers"], seed=1).train()
    fresh = HybridAlexNet(cfg, layouts["owt"], seed=1).train()
    moved = {
        "owt_to_towers": (towers, sgd(towers), whole(owt, owt_opt)),
        "one_process_to_owt": (fresh, sgd(fresh), whole(ref, ref_opt)),
    }
    for model, opt, (state, momentum) in moved.values():
        model.load_full_state_dict(state)
        load_momentum_by_name(model, opt, local_tensors(model, momentum))
    x, y = next(batches(1, cfg, seed=12))
    forward_backward(ref, ONE, x, y)
    ref_opt.step()
    errs = {}
    for name, (model, opt, _) in moved.items():
        forward_backward(model, model.layout, x, y)
        opt.step()
        errs[name] = max_err(whole(model, opt)[0], ref.full_state_dict())
    return errs


def _eval_rank(cfg: ModelConfig, layout, model, ref) -> tuple[dict, dict]:
    """10-patch evaluation of 26 images, shards of 6/7 images in batches of 3 (2 or 3 batches)."""
    gen = torch.Generator().manual_seed(5)
    n, views = 26, 10
    images = torch.randn(n * views, 3, cfg.image_size, cfg.image_size, generator=gen)
    labels = torch.randint(0, cfg.num_classes, (n,), generator=gen)
    lo, hi = layout.replica * n // layout.replicas, (layout.replica + 1) * n // layout.replicas
    own = [
        (images[s * views : min(s + 3, hi) * views], labels[s : min(s + 3, hi)])
        for s in range(lo, hi, 3)
    ]
    everything = [(images, labels)]
    mine = evaluate(model, own, layout, cfg.num_classes, "ten")
    return mine, evaluate(ref, everything, single_process_layout(2), cfg.num_classes, "ten")


def _schemes_rank(cfg: ModelConfig):
    layouts = {p: dist.init_distributed(2, "cpu", parallel=p) for p in ("data", "owt", "towers")}
    results, trained = {}, None
    for scheme in ("data", "owt"):
        results[scheme], state = _scheme_vs_one_process(cfg, layouts[scheme])
        trained = state if scheme == "owt" else trained
    results["eval"] = _eval_rank(cfg, layouts["owt"], trained[0], trained[2])
    results["moves"] = _moves(cfg, layouts, trained)
    owt = trained[0]
    results["shapes"] = {n: tuple(p.shape) for n, p in owt.named_parameters() if "fc" in n}
    results["reduced"] = sorted(
        n
        for n, p in owt.named_parameters()
        if any(p is q for q in gradient_reduction(owt, layouts["owt"])[0])
    )
    return results


def check(results: list[dict], ranks: int) -> None:
    for rank, res in enumerate(results):
        for scheme in ("data", "owt"):
            r = res[scheme]
            for key in ("grads", "params", "momentum"):
                assert r[key][0] <= TOL, (rank, scheme, key, r[key])
            assert r["logits"] <= TOL, (rank, scheme, r["logits"])
            assert r["moved"] > 1e-3  # the steps were real
        for mine, ref in res["owt"]["losses"]:  # every rank computes the whole batch's loss
            assert abs(mine - ref) <= TOL * abs(ref)
        for name, (err, key) in res["moves"].items():
            assert err <= TOL, (rank, name, key, err)
        mine, ref = res["eval"]
        assert mine["confusion"] == ref["confusion"] and mine["images"] == 26
        assert abs(mine["loss"] - ref["loss"]) <= TOL * ref["loss"]
        # Convolutions are replicated (their gradients summed); fc rows stay on their rank.
        assert all("conv" in n for n in res["reduced"]) and len(res["reduced"]) == 20
    for step_ in range(STEPS):  # 'data': each rank's loss is its own images' mean
        mean = sum(res["data"]["losses"][step_][0] for res in results) / ranks
        ref = results[0]["data"]["losses"][step_][1]
        assert abs(mean - ref) <= TOL * abs(ref)


def test_two_ranks_data_and_owt_equal_one_process():
    results = run_ranks(_schemes_rank, 2, SMALL)
    check(results, 2)
    # K = 2: rank t holds tower t's fc6/fc7 (24 = 12 x 1 x 1 x 2 inputs), none of the other's.
    assert results[0]["shapes"]["towers.0.fc6.weight"] == (32, 24)
    assert results[0]["shapes"]["towers.1.fc6.weight"] == (0, 24)
    assert results[1]["shapes"]["towers.1.fc8.weight"] == (3, 64)


def test_four_ranks_data_and_owt_equal_one_process():
    results = run_ranks(_schemes_rank, 4, SMALL)
    check(results, 4)
    # K = 4: half a tower's fc6 rows per rank; fc8's 7 classes as 2, 2, 2, 1 (rank 1 holds
    # tower 0's class 2 and tower 1's class 0... of the 4 + 3 tower split).
    assert [r["shapes"]["towers.0.fc6.weight"][0] for r in results] == [16, 16, 0, 0]
    fc8 = [
        (r["shapes"]["towers.0.fc8.weight"][0], r["shapes"]["towers.1.fc8.weight"][0])
        for r in results
    ]
    assert fc8 == [(2, 0), (2, 0), (0, 2), (0, 1)]


@pytest.mark.parametrize(
    "cfg",
    [SMALL, dataclasses.replace(SMALL, exchange="fc8_only", num_classes=5)],
    ids=["paper", "fc8_only_odd_classes"],
)
def test_owt_in_one_process_is_the_one_process_net(cfg):
    """K = 1: the shares are whole towers; fc8_only's fc6/fc7 read their own tower's columns."""
    owt = build_model(cfg, single_process_layout(2, parallel="owt"), seed=3).train()
    ref = AlexNet(cfg, seed=3).train()
    assert isinstance(owt, HybridAlexNet)
    x = torch.randn(
        4, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1)
    )
    logits, ref_logits = owt(x), ref(x)
    assert rel_err(logits, ref_logits) <= TOL
    (logits**2).sum().backward()
    (ref_logits**2).sum().backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    assert max_err({n: p.grad for n, p in owt.named_parameters()}, ref_grads)[0] <= TOL


# -- layouts and batches the schemes cannot split ---------------------------------------------


def test_data_and_owt_take_any_world_size_towers_an_even_one():
    assert grid_shape(3, 2, "owt") == (3, 1)
    assert grid_shape(4, 2, "data") == (4, 1)
    with pytest.raises(dist.LayoutError, match="multiple of 2 ranks"):
        grid_shape(3, 2, "towers")


def test_batch_or_world_size_the_scheme_cannot_split_names_what_fits():
    def cfg(*extra: str):
        return load_config(None, ["data.source=synthetic", "model.num_classes=10", *extra])

    owt = cfg("train.parallel=owt", "train.batch_size=64")
    validate_for_layout(owt, 4)
    what_fits = (
        r"over 3 ranks .* multiple of 3, e\.g\. train\.batch_size=60 or train\.batch_size=66"
    )
    with pytest.raises(ConfigError, match=what_fits):
        validate_for_layout(owt, 3)
    with pytest.raises(ConfigError, match="fc8's 10 classes .* use at most 10 ranks"):
        validate_for_layout(cfg("train.parallel=owt", "train.batch_size=16"), 16)
    validate_for_layout(cfg("train.parallel=data", "train.batch_size=16"), 16)  # data: any K
    with pytest.raises(ConfigError, match="must be one of 'towers', 'data', 'owt'"):
        cfg("train.parallel=hybrid")
