"""Plots: the curves PNG is written at the figure's size, titled with the run's name, with the
final 10-patch errors as points; the Figure 3 kernel grid has the size its arithmetic says,
puts tower 0's kernels in the top block and tower 1's below a gap, and contrast-normalises
each kernel on its own; Figure 3 as drawn places each tower's grid unresampled under its
label, with that tower's colour specificity under it; only rank 0 draws, and the training loop
imports matplotlib only when it does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from repro.config import Config, ModelConfig, WandbConfig
from repro.run import train
from repro.run.plots import (
    KERNEL_SCALE,
    colour_specificity,
    curves_figure,
    figure3,
    figure3_block_origin,
    figure3_image,
    kernel_grid,
    plot_curves,
    save_png,
)
from repro.run.tracking import LOSS, LR, TEN_TOP1, TEN_TOP5, TOP1, TOP5


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


def test_curves_carry_the_run_name_and_the_ten_patch_point() -> None:
    rows = [{"step": s, LOSS: 2.0 - s / 100, LR: 0.01} for s in range(1, 45)]
    rows += [{"step": 22, TOP1: 57.7, TOP5: 10.6}, {"step": 44, TOP1: 43.2, TOP5: 4.5}]
    rows += [{"step": 44, TEN_TOP1: 44.29, TEN_TOP5: 3.9}]
    fig = curves_figure(rows, "demo-2ranks")
    assert fig.get_suptitle() == "run demo-2ranks"
    ax_err = fig.axes[1]
    lines = {line.get_label(): line for line in ax_err.get_lines()}
    star = lines["top-1, 10 patches: 44.29%"]
    assert star.get_marker() == "*" and list(star.get_xdata()) == [44]
    assert list(star.get_ydata()) == [44.29]
    assert list(lines["top-5, 10 patches: 3.90%"].get_ydata()) == [3.9]
    assert list(lines["top-1 (centre patch)"].get_ydata()) == [57.7, 43.2]
    legend = [t.get_text() for t in ax_err.get_legend().get_texts()]
    assert "top-1, 10 patches: 44.29%" in legend
    no_ten = curves_figure(rows[:-1], "x").axes[1]  # before the 10-patch evaluation: no star
    assert all(line.get_marker() != "*" for line in no_ten.get_lines())


def test_figure3_blocks_labels_scores_and_title() -> None:
    """Each tower's block is kernel_grid of its 48 kernels, unresampled, with its label above
    it and its colour-specificity score (the mean over its kernels) below it."""
    w = torch.randn(96, 3, 11, 11)
    w[:48] = w[:48, :1].expand(48, 3, 11, 11)  # tower 0: grey kernels, score 0
    fig = figure3(w, 2, "runs/demo/checkpoints/best.pt, step 660")
    texts = [t.get_text() for t in fig.texts]
    assert texts[:2] == ["conv1 kernels (Figure 3)", "runs/demo/checkpoints/best.pt, step 660"]
    scores = colour_specificity(w).view(2, 48).mean(dim=1)
    assert f"colour specificity {float(scores[0]):.3f}" in texts[3] and scores[0] < 1e-6
    assert f"colour specificity {float(scores[1]):.3f}" in texts[5] and scores[1] > 0.5
    assert texts[2].startswith("tower 0 (the paper's GPU 1): 48 kernels 11x11x3")
    assert texts[4].startswith("tower 1 (the paper's GPU 2)")
    picture = figure3_image(w, 2, "x")
    for tower in (0, 1):
        block = kernel_grid(w[48 * tower : 48 * (tower + 1)], 1, scale=KERNEL_SCALE)
        assert block.shape == (3 * 12 * 5 + 5, 16 * 12 * 5 + 5, 3)  # 3 rows of 16, 5x larger
        (h, bw), (left, top) = block.shape[:2], figure3_block_origin(tower, block.shape[0])
        assert np.array_equal(picture[top : top + h, left : left + bw], block), tower
    long = figure3(w, 2, "/very/long/" * 40 + "best.pt, step 660").texts[1].get_text()
    assert long.startswith("...") and long.endswith("best.pt, step 660") and len(long) < 140


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


def test_only_rank_0_draws_and_the_loop_imports_no_matplotlib() -> None:
    """Ranks other than 0 never draw: importing the training loop must not cost them matplotlib's
    ~0.6 s, and at an evaluation they take part in the weight gather but render nothing."""
    code = "import sys, repro.run.train; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"], out.stderr[-2000:]

    gathered = []

    class Model:
        def grouped_state_dict(self):  # the collective every rank must call
            gathered.append(True)
            return {"conv1.weight": torch.rand(8, 3, 11, 11)}

    class Tracker:
        def log_image(self, key, image, step, caption=""):
            self.image = image

    cfg = Config(wandb=WandbConfig(name="r"), model=ModelConfig(widths=(4, 4, 4, 4, 4)))
    for is_main in (False, True):
        layout = SimpleNamespace(is_main=is_main)
        run = SimpleNamespace(model=Model(), layout=layout, cfg=cfg, run_dir=Path("r"))
        run.tracker = Tracker()
        train.figure3(run, 7)
        assert hasattr(run.tracker, "image") == is_main
    assert len(gathered) == 2
    assert run.tracker.image.ndim == 3 and run.tracker.image.shape[2] == 3
