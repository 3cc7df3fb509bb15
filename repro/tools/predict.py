"""Top-k classes of single image files, with probabilities, from a trained checkpoint.

    python launch/predict.py runs/demo/checkpoints/best.pt photo.jpg more_photos/ --top-k 3

Each image is prepared exactly as evaluation prepares it (repro/tools/inference.py: the DALI eval
pipeline, the run's own mean image) and scored on the centre patch or, with `--patches ten`,
on the softmax averaged over the 10 patches of §4.1. Probabilities are the softmax over all
classes, so over all k = classes they sum to 1.

Unreadable inputs (missing, not an image, corrupt) are reported on stderr, one line each, and
skipped; the others are still predicted. `predict` returns how many were skipped, which the
command turns into its exit code: 0 if every image was read, 1 if any was not.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from repro.run.checkpoint import recorded_position
from repro.run.evaluate import class_probabilities
from repro.tools.inference import (
    VIEWS,
    check_device,
    image_files,
    load_trained,
    prepare_images,
    writable_dir,
)

PLOT_SIZE = (9.0, 3.2)
"""Inches of each --plot figure; at PLOT_DPI that is 900 x 320 pixels."""
PLOT_DPI = 100
PATCH_MODES = {"center": "centre patch", "ten": "10 patches averaged (§4.1)"}


@dataclass
class Prediction:
    """One image's top-k classes, best first."""

    path: str
    classes: list[str]
    indices: list[int]
    probabilities: list[float]


def predict(
    checkpoint: str | Path,
    inputs: Sequence[str],
    top_k: int = 5,
    patches: str = "center",
    as_json: bool = False,
    plot_dir: str | Path | None = None,
    batch_size: int = 32,
    device: str = "auto",
    progress: bool = True,
) -> int:
    """Print the top-k of every readable image (a table, or JSON); returns the unreadable count."""
    if top_k < 1:
        raise ValueError("--top-k must be >= 1")
    check_device(device)
    plot_dir = writable_dir(plot_dir) if plot_dir is not None else None
    paths = image_files(inputs)
    model, cfg, class_names = load_trained(checkpoint, device=device)
    k = min(top_k, len(class_names))

    predictions, skipped = [], []
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress, leave=False)
    batch: list[tuple[str, torch.Tensor]] = []

    def flush() -> None:
        if not batch:
            return
        images = torch.cat([v for _, v in batch]).to(model.layout.device)  # (n * V, 3, c, c)
        probs = class_probabilities(model, images, VIEWS[patches], _autocast(cfg, model))
        top = probs.float().cpu().topk(k, dim=1)
        for (path, _), p, i in zip(batch, top.values, top.indices):
            names = [class_names[j] for j in i.tolist()]
            predictions.append(Prediction(path, names, i.tolist(), p.tolist()))
        bar.update(len(batch))
        batch.clear()

    device_ = model.layout.device
    for path, views, reason in prepare_images(paths, cfg.data, patches, batch_size, device_):
        if views is None:
            tqdm.write(f"predict: skipped {path}: {reason}", file=sys.stderr)
            skipped.append(path)
            bar.update(1)
            continue
        batch.append((path, views))
        if len(batch) == batch_size:
            flush()
    flush()
    bar.close()

    if as_json:
        print(
            json.dumps(
                {
                    "checkpoint": str(checkpoint),
                    "patches": patches,
                    "top_k": k,
                    "predictions": [asdict(p) for p in predictions],
                    "unreadable": skipped,
                },
                indent=2,
            )
        )
    else:
        print(format_table(predictions))
    if plot_dir is not None and predictions:
        step, _ = recorded_position(checkpoint)
        source = f"{checkpoint} (step {step}), {PATCH_MODES[patches]}"
        # The patches again, without the mean image: the net's input as a person sees it.
        seen = replace(cfg.data, mean="none", lighting_std=0.0, stats="")
        paths = [p.path for p in predictions]
        views = {path: v for path, v, _ in prepare_images(paths, seen, patches, batch_size)}
        for p, name in zip(predictions, plot_names(paths)):
            plot_prediction(p, views[p.path], source, plot_dir / name)
        where = sys.stderr if as_json else sys.stdout  # --json keeps stdout pure JSON
        print(f"wrote {len(predictions)} plot(s) to {plot_dir}/", file=where)
    return len(skipped)


def _autocast(cfg, model):
    from repro.run.train import switches

    bf16, _, _ = switches(cfg, model.layout)
    return lambda: torch.autocast(model.layout.device.type, torch.bfloat16, enabled=bf16)


def format_table(predictions: Sequence[Prediction]) -> str:
    """One block per image: the path, then rank, class and probability per line."""
    lines = []
    for p in predictions:
        lines.append(p.path)
        width = max(len(c) for c in p.classes)
        for rank, (c, prob) in enumerate(zip(p.classes, p.probabilities), 1):
            lines.append(f"  {rank}. {c:<{width}}  {100 * prob:6.2f}%")
    return "\n".join(lines)


def plot_names(paths: Sequence[str]) -> list[str]:
    """`<image stem>.png` per image; a repeated stem gets `_2`, `_3`... in input order."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        stem = Path(p).stem
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}.png" if seen[stem] == 1 else f"{stem}_{seen[stem]}.png")
    return names


def patch_picture(views: torch.Tensor, gap: int = 2) -> np.ndarray:
    """(V, 3, c, c) patches, 0-255 (no mean subtracted), as one RGB picture: the patch itself,
    or the 10 patches of §4.1 as 2 rows of 5 (corners and centre, then their mirrors)."""
    tiles = views.detach().float().cpu().clamp(0, 255).round().to(torch.uint8)
    tiles = tiles.permute(0, 2, 3, 1).numpy()  # (V, c, c, 3)
    if len(tiles) == 1:
        return tiles[0]
    rows, cols, c = 2, len(tiles) // 2, tiles.shape[1]
    out = np.full((rows * c + gap, cols * c + (cols - 1) * gap, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, k = divmod(i, cols)
        out[r * (c + gap) : r * (c + gap) + c, k * (c + gap) : k * (c + gap) + c] = tile
    return out


def plot_prediction(p: Prediction, views: torch.Tensor, source: str, out: Path) -> Path:
    """The patch(es) the net saw beside a bar chart of the top-k; `source` (the checkpoint,
    its step and the patch mode) as the title."""
    fig = Figure(figsize=PLOT_SIZE, layout="constrained")
    fig.suptitle(source, fontsize=9)
    ax_img, ax_bar = fig.subplots(1, 2, width_ratios=(1, 1.6))
    ax_img.imshow(patch_picture(views), interpolation="nearest")
    ax_img.set_title(f"{Path(p.path).name}: what the net saw", fontsize=9)
    ax_img.axis("off")
    ranks = range(len(p.classes))
    ax_bar.barh(ranks, [100 * q for q in p.probabilities], color="tab:blue")
    ax_bar.set_yticks(list(ranks), p.classes, fontsize=8)
    ax_bar.invert_yaxis()  # best at the top
    ax_bar.set_xlim(0, 100)
    ax_bar.set_xlabel("probability (%)")
    for r, q in zip(ranks, p.probabilities):
        ax_bar.text(min(100 * q + 1, 85), r, f"{100 * q:.1f}%", va="center", fontsize=8)
    fig.savefig(out, dpi=PLOT_DPI)
    return out
