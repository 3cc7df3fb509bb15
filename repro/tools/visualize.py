"""Pictures of a trained net: conv1's kernels (Figure 3), activation maps, training curves.

    python launch/visualize.py kernels runs/demo/checkpoints/best.pt
    python launch/visualize.py activations runs/demo/checkpoints/best.pt photo.jpg
    python launch/visualize.py curves runs/demo

Default outputs (a given --out wins; its folder is made):

    kernels      CKPT_DIR/<ckpt stem>_kernels.png and .json beside it
    activations  CKPT_DIR/<ckpt stem>_activations_<image stem>.png
    curves       RUN_DIR/curves.png (what training itself writes, redrawn)

Colour specificity (§6.1, Figure 3: "the kernels on GPU 1 are largely color-agnostic, while
the kernels on GPU 2 are largely color-specific"), as a number per tower. For a conv1
kernel w (3, k, k), its grey part g puts at every pixel the projection of the pixel's RGB
vector onto the grey direction (1, 1, 1)/sqrt(3), i.e. g[c, y, x] = mean over c' of
w[c', y, x]. The kernel's score is

    1 - ||g||^2 / ||w||^2        in [0, 1]

the fraction of its energy that is not luminance: 0 for a kernel equal in R, G and B (it
sees brightness only), 1 for one whose channels cancel at every pixel (pure colour
opposition, e.g. red minus green); a single-channel blob scores 2/3, and so do random
kernels on average (the untrained net's value). A tower's score is the mean over its
kernels. The paper's claim reads: one tower's score well below the other's.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from repro.config import ConfigError, load_config
from repro.data.folders import DataError
from repro.net.model import LAYERS
from repro.run.checkpoint import recorded_position
from repro.run.plots import DPI, colour_specificity, figure3, plot_curves
from repro.run.tracking import run_name
from repro.tools.inference import OutputError, load_trained, prepare_images, writable_dir

CONVS = LAYERS[:5]
PANEL_INCHES = 2.0
"""Side of one activation panel; the figure is (1 + 5) panels wide, one row per tower."""
SCORE_DEFINITION = (
    "colour specificity of a conv1 kernel w (3,k,k): 1 - ||g||^2/||w||^2 with g[c,y,x] = "
    "mean_c' w[c',y,x] (the projection of each pixel's RGB weights on (1,1,1)/sqrt(3)); "
    "0 = grey (colour-agnostic), 1 = pure colour opposition, 2/3 = random; tower score = "
    "mean over its kernels"
)


def _beside(checkpoint: str | Path, suffix: str) -> Path:
    path = Path(checkpoint)
    return path.with_name(f"{path.stem}_{suffix}.png")


def png_path(out: Path) -> Path:
    """`out` if it names a .png file whose folder can be written (made if missing), else
    OutputError: a folder or another ending would have been written beside it as NAME.png."""
    if out.is_dir():
        raise OutputError(
            f"--out {out} is a folder: name a PNG file in it, e.g. {out / 'figure.png'}"
        )
    if out.suffix.lower() != ".png":
        raise OutputError(f"--out {out}: name a .png file (the figures are written as PNG)")
    writable_dir(out.parent)
    return out


def kernels(checkpoint: str | Path, out: str | Path | None = None) -> dict:
    """Figure 3 PNG of conv1 (tower 0's block above tower 1's) and the score per tower, as JSON.

    Prints one line per tower; returns what the JSON file holds.
    """
    out = Path(out) if out is not None else _beside(checkpoint, "kernels")
    png_path(out)
    model, cfg, _ = load_trained(checkpoint, device="cpu")
    step, epoch = recorded_position(checkpoint)
    conv1 = model.grouped_state_dict()["conv1.weight"]  # (T * n, 3, 11, 11), tower 0 first
    towers = cfg.model.towers
    title = f"{checkpoint}, step {step}, {epoch} full epoch(s)"
    figure3(conv1, towers, title).savefig(out, dpi=DPI)
    scores = colour_specificity(conv1).view(towers, -1)
    report = {
        "checkpoint": str(checkpoint),
        "step": step,
        "png": str(out),
        "definition": SCORE_DEFINITION,
        "towers": [
            {
                "tower": t,
                "kernels": scores.shape[1],
                "colour_specificity": float(scores[t].mean()),
                "per_kernel": [round(float(s), 6) for s in scores[t]],
            }
            for t in range(towers)
        ],
    }
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    for row in report["towers"]:
        print(
            f"tower {row['tower']}: colour specificity {row['colour_specificity']:.3f} "
            f"(mean of {row['kernels']} kernels; 0 grey, 1 pure colour, 2/3 random)"
        )
    print(f"wrote {out} and {json_path}")
    return report


def _patch(path: str, data) -> Tensor:
    """The centre patch (1, 3, crop, crop) of one image as evaluation prepares it."""
    ((_, views, reason),) = list(prepare_images([path], data, "center", 1))
    if views is None:
        raise DataError(f"cannot read image {path}: {reason}")
    return views


def activations(checkpoint: str | Path, image: str | Path, out: str | Path | None = None) -> Path:
    """Each tower's conv1..conv5 mean activation (over channels) over the centre patch.

    The map is the rectified conv output (§3.1: a ReLU follows every conv layer), averaged
    over the tower's channels, drawn semi-transparent over the input patch it came from,
    stretched over the padded input the net sees (image_size + pad_right_bottom). Each
    panel's colours run from 0 to that map's own maximum, given in its title.
    """
    image = str(image)
    out = Path(out) if out is not None else _beside(checkpoint, f"activations_{Path(image).stem}")
    png_path(out)
    model, cfg, _ = load_trained(checkpoint, device="cpu")
    # The same patch twice: as the net gets it, and (no mean subtracted) as a person sees it.
    x = _patch(image, cfg.data)
    raw = _patch(image, replace(cfg.data, mean="none", lighting_std=0.0, stats=""))
    maps: dict[tuple[int, str], np.ndarray] = {}
    hooks = []
    for t, tower in model.towers.items():
        for name in CONVS:

            def keep(module, inputs, output, key=(int(t), name)):
                maps[key] = output.detach().relu().mean(dim=1)[0].float().numpy()  # (H, W)

            hooks.append(getattr(tower, name).register_forward_hook(keep))
    try:
        with torch.no_grad():
            model(x.to(model.layout.device))
    finally:
        for h in hooks:
            h.remove()

    crop = cfg.model.image_size
    side = crop + cfg.model.pad_right_bottom
    picture = raw[0].permute(1, 2, 0).clamp(0, 255).cpu().numpy() / 255.0  # (crop, crop, 3)
    towers = sorted(model.towers, key=int)
    fig = Figure(figsize=activation_figsize(len(towers)), layout="constrained")
    axes = fig.subplots(len(towers), 1 + len(CONVS), squeeze=False)
    for row, t in zip(axes, towers):
        row[0].imshow(picture, extent=(0, crop, crop, 0))
        row[0].set_title(f"tower {t}: input", fontsize=8)
        for ax, name in zip(row[1:], CONVS):
            m = maps[(int(t), name)]
            ax.imshow(picture, extent=(0, crop, crop, 0))  # pixel edges at 0..crop
            ax.imshow(
                m,
                cmap="inferno",
                alpha=0.6,
                vmin=0,
                vmax=max(float(m.max()), 1e-12),
                extent=(0, side, side, 0),
                interpolation="bilinear",
            )
            ax.set_xlim(0, crop)
            ax.set_ylim(crop, 0)
            ax.set_title(f"{name} {m.shape[0]}x{m.shape[1]}, max {m.max():.2g}", fontsize=8)
        for ax in row:
            ax.axis("off")
    fig.savefig(out, dpi=DPI)
    print(f"wrote {out}")
    return out


def activation_figsize(towers: int) -> tuple[float, float]:
    """(width, height) in inches: 6 panels wide, one row per tower, room for the titles."""
    return (PANEL_INCHES * (1 + len(CONVS)), PANEL_INCHES * towers + 0.6)


def curves(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Loss, validation error and lr from RUN_DIR/metrics.jsonl (repro.run.plots.plot_curves)."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(
            f"{metrics} does not exist: RUN_DIR must be a training run folder "
            "(train.run_dir, holding metrics.jsonl)"
        )
    out = Path(out) if out is not None else run_dir / "curves.png"
    png_path(out)
    plot_curves(metrics, out, title=_run_name(run_dir))
    print(f"wrote {out}")
    return out


def _run_name(run_dir: Path) -> str | None:
    """The name training gave the run (its config's wandb.name, else the folder's name)."""
    try:
        return run_name(load_config(run_dir / "config.yaml").wandb, run_dir)
    except ConfigError:  # no config.yaml (a copied metrics file): the folder's name
        return None
