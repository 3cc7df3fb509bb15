"""The paper's building blocks that are options of the net: LRN, contrast norm, pooling, dropout.

Each is small; they live here so that model.py reads like Figure 2.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from repro.config import ModelConfig

LRN_SIZE, LRN_K, LRN_ALPHA, LRN_BETA = 5, 2.0, 1e-4, 0.75  # §3.3: n=5, k=2, alpha=1e-4, beta=0.75


def response_norm(cfg: ModelConfig) -> nn.Module:
    """§3.3 local response normalization across channels, within one tower.

    PyTorch computes b_i = a_i / (k + alpha/n * sum_window a_j^2)^beta, the original code's
    per-window form. The printed formula has no /n, so 'per_sum' passes alpha*n to PyTorch.
    Channels near a tower's edge see a truncated window: the towers' LRNs never mix (§3.5).
    """
    if not cfg.lrn:
        return nn.Identity()
    alpha = LRN_ALPHA * LRN_SIZE if cfg.lrn_alpha == "per_sum" else LRN_ALPHA
    return ResponseNorm(LRN_SIZE, alpha=alpha, beta=LRN_BETA, k=LRN_K)


class ResponseNorm(nn.LocalResponseNorm):
    """nn.LocalResponseNorm's function with a cheaper exact forward and backward (`_ResponseNorm`).

    Same module type, arguments and (empty) state dict as PyTorch's; same zero padding of the
    window (size//2 before, (size-1)//2 after) and alpha/size per element. Results agree to
    float rounding (docs/performance.md). Low-precision inputs are normalised in float32, with
    autocast off inside: it would run the band product (a matmul) in bf16.
    """

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        band = _window_band(x.shape[1], self.size, self.alpha / self.size, x.device, dtype)
        with torch.autocast(x.device.type, enabled=False):
            return _ResponseNorm.apply(x, band, self.k, self.beta)


def _window_band(
    channels: int, size: int, scale: float, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """(C, C): `scale` where channel j is in channel i's window, else 0.

    The window is cut at the first and last channel, as the zero padding of §3.3's formula
    does: the band never reaches past a tower's own channels.
    """
    i = torch.arange(channels, device=device)
    offset = i[None, :] - i[:, None]  # j - i
    inside = (offset >= -(size // 2)) & (offset <= (size - 1) // 2)
    return inside.to(dtype) * scale


def _window_sum(t: Tensor, band: Tensor, add: float = 0.0) -> Tensor:
    """add + the sum over each channel's window, scaled: one (C, C) product per pixel, in t's
    layout.

    A matrix product reads t once; the shifted-slice sum it replaces read it `size` times
    and its backward wrote a zero-padded copy per shift. The band is symmetric. `add` rides
    in the product (baddbmm's / linear's bias) instead of a pass of its own.
    """
    c = t.shape[1]
    if (
        t.dim() == 4
        and not t.is_contiguous()
        and t.is_contiguous(memory_format=torch.channels_last)
    ):
        bias = band.new_full((c,), add) if add else None
        # (B, H, W, C) @ (C, C)^T (+ add): the band is symmetric
        return F.linear(t.permute(0, 2, 3, 1), band, bias).permute(0, 3, 1, 2)
    b = t.shape[0]
    flat = t.reshape(b, c, -1)  # (B, C, H*W)
    if add:
        return torch.baddbmm(band.new_full((1, 1, 1), add), band.expand(b, c, c), flat).view(
            t.shape
        )
    return (band @ flat).view(t.shape)


def _inverse_power(s: Tensor, beta: float, inplace: bool = False) -> Tensor:
    """s^-beta; for the paper's beta = 3/4 as rsqrt(s) * sqrt(rsqrt(s)), on conv1's maps 2.3x
    faster than pow's exp/log at 2 CPU threads (1.7x at 1) when the result's memory is reused
    (train.cpu_memory; page faults for a freshly mapped result cost both alike); within 3e-7
    relative of pow, and the same bits for an element in any batch (pow's scalar tail differs).
    """
    if beta != 0.75:
        return s.pow_(-beta) if inplace else s.pow(-beta)
    r = s.rsqrt_() if inplace else s.rsqrt()  # s^-1/2
    return r.mul_(r.sqrt())  # s^-1/2 * s^-1/4


class _ResponseNorm(torch.autograd.Function):
    """§3.3 LRN, b = a * s^-beta with s = k + alpha/n * sum_window a^2.

    forward: s from one band product of the squares, then b = a * s^-beta.
    backward: grad_a = g * s^-beta - 2 beta * a * sum_window(alpha/n * g * b / s), the exact
    gradient (the window is symmetric, so the same band product serves), in a handful of
    passes over the maps instead of the dozens autograd records for the forward's pieces.
    """

    @staticmethod
    def forward(ctx, x: Tensor, band: Tensor, k: float, beta: float) -> Tensor:
        xf = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        s = _window_sum(xf * xf, band, add=k)
        if not any(ctx.needs_input_grad):  # evaluation: nothing to keep, work in place
            return _inverse_power(s, beta, inplace=True).mul_(xf).to(x.dtype)
        inv = _inverse_power(s, beta)
        ctx.save_for_backward(xf, s, inv, band)
        ctx.beta = beta
        return (xf * inv).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward is not itself differentiable
    def backward(ctx, grad: Tensor):
        xf, s, inv, band = ctx.saved_tensors
        g = grad.to(xf.dtype)
        t = g * xf
        t.mul_(inv).div_(s)  # g * b / s
        out = g * inv
        out.addcmul_(xf, _window_sum(t, band), value=-2 * ctx.beta)
        return out.to(grad.dtype), None, None, None


class ContrastNorm(nn.Module):
    """The original code's `cnorm2`: same-map local contrast normalization after LRN2.

    b = a / (1 + scale * sum_{5x5} (a - m)^2)^pow, m the mean over the 5x5 neighbourhood,
    scale 0.001/25, pow 0.75 (cuda-convnet's cnorm layer; PAPER.md §1). sum (a - m)^2 is
    computed as count * (E[a^2] - m^2); windows are clipped at the map's border.
    """

    def __init__(self, size: int = 5, scale: float = 0.001 / 25, power: float = 0.75):
        super().__init__()
        self.size, self.scale, self.power = size, scale, power

    def forward(self, x: Tensor) -> Tensor:
        pool = nn.functional.avg_pool2d
        args = dict(kernel_size=self.size, stride=1, padding=self.size // 2)
        mean = pool(x, **args, count_include_pad=False)
        mean_sq = pool(x * x, **args, count_include_pad=False)
        count = pool(torch.ones_like(x[:1, :1]), **args, count_include_pad=True) * self.size**2
        spread = (count * (mean_sq - mean * mean)).clamp_min(0)
        return x / (1 + self.scale * spread).pow(self.power)


def max_pool(cfg: ModelConfig) -> nn.MaxPool2d:
    """§3.4 overlapping pooling z=3, s=2; the ablation (layers-147) uses z=s=2."""
    return MaxPool(3, 2) if cfg.pool == "overlapping" else MaxPool(2, 2)


class MaxPool(nn.MaxPool2d):
    """nn.MaxPool2d whose CPU forward on NCHW maps runs PyTorch's channels_last kernel.

    PyTorch's NCHW max-pool kernel on the CPU walks each map on its own; the channels_last one
    takes a pixel's channels in one vector, several times faster even with the layout change
    there and back (docs/performance.md). Same module, arguments and state as nn.MaxPool2d;
    the maxima and their indices are the NCHW kernel's, ties included (tests/test_net_layers.py),
    so the backward (PyTorch's NCHW kernel, from those indices) routes gradients identically.
    Other devices and layouts take nn.MaxPool2d's own path.
    """

    def forward(self, x: Tensor) -> Tensor:
        nchw_cpu = x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous()
        plain = (
            self.padding == 0 and self.dilation == 1 and not (self.ceil_mode or self.return_indices)
        )
        if not (nchw_cpu and plain and x.shape[1] > 1):
            return super().forward(x)
        k, s = _pair(self.kernel_size), _pair(self.stride or self.kernel_size)
        if not (torch.is_grad_enabled() and x.requires_grad):
            cl = x.contiguous(memory_format=torch.channels_last)
            return F.max_pool2d(cl, k, s).contiguous()
        return _ChannelsLastMaxPool.apply(x, k, s)


def _pair(v) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


class _ChannelsLastMaxPool(torch.autograd.Function):
    """Forward on a channels_last copy; backward by PyTorch's own NCHW kernel from the indices
    (flat h*W+w within each map, the same in either layout)."""

    @staticmethod
    def forward(ctx, x: Tensor, kernel: list[int], stride: list[int]) -> Tensor:
        cl = x.contiguous(memory_format=torch.channels_last)
        y, indices = torch.ops.aten.max_pool2d_with_indices(cl, kernel, stride)
        ctx.save_for_backward(x, indices.contiguous())
        ctx.kernel, ctx.stride = kernel, stride
        return y.contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, indices = ctx.saved_tensors
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(
            grad.contiguous(), x, ctx.kernel, ctx.stride, [0, 0], [1, 1], False, indices
        )
        return grad_x, None, None


def spatial_sizes(cfg: ModelConfig) -> dict[str, int]:
    """Side of each feature map for the configured input: 55/27/13/13/6 for the paper's 224."""
    pool_k, pool_s = (3, 2) if cfg.pool == "overlapping" else (2, 2)
    side = cfg.image_size + cfg.pad_right_bottom
    conv1 = (side - 11) // 4 + 1
    pool1 = (conv1 - pool_k) // pool_s + 1
    pool2 = (pool1 - pool_k) // pool_s + 1
    pool5 = (pool2 - pool_k) // pool_s + 1
    if min(conv1, pool1, pool2, pool5) < 1:
        raise ValueError(
            f"model.image_size={cfg.image_size} (+ pad {cfg.pad_right_bottom}) is too small: "
            f"conv1 11x11/4 and three 3/2 poolings need at least 67 pixels"
        )
    return {"input": side, "conv1": conv1, "pool1": pool1, "pool2": pool2, "pool5": pool5}


_LOW32 = 0xFFFFFFFF


def _mix(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xor-shift-multiply rounds, constants from Chris Wellons' hash
    prospector) on int64 tensors holding values below 2^32; the multipliers are below 2^31,
    so no product leaves int64 on any device."""
    x = ((x ^ (x >> 16)) * 0x21F0AAAD) & _LOW32
    x = ((x ^ (x >> 15)) * 0x735A2D97) & _LOW32
    return x ^ (x >> 15)


def mask_key(seed: int, tower: int, layer: int) -> int:
    """A 32-bit key for one (seed, tower, layer)'s masks, fixed when the net is built."""
    return int(np.random.SeedSequence([seed, tower, layer]).generate_state(1, np.uint32)[0])


def mask_seed(key: int, draw: Tensor) -> Tensor:
    """The seed of the `draw`-th mask with this key: a device tensor, so a compiled step reads
    the counter without a recompile and a captured step (CUDA graphs) sees it change."""
    return _mix((draw & _LOW32) ^ key)


def tower_dropout(h: Tensor, p: float, seed: int | Tensor, replica: int, replicas: int) -> Tensor:
    """§4.2 dropout whose mask does not depend on the layout.

    Element (row, j) of the mask for the whole global batch (replicas x b rows) is kept when a
    hash of (seed, row * width + j) is at least p of its range: a counter-based draw, so this
    replica computes its own rows only, and one process with the whole batch and R replicas
    with a slice each drop the same neurons. The seed comes from (seed, tower, layer, draw)
    (`mask_seed`); it may be a device tensor. Surviving activations are scaled by 1/(1-p)
    (inverted dropout: test time needs no scaling).
    """
    b, width = h.shape[0], h[0].numel()
    rows = torch.arange(replica * b, (replica + 1) * b, device=h.device)
    index = rows[:, None] * width + torch.arange(width, device=h.device)  # global, row-major
    bits = _mix(_mix((index & _LOW32) ^ seed) ^ (index >> 32))  # 32 uniform bits per element
    keep = (bits >> 8) >= round(p * 2**24)  # 24 bits: P(keep) = 1 - p to 6e-8
    return h * (keep.view(h.shape).to(h.dtype) * (1.0 / (1.0 - p)))
