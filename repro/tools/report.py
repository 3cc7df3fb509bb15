"""Evaluate a checkpoint on a validation set: the paper's table, per-class accuracy, confusion.

    python launch/evaluate.py runs/demo/checkpoints/best.pt
    torchrun --nproc_per_node 2 launch/evaluate.py runs/demo/checkpoints/best.pt

Top-1 and top-5 error (Table 1's columns) with the centre patch and with the 10 patches of
§4.1 (the softmax averaged over the four corners, the centre and their reflections), the
accuracy of every class, and the confusion matrix. Every rank evaluates (the towers of a
replica need each other; replicas read disjoint shards and sum their counts, see
repro/run/evaluate.py); rank 0 prints and writes:

    OUT/eval.json               everything below, per patch scheme
    OUT/confusion_center.png    confusion matrix of the centre patch
    OUT/confusion_ten.png       ... of the 10 patches

OUT defaults to the checkpoint's name without `.pt` plus `_eval`, beside it
(runs/demo/checkpoints/best.pt -> runs/demo/checkpoints/best_eval/).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from repro.data.folders import DataError, class_folders
from repro.data.loaders import EvalLoader, val_set
from repro.net.dist import init_distributed, teardown
from repro.run.evaluate import evaluate
from repro.tools.inference import (
    VIEWS,
    build_trained,
    check_classes,
    check_device,
    eval_data_config,
    read_trained,
    writable_dir,
)

PATCHES = {"center": ("center",), "ten": ("ten",), "both": ("center", "ten")}
LABELS = {"center": "centre patch", "ten": "10 patches"}
DPI = 100
NAMED_AXES_UP_TO = 100
"""Class names on the confusion axes up to this many classes (small print beyond 30)."""


def default_out(checkpoint: str | Path) -> Path:
    path = Path(checkpoint)
    return path.with_name(f"{path.stem}_eval")


def run(
    checkpoint: str | Path,
    data_root: str | None = None,
    patches: str = "both",
    batch: int = 0,
    out: str | Path | None = None,
    device: str = "auto",
) -> dict:
    """Evaluate on every rank; rank 0 prints the table and writes OUT. Returns the report.

    `batch` is images per forward pass over all ranks of a replica; 0 takes the run's
    train.batch_size for the centre patch and a tenth of it for 10 patches (the same number
    of views per pass).
    """
    check_device(device)
    state, cfg, class_names = read_trained(checkpoint)
    data = eval_data_config(cfg.data, data_root)
    root = Path(data.root)
    if not root.is_dir():
        where = "--data-root" if data_root is not None else "the checkpoint's data.root"
        raise DataError(f"data root {root} ({where}) does not exist; pass --data-root ROOT")
    listed = root / "train" if (root / "train").is_dir() else root / "val"
    if data.source != "imagenet" or (root / "train").is_dir():
        check_classes(checkpoint, cfg, len(class_folders(listed)), str(listed))
    out = Path(out) if out is not None else default_out(checkpoint)
    if int(os.environ.get("RANK", "0")) == 0:
        # Before the process group forms: a rank that fails here ends the torchrun job at
        # once, where a failure after it would leave the other rank waiting in a collective.
        writable_dir(out)

    layout = init_distributed(cfg.model.towers, device, cfg.train.dist_timeout_s)
    try:
        from repro.run.train import switches
        from repro.run.window import progress_bar

        model = build_trained(checkpoint, state, cfg, layout)
        bf16, channels_last, _ = switches(cfg, layout)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        autocast = lambda: torch.autocast(layout.device.type, torch.bfloat16, enabled=bf16)  # noqa: E731
        images = val_set(data, class_names)
        results = {}
        for scheme in PATCHES[patches]:
            per_pass = batch or max(1, cfg.train.batch_size // VIEWS[scheme])
            per_replica = max(1, per_pass // layout.replicas)
            loader = EvalLoader(data, layout, images, per_replica, scheme, channels_last)
            with progress_bar(layout, loader.num_images, LABELS[scheme]) as bar:
                results[scheme] = evaluate(
                    model, loader, layout, cfg.model.num_classes, scheme, autocast, bar
                )
        report = {
            "checkpoint": str(checkpoint),
            "epoch": state.get("epoch"),
            "step": state.get("step"),
            "data_root": str(root),
            "validation": str(root / "val"),
            "images": len(images.paths),
            "world_size": layout.world_size,
            "class_names": class_names,
            "results": results,
        }
        if layout.is_main:
            write_report(report, out)
        return report
    finally:
        teardown()


def write_report(report: dict, out: Path) -> None:
    """Print the table; write eval.json and one confusion PNG per patch scheme."""
    out = writable_dir(out)
    names = report["class_names"]
    for scheme, result in report["results"].items():
        png = out / f"confusion_{scheme}.png"
        plot_confusion(
            result["confusion"],
            names,
            png,
            f"{LABELS[scheme]}: top-1 error "
            f"{result['top1_error']:.2f}% on {result['images']} images",
        )
        result["confusion_png"] = str(png)
    (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    print(format_table(report))
    print(
        f"wrote {out / 'eval.json'} and {', '.join(r['confusion_png'] for r in report['results'].values())}"
    )


def format_table(report: dict) -> str:
    """The errors per scheme, then each class's accuracy per scheme (worst first)."""
    results = report["results"]
    lines = [
        f"{report['checkpoint']} (step {report['step']}, {report['epoch']} full epoch(s)) on "
        f"{report['validation']}: {report['images']} images, {len(report['class_names'])} classes",
        f"{'':<14}{'top-1 error':>12}{'top-5 error':>13}{'loss':>9}",
    ]
    for scheme, r in results.items():
        lines.append(
            f"{LABELS[scheme]:<14}{r['top1_error']:>11.2f}%{r['top5_error']:>12.2f}%"
            f"{r['loss']:>9.4f}"
        )
    if len(report["class_names"]) < 5:
        lines.append(
            f"(top-5 counts the top {len(report['class_names'])} guesses: fewer than 5 classes)"
        )
    schemes = list(results)
    lines.append("per-class accuracy (" + " / ".join(LABELS[s] for s in schemes) + "):")
    first = results[schemes[0]]["per_class_accuracy"]
    order = sorted(range(len(first)), key=lambda i: (first[i] is None, first[i] or 0.0))
    width = max(len(n) for n in report["class_names"])
    for i in order:
        cells = [results[s]["per_class_accuracy"][i] for s in schemes]
        text = "".join(f"{'-':>9}" if a is None else f"{100 * a:>8.1f}%" for a in cells)
        lines.append(f"  {report['class_names'][i]:<{width}}{text}")
    return "\n".join(lines)


def figure_inches(classes: int) -> float:
    """Side of the square confusion figure: 6 in for a few classes, growing to 16 in."""
    return float(min(16.0, max(6.0, 3.0 + 0.13 * classes)))


def plot_confusion(confusion: list[list[int]], names: list[str], out: Path, title: str) -> Path:
    """Rows: true class; columns: predicted; colour: the row's fraction (recall per class).

    Class names label both axes up to NAMED_AXES_UP_TO classes, counts are written in the
    cells up to 30; beyond that the axes show every n-th index.
    """
    counts = np.asarray(confusion, dtype=np.float64)
    n = counts.shape[0]
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = figure_inches(n)
    fig = Figure(figsize=(side, side), layout="constrained")
    ax = fig.subplots()
    shown = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(shown, ax=ax, shrink=0.8, label="fraction of the true class")
    if n <= NAMED_AXES_UP_TO:
        size = 9 if n <= 30 else max(4.0, 9 - n / 15)
        ax.set_xticks(range(n), names, rotation=90, fontsize=size)
        ax.set_yticks(range(n), names, fontsize=size)
    else:
        step = math.ceil(n / 50)
        ax.set_xticks(range(0, n, step))
        ax.set_yticks(range(0, n, step))
    if n <= 30:
        for (t, p), c in np.ndenumerate(counts):
            if c:
                colour = "white" if rows[t, p] > 0.5 else "black"
                ax.text(p, t, str(int(c)), ha="center", va="center", fontsize=8, color=colour)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    fig.savefig(out, dpi=DPI)
    return out
