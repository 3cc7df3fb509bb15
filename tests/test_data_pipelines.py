"""The DALI pipelines and their random inputs: repro/data/pipelines.py.

Proves, on PNG images whose pixel values encode their own coordinates (lossless, so every
value can be checked exactly): the training patch is a `crop` square cut at the drawn
offset from the central `resize` square of the image rescaled to shorter side `resize`, and
mirrored exactly when the mirror flag is drawn (about half the time); the 10 test patches
are the four corners, the centre and their mirrors, in that order; the PCA colour offset
has mean 0 and covariance sigma^2 P diag(lambda)^2 P^T (x 255^2) over many draws, and is
exactly 0 with sigma 0; every draw depends on (seed, epoch, position) only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repro.data import pipelines
from repro.data.stats import IMAGENET_EIGVAL, IMAGENET_EIGVEC

ROOT = Path(__file__).resolve().parents[1]

S, C = 64, 56  # resize, crop
BASIS = pipelines.lighting_basis(IMAGENET_EIGVAL, IMAGENET_EIGVEC)


def coded_image(width: int, height: int, step: int) -> np.ndarray:
    """(h, w, 3) uint8: R = step * x, G = step * y, B = 100."""
    img = np.zeros((height, width, 3), np.uint8)
    img[..., 0] = (step * np.arange(width))[None, :]
    img[..., 1] = (step * np.arange(height))[:, None]
    img[..., 2] = 100
    return img


def save_png(img: np.ndarray, path: Path) -> str:
    Image.fromarray(img).save(path)
    return str(path)


def run(pipeline, args: dict, batches: list[tuple[dict, list[str]]]) -> list[torch.Tensor]:
    fed = pipelines.FedPipeline(pipeline, args, 32, 1, torch.device("cpu"), gpu=False)
    return list(fed.run(batches))


def draws(positions, seed=0, epoch=0, flip=True, sigma=0.0, mean=(0.0, 0.0, 0.0)):
    return pipelines.draw_train_inputs(
        seed, epoch, np.asarray(positions), S, C, flip, sigma, BASIS, np.asarray(mean)
    )


def test_train_patch_is_a_crop_of_the_central_square_and_mirrors(tmp_path):
    # 128 x 64 at step 2: resize to shorter 64 is the identity, the central square is x 32..95.
    img = coded_image(2 * S, S, 2)
    path = save_png(img, tmp_path / "coded.png")
    n = 32
    inputs = draws(range(n))
    (out,) = run(
        pipelines.train_pipeline,
        dict(decode="cpu", resize=S, crop=C, mean_image=None),
        [(inputs, [path] * n)],
    )
    assert out.shape == (n, 3, C, C) and out.dtype == torch.float32
    ox = np.rint(inputs[pipelines.CROP_X] * (S - C)).astype(int)
    oy = np.rint(inputs[pipelines.CROP_Y] * (S - C)).astype(int)
    assert len(set(zip(ox, oy))) > 10  # the positions really vary
    for i in range(n):
        want = img[oy[i] : oy[i] + C, S // 2 + ox[i] : S // 2 + ox[i] + C].astype(np.float32)
        if inputs[pipelines.MIRROR][i]:
            want = want[:, ::-1]
        assert np.array_equal(out[i].permute(1, 2, 0).numpy(), want), i
    # A mirrored patch's red channel (x coordinate) decreases left to right.
    mirrored = np.flatnonzero(inputs[pipelines.MIRROR])
    assert len(mirrored) and (np.diff(out[mirrored[0], 0, 0].numpy()) < 0).all()


def test_downscaled_image_keeps_its_central_square(tmp_path):
    # 256 x 128 halves to 128 x 64; the central square is x 64..191 of the original.
    img = coded_image(4 * S, 2 * S, 1)
    path = save_png(img, tmp_path / "big.png")
    inputs = draws(range(8), flip=False)
    (out,) = run(
        pipelines.train_pipeline,
        dict(decode="cpu", resize=S, crop=C, mean_image=None),
        [(inputs, [path] * 8)],
    )
    ox = np.rint(inputs[pipelines.CROP_X] * (S - C))
    oy = np.rint(inputs[pipelines.CROP_Y] * (S - C))
    for i in range(8):
        # Pixel (u, v) of the halved image averages originals 2u, 2u+1: value 2u + 0.5.
        red, green = out[i, 0].numpy(), out[i, 1].numpy()
        x = 2 * (S // 2 + ox[i] + np.arange(C)) + 0.5
        y = 2 * (oy[i] + np.arange(C)) + 0.5
        assert np.abs(red[C // 2] - x).max() <= 1.5
        assert np.abs(green[:, C // 2] - y).max() <= 1.5


def test_flip_rate_and_crop_positions():
    inputs = draws(range(4000))
    rate = inputs[pipelines.MIRROR].mean()
    assert 0.46 < rate < 0.54  # 4000 fair coins: sd 0.008
    ox = np.rint(inputs[pipelines.CROP_X] * (S - C))
    assert set(ox) == set(range(S - C + 1))  # every offset, nothing outside
    assert draws(range(100), flip=False)[pipelines.MIRROR].sum() == 0


def test_ten_patches_are_corners_centre_and_mirrors(tmp_path):
    img = coded_image(2 * S, S, 2)
    square = img[:, S // 2 : S // 2 + S].astype(np.float32)
    path = save_png(img, tmp_path / "coded.png")
    args = dict(decode="cpu", resize=S, crop=C, mean_image=None, channel_mean=(0.0, 0.0, 0.0))
    (ten,) = run(pipelines.eval_pipeline, {**args, "patches": "ten"}, [({}, [path, path])])
    (centre,) = run(pipelines.eval_pipeline, {**args, "patches": "center"}, [({}, [path])])
    assert ten.shape == (2, 10, 3, C, C)
    d = S - C
    corners = [(0, 0), (d, 0), (0, d), (d, d), (d // 2, d // 2)]  # (x, y): tl, tr, bl, br, centre
    for k, (x, y) in enumerate(corners):
        patch = square[y : y + C, x : x + C]
        assert np.array_equal(ten[0, k].permute(1, 2, 0).numpy(), patch), k
        assert np.array_equal(ten[0, 5 + k].permute(1, 2, 0).numpy(), patch[:, ::-1]), k
    assert torch.equal(centre[0], ten[1, 4])


def test_mean_image_and_channel_mean_are_subtracted(tmp_path):
    img = coded_image(S, S, 3)
    path = save_png(img, tmp_path / "square.png")
    mean_image = np.random.default_rng(1).uniform(0, 255, (S, S, 3)).astype(np.float32)
    args = dict(decode="cpu", resize=S, crop=C, channel_mean=(10.0, 20.0, 30.0), patches="center")
    (out,) = run(pipelines.eval_pipeline, {**args, "mean_image": mean_image}, [({}, [path])])
    o = (S - C) // 2
    want = (img.astype(np.float32) - mean_image)[o : o + C, o : o + C] - [10, 20, 30]
    np.testing.assert_allclose(out[0].permute(1, 2, 0).numpy(), want, atol=1e-4)


def test_lighting_offset_statistics():
    sigma = 0.1
    mean = np.array([100.0, 110.0, 120.0])
    inputs = draws(range(8000), sigma=sigma, mean=mean)
    shift = mean - inputs[pipelines.OFFSET]  # (n, 3) RGB added to every pixel, 0-255
    want = sigma**2 * 255**2 * IMAGENET_EIGVEC @ np.diag(IMAGENET_EIGVAL**2) @ IMAGENET_EIGVEC.T
    sd = np.sqrt(np.diag(want))
    assert (np.abs(shift.mean(axis=0)) < 4 * sd / np.sqrt(len(shift))).all()
    cov = np.cov(shift.T)
    assert np.linalg.norm(cov - want) / np.linalg.norm(want) < 0.06  # sampling error ~2%
    # The dominant direction is the first eigenvector (brightness), as in §4.1.
    top = np.linalg.eigh(cov)[1][:, -1]
    assert abs(top @ IMAGENET_EIGVEC[:, 0]) > 0.999
    # sigma 0: nothing is added.
    off = draws(range(50), sigma=0.0, mean=mean)[pipelines.OFFSET]
    assert np.array_equal(off, np.broadcast_to(mean.astype(np.float32), off.shape))


def test_lighting_shift_reaches_every_pixel(tmp_path):
    path = save_png(coded_image(S, S, 3), tmp_path / "square.png")
    args = dict(decode="cpu", resize=S, crop=C, mean_image=None)
    lit = draws(range(4), sigma=0.5)
    dark = draws(range(4), sigma=0.0)
    out = run(pipelines.train_pipeline, args, [(lit, [path] * 4), (dark, [path] * 4)])
    diff = (out[0] - out[1]).numpy()  # same crops and flips, only the lighting differs
    shift = -lit[pipelines.OFFSET]
    np.testing.assert_allclose(
        diff, np.broadcast_to(shift[:, :, None, None], diff.shape), atol=1e-3
    )
    assert np.abs(shift).max() > 1.0


def test_draws_depend_on_seed_epoch_position_only():
    whole = draws(range(20), sigma=0.1)
    part = draws(range(5, 11), sigma=0.1)
    for key in whole:
        assert np.array_equal(whole[key][5:11], part[key])
    other_epoch = draws(range(20), epoch=1, sigma=0.1)
    other_seed = draws(range(20), seed=1, sigma=0.1)
    for other in (other_epoch, other_seed):
        assert not np.array_equal(whole[pipelines.OFFSET], other[pipelines.OFFSET])
    # Switching lighting off leaves crops and flips unchanged.
    dark = draws(range(20), sigma=0.0)
    assert np.array_equal(dark[pipelines.CROP_X], whole[pipelines.CROP_X])
    assert np.array_equal(dark[pipelines.MIRROR], whole[pipelines.MIRROR])
    order = pipelines.epoch_order(0, 3, 50)
    assert sorted(order) == list(range(50))
    assert np.array_equal(order, pipelines.epoch_order(0, 3, 50))
    assert not np.array_equal(order, pipelines.epoch_order(0, 4, 50))


def test_a_file_dali_cannot_decode_is_named(tmp_path):
    good = save_png(coded_image(S, S, 1), tmp_path / "good.png")
    bad = tmp_path / "garbage.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 2 + b"\xff\xd9")
    with pytest.raises(pipelines.DecodeError, match="garbage.jpg"):
        run(
            pipelines.eval_pipeline,
            dict(
                decode="cpu",
                resize=S,
                crop=C,
                mean_image=None,
                channel_mean=(0.0, 0.0, 0.0),
                patches="center",
            ),
            [({}, [good, str(bad), good])],
        )
