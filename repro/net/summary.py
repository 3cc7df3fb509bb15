"""Per-layer summary of the net: output shape, parameters and multiply-adds, per tower and total.

Computed from the configuration alone (no forward pass), so it prints instantly for the
full 1000-class net; tests check it against the real modules' parameter counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from repro.config import ModelConfig
from repro.net.layers import spatial_sizes
from repro.net.model import layer_shapes, split_classes


@dataclass(frozen=True)
class Row:
    layer: str
    output: tuple[int, ...]
    """Per-tower output shape of one image: (C, H, W) or (C,)."""
    params_tower: int
    """Parameters of tower 0's share (fc8: tower 0's classes)."""
    params_total: int
    macs_tower: int
    """Multiply-adds per image of tower 0's share."""
    macs_total: int


def summarize(cfg: ModelConfig) -> list[Row]:
    """Rows for conv1..fc8 and the pooling layers (which have no parameters)."""
    sizes = spatial_sizes(cfg)
    shapes = layer_shapes(cfg)
    towers = cfg.towers
    fc8_split = split_classes(cfg.num_classes, towers)
    side = {"conv1": sizes["conv1"], "conv2": sizes["pool1"]}
    rows: list[Row] = []

    def add(name: str, output: tuple[int, ...], weight: tuple[int, ...], out_pixels: int) -> None:
        per_tower_out = weight[0]
        fan_in = 1
        for d in weight[1:]:
            fan_in *= d
        params_tower = per_tower_out * fan_in + per_tower_out
        macs_tower = per_tower_out * fan_in * out_pixels
        if name == "fc8":
            total_out = cfg.num_classes
        else:
            total_out = per_tower_out * towers
        rows.append(
            Row(
                name,
                output,
                params_tower,
                total_out * fan_in + total_out,
                macs_tower,
                total_out * fan_in * out_pixels,
            )
        )

    def pool(name: str, channels: int, side_: int) -> None:
        rows.append(Row(name, (channels, side_, side_), 0, 0, 0, 0))

    w = cfg.widths
    add("conv1", (w[0], side["conv1"], side["conv1"]), shapes["conv1"], side["conv1"] ** 2)
    pool("pool1", w[0], sizes["pool1"])
    add("conv2", (w[1], sizes["pool1"], sizes["pool1"]), shapes["conv2"], sizes["pool1"] ** 2)
    pool("pool2", w[1], sizes["pool2"])
    for i, name in enumerate(("conv3", "conv4", "conv5"), start=2):
        add(name, (w[i], sizes["pool2"], sizes["pool2"]), shapes[name], sizes["pool2"] ** 2)
    pool("pool5", w[4], sizes["pool5"])
    add("fc6", (cfg.fc_width,), shapes["fc6"], 1)
    add("fc7", (cfg.fc_width,), shapes["fc7"], 1)
    fc8 = (fc8_split[0], shapes["fc8"][1])
    add("fc8", (fc8_split[0],), fc8, 1)
    return rows


def training_flops(cfg: ModelConfig) -> int:
    """FLOPs of one training image: forward, weight gradients and input gradients (2 per MAC).

    conv1's input gradient is never computed (the image needs none), so it is left out.
    """
    rows = summarize(cfg)
    macs = sum(r.macs_total for r in rows)
    conv1 = rows[0].macs_total
    return 2 * (3 * macs - conv1)


def format_summary(cfg: ModelConfig) -> str:
    """A fixed-width table with a totals line, as users of the older tutorials print by hand."""
    rows = summarize(cfg)
    head = f"{'layer':<6} {'output/tower':>14} {'params/tower':>13} {'params':>12} {'MACs/tower':>14} {'MACs':>14}"
    lines = [
        f"AlexNet: {cfg.towers} tower(s), input {cfg.image_size}x{cfg.image_size} "
        f"(+{cfg.pad_right_bottom} right/bottom), {cfg.num_classes} classes, exchange={cfg.exchange}",
        head,
        "-" * len(head),
    ]
    for r in rows:
        shape = "x".join(str(d) for d in r.output)
        lines.append(
            f"{r.layer:<6} {shape:>14} {r.params_tower:>13,} {r.params_total:>12,} "
            f"{r.macs_tower:>14,} {r.macs_total:>14,}"
        )
    lines.append("-" * len(head))
    p_t = sum(r.params_tower for r in rows)
    p = sum(r.params_total for r in rows)
    m_t = sum(r.macs_tower for r in rows)
    m = sum(r.macs_total for r in rows)
    lines.append(f"{'total':<6} {'':>14} {p_t:>13,} {p:>12,} {m_t:>14,} {m:>14,}")
    lines.append(
        f"forward {2 * m / 1e9:.2f} GFLOP per image, training {training_flops(cfg) / 1e9:.2f} GFLOP"
    )
    return "\n".join(lines)
