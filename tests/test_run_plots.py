"""Plots: the curves PNG is written at the figure's size; the Figure 3 kernel grid has the size
its arithmetic says, puts tower 0's kernels in the top block and tower 1's below a gap, and
contrast-normalises each kernel on its own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repro.run.plots import kernel_grid, plot_curves, save_png
from repro.run.tracking import LOSS, LR, TOP1, TOP5


def test_plot_curves_writes_a_png(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    lines = [
        {"step": s, LOSS: 6.9 - s / 100, LR: 0.01 if s < 300 else 0.001} for s in range(0, 500, 20)
    ]
    lines += [{"step": s, TOP1: 60.0 - s / 50, TOP5: 35.0 - s / 50} for s in (100, 200, 300, 400)]
    lines += [{"step": 400, TOP1: 51.0, TOP5: 27.0}]  # a resumed run repeated the last evaluation
    metrics.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 5')
    out = plot_curves(metrics, tmp_path / "plots" / "curves.png")
    assert out.stat().st_size > 10_000  # three panels with lines, not a blank canvas
    with Image.open(out) as im:
        assert im.size == (800, 900)  # figsize (8, 9) at 100 dpi
        pixels = np.asarray(im.convert("RGB"))
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    assert red.sum() > 50, "the top-1 curve (tab:red) was drawn"


def test_plot_curves_on_an_empty_file(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("")
    assert plot_curves(tmp_path / "metrics.jsonl", tmp_path / "c.png").stat().st_size > 0


def colour_weights(towers: int = 2, per_tower: int = 48, k: int = 11) -> torch.Tensor:
    """Tower 0: every kernel pure red; tower 1: pure green (before normalisation, scaled)."""
    w = torch.zeros(towers * per_tower, 3, k, k)
    w[:per_tower, 0] = 0.02  # red channel of tower 0's kernels
    if towers == 2:
        w[per_tower:, 1] = -0.01  # green, negative: normalisation must still make it bright
        w[per_tower:, 0] = -0.03
        w[per_tower:, 2] = -0.03
    return w


def test_kernel_grid_size_and_tower_blocks() -> None:
    scale, gap, k = 4, 4, 11
    grid = kernel_grid(colour_weights(), towers=2, columns=16, scale=scale, gap=gap)
    cell = k + 1
    block_h, block_w = 3 * cell + 1, 16 * cell + 1  # 48 kernels = 3 rows of 16
    assert grid.dtype == np.uint8
    assert grid.shape == ((2 * block_h + gap) * scale, block_w * scale, 3) == (312, 772, 3)

    small = grid[::scale, ::scale]  # undo the nearest-pixel upscaling
    for tower, colour in ((0, (255, 0, 0)), (1, (0, 255, 0))):
        top = tower * (block_h + gap)
        for j in range(48):
            y, x = top + 1 + (j // 16) * cell, 1 + (j % 16) * cell
            assert (small[y : y + k, x : x + k] == colour).all(), (tower, j)
    assert (small[block_h : block_h + gap] == 255).all(), "a white gap between the towers"
    assert (small[:, 0] == 255).all() and (small[0] == 255).all(), "1 px separators"


def test_each_kernel_is_normalised_on_its_own() -> None:
    w = torch.zeros(4, 3, 5, 5)
    w[0] = torch.linspace(-5, 5, 75).reshape(3, 5, 5)  # a wide range ...
    w[1] = torch.linspace(0, 1e-3, 75).reshape(3, 5, 5)  # ... and a tiny one: both span 0..255
    w[2] = 7.0  # constant: mid-grey
    grid = kernel_grid(w, towers=1, columns=2, scale=1)
    assert grid.shape == (2 * 6 + 1, 2 * 6 + 1, 3)
    k0, k1, k2 = grid[1:6, 1:6], grid[1:6, 7:12], grid[7:12, 1:6]
    for kern in (k0, k1):
        assert kern.min() == 0 and kern.max() == 255
    assert (k2 == 128).all()


def test_kernel_grid_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError, match="towers"):
        kernel_grid(torch.zeros(95, 3, 11, 11), towers=2)
    with pytest.raises(ValueError):
        kernel_grid(torch.zeros(96, 1, 11, 11), towers=2)


def test_save_png_round_trip(tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    path = save_png(image, tmp_path / "a" / "b.png")
    with Image.open(path) as im:
        assert np.array_equal(np.asarray(im), image)
    with pytest.raises(ValueError):
        save_png(image.astype(np.float32), tmp_path / "c.png")
