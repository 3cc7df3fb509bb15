"""The paper's building blocks that are options of the net: LRN, contrast norm, pooling, dropout.

Each is small; they live here so that model.py reads like Figure 2.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

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
    """nn.LocalResponseNorm's function, with the channel window summed from shifted slices.

    PyTorch sums the window with avg_pool3d, whose backward dominates a CPU training step
    (docs/performance.md: 2.5x slower forward + backward than these `size` adds). Same
    zero padding (size//2 before, (size-1)//2 after) and the same alpha/size per element;
    results agree to float rounding. Low-precision inputs are summed in float32.
    """

    def forward(self, x: Tensor) -> Tensor:
        squares = x.float().square() if x.dtype in (torch.bfloat16, torch.float16) else x * x
        channels = x.shape[1]
        pad = [0, 0] * (x.dim() - 2) + [self.size // 2, (self.size - 1) // 2]
        padded = nn.functional.pad(squares, pad)
        window = padded[:, :channels]
        for shift in range(1, self.size):
            window = window + padded[:, shift : shift + channels]
        scale = (window * (self.alpha / self.size) + self.k).pow(self.beta)
        return x / scale.to(x.dtype)


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
    return nn.MaxPool2d(3, 2) if cfg.pool == "overlapping" else nn.MaxPool2d(2, 2)


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


def mask_seed(seed: int, tower: int, layer: int, draw: int) -> int:
    """A 63-bit seed for one dropout mask, a pure function of its coordinates."""
    return int(
        np.random.SeedSequence([seed, tower, layer, draw]).generate_state(2, np.uint64)[0] >> 1
    )


def tower_dropout(h: Tensor, p: float, seed: int, replica: int, replicas: int) -> Tensor:
    """§4.2 dropout whose mask does not depend on the layout.

    The mask is drawn for the whole global batch (replicas x b rows) from a generator seeded by
    the caller from (seed, tower, layer, draw), and this replica keeps its own rows; so one
    process with the whole batch and R replicas with a slice each drop the same neurons.
    Surviving activations are scaled by 1/(1-p) (inverted dropout: test time needs no scaling).
    """
    gen = torch.Generator(device=h.device)
    gen.manual_seed(seed)
    b = h.shape[0]
    noise = torch.rand((b * replicas, *h.shape[1:]), generator=gen, device=h.device)
    keep = noise[replica * b : (replica + 1) * b] >= p
    return h * keep.to(h.dtype) / (1.0 - p)
