"""Pictures of a run: the training curves, and conv1's kernels as in the paper's Figure 3.

Matplotlib is used through `Figure` objects (the Agg canvas), never pyplot, so plotting needs
no display and leaves no global state behind in the training process.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from repro.run.tracking import LOSS, LR, TOP1, TOP5, save_png  # noqa: F401 (save_png re-exported)


def _read_rows(metrics_jsonl: Path) -> list[dict]:
    rows = []
    for line in Path(metrics_jsonl).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short when the run was killed
            continue
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`; a step logged twice (a resumed run) keeps its last value."""
    by_step: dict[int, float] = {}
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and "step" in row:
            by_step[int(row["step"])] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_curves(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    """Training loss and lr per logged step, top-1/top-5 validation error per evaluation."""
    rows = _read_rows(Path(metrics_jsonl))
    fig = Figure(figsize=(8, 9), layout="constrained")
    ax_loss, ax_err, ax_lr = fig.subplots(3, 1, sharex=True)

    steps, loss = _series(rows, LOSS)
    ax_loss.plot(steps, loss, lw=0.8, color="tab:blue")
    ax_loss.set_ylabel("training loss")

    for key, label, color in ((TOP1, "top-1", "tab:red"), (TOP5, "top-5", "tab:orange")):
        s, err = _series(rows, key)
        if err and max(err) <= 1.0:  # logged as a fraction: show percent like the paper
            err = [100 * e for e in err]
        ax_err.plot(s, err, marker="o", ms=3, label=label, color=color)
    ax_err.set_ylabel("validation error (%)")
    ax_err.legend(loc="upper right")

    steps, lr = _series(rows, LR)
    ax_lr.plot(steps, lr, color="tab:green", drawstyle="steps-post")
    if lr and min(lr) > 0:
        ax_lr.set_yscale("log")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    for ax in (ax_loss, ax_err, ax_lr):
        ax.grid(alpha=0.3)
    if not rows:
        ax_loss.set_title(f"no rows in {metrics_jsonl}")

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


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
