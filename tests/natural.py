"""Natural-looking test images: smooth colour gradients with soft-edged shapes, not noise.

JPEG quality and decoding speed behave on these as on photographs (noise would make every
file large and every re-encoding lossy). `natural(w, h, seed)` is an RGB PIL image.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def natural(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xx / width + np.sin(angle) * yy / height + 1) / 2
    image = Image.fromarray((c0 * (1 - t[..., None]) + c1 * t[..., None]).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(4, width / 4)
        colour = tuple(int(v) for v in rng.uniform(0, 255, 3))
        draw.ellipse([x - r, y - 0.7 * r, x + r, y + 0.7 * r], fill=colour)
    return image.filter(ImageFilter.GaussianBlur(2))


def corrupt_middle(data: bytes, seed: int = 1) -> bytes:
    """A JPEG's bytes with 40 bytes of its middle third overwritten: it still decodes, to
    garbage, with libjpeg's "Corrupt JPEG data" warning."""
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    n = len(out)
    for i in rng.integers(n // 3, 2 * n // 3, 40):
        out[i] = int(rng.integers(0, 255))
    return bytes(out)
