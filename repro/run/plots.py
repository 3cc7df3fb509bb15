"""Pictures of a run: the training curves, and conv1's kernels as in the paper's Figure 3.

Matplotlib is used through `Figure` objects (the Agg canvas), never pyplot, so plotting needs
no display and leaves no global state behind in the training process. It is imported where a
figure is made: only rank 0 draws, and the import costs every other rank ~0.6 s of start-up.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from repro.run.tracking import (  # noqa: F401 (save_png re-exported)
    LOSS,
    LR,
    TEN_TOP1,
    TEN_TOP5,
    TOP1,
    TOP5,
    read_rows,
    save_png,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
KERNEL_SCALE = 5
"""Figure 3: screen pixels per kernel pixel (an 11x11 kernel is drawn 55x55)."""


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`; a step logged twice (a resumed run) keeps its last value."""
    by_step: dict[int, float] = {}
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and "step" in row:
            by_step[int(row["step"])] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_curves(metrics_jsonl: str | Path, out_png: str | Path, title: str | None = None) -> Path:
    """curves_figure of a metrics.jsonl as a PNG; `title`: the run's name (default: the
    metrics file's folder name)."""
    metrics_jsonl = Path(metrics_jsonl)
    rows = read_rows(metrics_jsonl)
    fig = curves_figure(rows, title or metrics_jsonl.resolve().parent.name)
    if not rows:
        fig.axes[0].set_title(f"no rows in {metrics_jsonl}")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    return out


def curves_figure(rows: list[dict], name: str) -> Figure:
    """Training loss and lr per logged step, top-1/top-5 validation error per evaluation, and
    the final 10-patch errors (§4.1) as stars at the step they were measured; "run NAME" on top."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 9), layout="constrained")
    fig.suptitle(f"run {name}", fontsize=12)
    ax_loss, ax_err, ax_lr = fig.subplots(3, 1, sharex=True)

    steps, loss = _series(rows, LOSS)
    ax_loss.plot(steps, loss, lw=0.8, color="tab:blue")
    ax_loss.set_ylabel("training loss")

    for key, ten, label, color in (
        (TOP1, TEN_TOP1, "top-1", "tab:red"),
        (TOP5, TEN_TOP5, "top-5", "tab:orange"),
    ):
        s, err = _series(rows, key)
        if err and max(err) <= 1.0:  # logged as a fraction: show percent like the paper
            err = [100 * e for e in err]
        ax_err.plot(s, err, marker="o", ms=3, label=f"{label} (centre patch)", color=color)
        s, err = _series(rows, ten)
        if err:  # the final 10-patch evaluation: one point, at the step it was made
            ax_err.plot(
                s[-1:], err[-1:], marker="*", ms=14, ls="none", color=color, mec="black",
                label=f"{label}, 10 patches: {err[-1]:.2f}%",
            )  # fmt: skip
    ax_err.set_ylabel("validation error (%)")
    ax_err.legend(loc="best")

    steps, lr = _series(rows, LR)
    ax_lr.plot(steps, lr, color="tab:green", drawstyle="steps-post")
    if lr and min(lr) > 0:
        ax_lr.set_yscale("log")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    for ax in (ax_loss, ax_err, ax_lr):
        ax.grid(alpha=0.3)
    return fig


def kernel_grid(
    conv1_weight: torch.Tensor, towers: int, columns: int = 16, scale: int = 4, gap: int = 4
) -> np.ndarray:
    """Figure 3: conv1's kernels as one (H, W, 3) uint8 image, tower 0 on top, tower 1 below.

    conv1_weight: (T * n, 3, k, k), tower 0's n kernels first (the grouped export layout).
    Each kernel is contrast-normalised on its own to [0, 255] over its three colours (a
    constant kernel is mid-grey). Each tower is a block of ceil(n / columns) rows of
    min(n, columns) kernels with 1 px white lines between and around them, so a block is
    rows * (k + 1) + 1 by cols * (k + 1) + 1 pixels; blocks are stacked with `gap` white
    rows between them, and the whole picture is scaled up `scale` times (nearest pixel).
    The paper's 96 kernels give 2 blocks of 3 x 16.
    """
    w = conv1_weight.detach().float().cpu()
    if w.ndim != 4 or w.shape[1] != 3 or w.shape[0] % towers:
        raise ValueError(
            f"expected conv1 weights (towers * n, 3, k, k) for {towers} tower(s), got {tuple(w.shape)}"
        )
    lo = w.amin(dim=(1, 2, 3), keepdim=True)
    span = w.amax(dim=(1, 2, 3), keepdim=True) - lo
    unit = torch.where(span > 0, (w - lo) / span.clamp_min(1e-12), torch.full_like(w, 0.5))
    pixels = (unit * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (N, k, k, 3)

    # Written by hand: torchvision's make_grid tiles one block, but not towers with a gap.
    n, k = w.shape[0] // towers, w.shape[2]
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    cell = k + 1
    block_h, block_w = rows * cell + 1, cols * cell + 1
    canvas = np.full((towers * block_h + (towers - 1) * gap, block_w, 3), 255, np.uint8)
    for i in range(w.shape[0]):
        tower, j = divmod(i, n)
        top = tower * (block_h + gap) + 1 + (j // cols) * cell
        left = 1 + (j % cols) * cell
        canvas[top : top + k, left : left + k] = pixels[i]
    return canvas.repeat(scale, axis=0).repeat(scale, axis=1)


def colour_specificity(weight: torch.Tensor) -> torch.Tensor:
    """(N,) scores of conv1 kernels (N, 3, k, k): 1 - ||g||^2 / ||w||^2, g the grey part.

    g[c, y, x] = mean over c' of w[c', y, x]: each pixel's RGB weights projected onto the
    grey direction (1, 1, 1)/sqrt(3). 0 for a kernel that sees brightness only, 1 for pure
    colour opposition (red minus green), 2/3 for a single-channel blob and, on average, for
    random kernels (the untrained net). §6.1: one tower's kernels are "largely
    color-agnostic", the other's "largely color-specific". An all-zero kernel scores 0.
    """
    w = weight.detach().double()
    grey = w.mean(dim=1, keepdim=True).expand_as(w)  # (N, 3, k, k): RGB projected on grey
    energy = w.pow(2).sum(dim=(1, 2, 3))
    grey_energy = grey.pow(2).sum(dim=(1, 2, 3))
    return torch.where(energy > 0, 1 - grey_energy / energy.clamp_min(1e-300), 0.0)


# Figure 3's layout, in pixels: the blocks are placed unresampled (figimage), so each block
# in the PNG is exactly kernel_grid's array.
_MARGIN, _TITLE, _LABEL, _SCORE = 20, 64, 28, 34
_CHAR = 7.5  # pixels per character of the 11 pt title, to fit it in the figure's width


def figure3(
    conv1_weight: torch.Tensor, towers: int, source: str, scale: int = KERNEL_SCALE
) -> Figure:
    """Figure 3 as the paper draws it: each tower's kernels as a labelled block (tower 0, the
    paper's GPU 1, on top), enlarged `scale` times, its colour specificity printed under it,
    under the title "conv1 kernels (Figure 3)" and `source` (the checkpoint or run, and the
    step; cut from the left to fit the width).

    conv1_weight: (T * n, 3, k, k), tower 0's n kernels first. Block t is exactly
    kernel_grid(tower t's kernels, 1, scale=scale) (16 kernels a row), its top-left corner at
    figure3_block_origin(...) pixels.
    """
    from matplotlib.figure import Figure

    w = conv1_weight.detach().float().cpu()
    n = w.shape[0] // towers
    blocks = [kernel_grid(w[t * n : (t + 1) * n], 1, scale=scale) for t in range(towers)]
    scores = colour_specificity(w).view(towers, n).mean(dim=1)
    height, width = blocks[0].shape[:2]
    fig_w, fig_h = width + 2 * _MARGIN, _TITLE + towers * (_LABEL + height + _SCORE)
    fig = Figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI)
    fit = int(fig_w / _CHAR)
    source = source if len(source) <= fit else "..." + source[-(fit - 3) :]
    fig.text(0.5, 1 - 8 / fig_h, "conv1 kernels (Figure 3)", ha="center", va="top", fontsize=13)
    fig.text(0.5, 1 - 30 / fig_h, source, ha="center", va="top", fontsize=11)
    for t, block in enumerate(blocks):
        left, top = figure3_block_origin(t, height)
        gpu = f" (the paper's GPU {t + 1})" if towers == 2 else ""
        fig.text(
            left / fig_w, 1 - (top - 6) / fig_h, f"tower {t}{gpu}: {n} kernels "
            f"{w.shape[2]}x{w.shape[3]}x3", va="bottom", fontsize=11, weight="bold",
        )  # fmt: skip
        fig.figimage(block, xo=left, yo=fig_h - top - height, origin="upper")
        fig.text(
            left / fig_w, 1 - (top + height + 6) / fig_h, f"colour specificity "
            f"{float(scores[t]):.3f}  (0 grey, 1 pure colour, 2/3 random)", va="top", fontsize=11,
        )  # fmt: skip
    return fig


def figure3_block_origin(tower: int, block_height: int) -> tuple[int, int]:
    """(left, top) pixel of tower `tower`'s block in figure3's image, from the top-left."""
    return _MARGIN, _TITLE + _LABEL + tower * (_LABEL + block_height + _SCORE)


def figure3_image(conv1_weight: torch.Tensor, towers: int, source: str) -> np.ndarray:
    """figure3 rendered as an (H, W, 3) uint8 array (for a tracker's image log)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = figure3(conv1_weight, towers, source)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
