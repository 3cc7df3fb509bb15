"""LRN, contrast norm and dropout against the paper's formulas, written out directly here.

Proves: §3.3's LRN with both alpha semantics (per_window = the original code and PyTorch;
per_sum = the printed formula) including the channels at a tower's edge, where the window is
truncated and never reaches into the other tower; cnorm2 equals its cuda-convnet formula;
dropout keeps about half and scales the survivors by 2.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from repro.config import ModelConfig
from repro.net.layers import ContrastNorm, response_norm, tower_dropout
from repro.net.model import AlexNet


def lrn_formula(a: torch.Tensor, alpha_on_sum: float) -> torch.Tensor:
    """b_i = a_i / (k + alpha_on_sum * sum_{j=max(0,i-2)}^{min(C-1,i+2)} a_j^2)^beta, §3.3."""
    k, beta, n = 2.0, 0.75, 5
    out = torch.empty_like(a)
    channels = a.shape[1]
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        s = (a[:, lo : hi + 1] ** 2).sum(dim=1)
        out[:, i] = a[:, i] / (k + alpha_on_sum * s) ** beta
    return out


@pytest.mark.parametrize("semantics, alpha_on_sum", [("per_window", 1e-4 / 5), ("per_sum", 1e-4)])
def test_lrn_matches_formula(semantics, alpha_on_sum):
    torch.manual_seed(0)
    # Large activations so the alpha term is comparable to k and a wrong alpha shows.
    a = torch.rand(2, 48, 5, 5, dtype=torch.float64) * 200
    lrn = response_norm(ModelConfig(lrn_alpha=semantics))
    got = lrn(a)
    torch.testing.assert_close(got, lrn_formula(a, alpha_on_sum), rtol=1e-12, atol=1e-12)
    other = 1e-4 if semantics == "per_window" else 1e-4 / 5
    assert not torch.allclose(got, lrn_formula(a, other), rtol=1e-3)


@pytest.mark.parametrize("semantics", ["per_window", "per_sum"])
def test_lrn_gradient_is_the_formulas(semantics):
    """The hand-written backward against numerical differences and PyTorch's LRN autograd."""
    torch.manual_seed(2)
    lrn = response_norm(ModelConfig(lrn_alpha=semantics))
    a = (torch.rand(2, 7, 3, 3, dtype=torch.float64) * 300).requires_grad_()
    assert torch.autograd.gradcheck(lrn, (a,), eps=1e-4, atol=1e-8, rtol=1e-6)
    reference = torch.nn.LocalResponseNorm(lrn.size, lrn.alpha, lrn.beta, lrn.k)
    g = torch.randn(2, 7, 3, 3, dtype=torch.float64)
    (mine,) = torch.autograd.grad(lrn(a), a, g)
    (theirs,) = torch.autograd.grad(reference(a), a, g)
    torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)
    # channels_last maps take the (B, H, W, C) product and give the same numbers.
    b = a.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    (last,) = torch.autograd.grad(lrn(b), b, g)
    torch.testing.assert_close(lrn(b), lrn(a), rtol=1e-12, atol=0)
    torch.testing.assert_close(last, mine, rtol=1e-12, atol=1e-15)


def test_lrn_float32_against_float64():
    """The float32 path (beta = 3/4 as rsqrt * sqrt, k inside the band product) against
    PyTorch's LRN in float64, forward and backward, NCHW and channels_last; the in-place
    evaluation forward gives the training forward's numbers bit for bit."""
    torch.manual_seed(3)
    lrn = response_norm(ModelConfig())
    reference = torch.nn.LocalResponseNorm(lrn.size, lrn.alpha, lrn.beta, lrn.k)
    a = torch.rand(2, 48, 9, 9) * 300  # ReLU outputs large enough that the window term counts
    g = torch.randn_like(a)
    a64 = a.double().requires_grad_()
    want = reference(a64)
    (want_grad,) = torch.autograd.grad(want, a64, g.double())
    for x in (a, a.contiguous(memory_format=torch.channels_last)):
        x = x.clone().requires_grad_()
        got = lrn(x)
        (grad,) = torch.autograd.grad(got, x, g)
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-7)
        with torch.no_grad():
            assert torch.equal(lrn(x), got)
    with pytest.raises(AssertionError):  # the tolerance sees an error of 1e-5
        torch.testing.assert_close(
            lrn(a).double() * (1 + 1e-5), want.detach(), rtol=1e-6, atol=1e-7
        )


def test_lrn_under_autocast_is_computed_in_float32():
    """Autocast would run the band product (a matmul) in bf16; the LRN turns it off inside, so a
    bf16 map gives the same bits with and without autocast, within bf16's rounding of float64."""
    torch.manual_seed(5)
    lrn = response_norm(ModelConfig())
    a = (torch.rand(2, 48, 9, 9) * 300).bfloat16()
    g = torch.randn(a.shape).bfloat16()
    results = []
    for autocast in (False, True):
        x = a.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            y = lrn(x)
        (grad,) = torch.autograd.grad(y, x, g)
        results.append((y, grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    reference = torch.nn.LocalResponseNorm(lrn.size, lrn.alpha, lrn.beta, lrn.k)
    want = reference(a.double())
    torch.testing.assert_close(results[1][0].double(), want, rtol=4e-3, atol=0)


def test_lrn_acts_within_a_tower():
    """Channels 46-47 of tower 0 and 0-1 of tower 1 are normalized by their own tower only."""
    cfg = ModelConfig(num_classes=10)
    model = AlexNet(cfg).eval()
    x = torch.randn(1, 3, 224, 224) * 50
    relu = [
        torch.relu(model.towers[t].conv1(torch.nn.functional.pad(x, (0, 3, 0, 3)))) for t in "01"
    ]
    normed = [model.towers[t].norm1(r) for t, r in zip("01", relu)]
    for r, nrm in zip(relu, normed):
        torch.testing.assert_close(
            nrm, lrn_formula(r.double(), 1e-4 / 5).float(), rtol=1e-5, atol=1e-6
        )
    # One LRN over all 96 channels (the common one-device simplification) differs at the seam.
    joint = torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)(torch.cat(relu, 1))
    seam = torch.cat(normed, 1)[:, 46:50]
    assert (joint[:, 46:50] - seam).abs().max() > 1e-4


def test_lrn_off():
    assert isinstance(response_norm(ModelConfig(lrn=False)), torch.nn.Identity)


def test_contrast_norm_formula():
    torch.manual_seed(1)
    a = torch.rand(1, 2, 7, 6, dtype=torch.float64) * 30
    got = ContrastNorm()(a)
    expected = torch.empty_like(a)
    for y in range(7):
        for x in range(6):
            win = a[:, :, max(0, y - 2) : y + 3, max(0, x - 2) : x + 3]
            mean = win.mean(dim=(2, 3))
            spread = ((win - mean[:, :, None, None]) ** 2).sum(dim=(2, 3))
            expected[:, :, y, x] = a[:, :, y, x] / (1 + 0.001 / 25 * spread) ** 0.75
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_dropout_rate_and_scale():
    h = torch.ones(256, 512)
    out = tower_dropout(h, 0.5, seed=123, replica=0, replicas=1)
    kept = (out != 0).float().mean().item()
    assert 0.48 < kept < 0.52
    assert set(out.unique().tolist()) == {0.0, 2.0}


def test_dropout_replica_rows_are_slices_of_the_global_mask():
    """Replica r of R draws rows [r*b, (r+1)*b) of the mask one process draws for R*b rows."""
    whole = tower_dropout(torch.ones(8, 16), 0.5, seed=7, replica=0, replicas=1)
    parts = [tower_dropout(torch.ones(4, 16), 0.5, seed=7, replica=r, replicas=2) for r in (0, 1)]
    assert torch.equal(whole, torch.cat(parts))


def test_dropout_masks_differ_between_steps_and_towers():
    cfg = dataclasses.replace(
        ModelConfig(), num_classes=4, widths=(4, 4, 4, 4, 4), fc_width=64, image_size=67
    )
    model = AlexNet(cfg).train()
    masks = []

    def capture(module, inputs, output):  # fc7 is called with every tower's part
        masks.append(torch.cat(inputs[0], dim=1).detach().clone())

    model.towers["0"].fc7.register_forward_hook(capture)
    model.towers["1"].fc7.register_forward_hook(capture)
    x = torch.randn(4, 3, 67, 67)
    model(x)
    model(x)
    # fc7's input is both towers' fc6 output after dropout: its zeros are dropped neurons
    # (or ReLU zeros, which repeat for the same input). Hooks ran tower 0, tower 1, tower 0, ...
    zeros = [(m == 0) for m in masks]
    assert not torch.equal(zeros[0], zeros[2])  # the next step draws a new mask
    model.eval()
    torch.testing.assert_close(model(x), model(x))


@pytest.mark.parametrize("shape", [(3, 8, 13, 13), (2, 48, 55, 55), (2, 5, 6, 7)])
@pytest.mark.parametrize("kernel, stride", [(3, 2), (2, 2)])
def test_max_pool_equals_pytorchs_ties_included(shape, kernel, stride):
    """The CPU pool through the channels_last kernel: the same maxima, the same gradient
    routing (exact ties of ReLU zeros and of a repeated value included), forward and backward."""
    from repro.net.layers import MaxPool

    torch.manual_seed(4)
    x = torch.randn(shape).relu_()  # about half zeros: whole windows tie
    x[:, :, ::3] = 0.5  # and non-zero exact ties
    g = torch.randn(torch.nn.functional.max_pool2d(x, kernel, stride).shape)
    outs = []
    for pool in (MaxPool(kernel, stride), torch.nn.MaxPool2d(kernel, stride)):
        a = x.clone().requires_grad_()
        y = pool(a)
        (grad,) = torch.autograd.grad(y, a, g)
        with torch.no_grad():
            evaluated = pool(x)
        outs.append((y, grad, evaluated))
    (y, grad, ev), (y_ref, grad_ref, ev_ref) = outs
    assert y.is_contiguous() and torch.equal(y, y_ref) and torch.equal(ev, ev_ref)
    assert torch.equal(grad, grad_ref)
    assert (grad != 0).any()
    y, where = MaxPool(kernel, stride, return_indices=True)(x)  # nn.MaxPool2d's own path
    assert torch.equal(y, y_ref) and where.dtype == torch.int64
