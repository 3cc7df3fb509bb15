"""The DALI pipelines and their random inputs: repro/data/pipelines.py and augment.py.

Proves, on PNG images whose pixel values encode their own coordinates (lossless, so every
value can be checked exactly): the training patch is a `crop` square cut at the drawn
offset from the central `resize` square of the image rescaled to shorter side `resize`, and
mirrored exactly when the mirror flag is drawn (about half the time), also for a stored
square decoded patch-only; the 10 test patches are the four corners, the centre and their
mirrors, in that order; the mean image under each patch (mirrored with it) and the channel
mean are subtracted after DALI (the GPU branch's arithmetic, dry run on CPU tensors, gives
the CPU branch's values); the PCA colour shift has mean 0 and covariance
sigma^2 P diag(lambda)^2 P^T (x 255^2) over many draws, is exactly 0 with sigma 0 and
reaches every pixel; every draw depends on (seed, epoch, position) only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repro.data import augment, pipelines
from repro.data.stats import IMAGENET_EIGVAL, IMAGENET_EIGVEC

ROOT = Path(__file__).resolve().parents[1]

S, C = 64, 56  # resize, crop
BASIS = augment.lighting_basis(IMAGENET_EIGVAL, IMAGENET_EIGVEC)


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


def draws(positions, seed=0, epoch=0, flip=True, sigma=0.0) -> dict[str, np.ndarray]:
    """The DALI inputs (crop anchors, mirror) and the lighting shift of these positions."""
    offsets, mirror, shift = augment.draw_train_inputs(
        seed, epoch, np.asarray(positions), S, C, flip, sigma, BASIS
    )
    x, y = augment.crop_positions(offsets, S - C)
    return {
        pipelines.CROP_X: x,
        pipelines.CROP_Y: y,
        pipelines.MIRROR: mirror.astype(np.int32),
        "offsets": offsets,
        "shift": shift,
    }


def feed(inputs: dict) -> dict:
    return {k: inputs[k] for k in (pipelines.CROP_X, pipelines.CROP_Y, pipelines.MIRROR)}


def test_train_patch_is_a_crop_of_the_central_square_and_mirrors(tmp_path):
    # 128 x 64 at step 2: resize to shorter 64 is the identity, the central square is x 32..95.
    img = coded_image(2 * S, S, 2)
    path = save_png(img, tmp_path / "coded.png")
    n = 32
    inputs = draws(range(n))
    (out,) = run(
        pipelines.train_pipeline, dict(decode="cpu", resize=S, crop=C), [(feed(inputs), [path] * n)]
    )
    assert out.shape == (n, 3, C, C) and out.dtype == torch.uint8
    ox = np.rint(inputs[pipelines.CROP_X] * (S - C)).astype(int)
    oy = np.rint(inputs[pipelines.CROP_Y] * (S - C)).astype(int)
    assert len(set(zip(ox, oy))) > 10  # the positions really vary
    for i in range(n):
        want = img[oy[i] : oy[i] + C, S // 2 + ox[i] : S // 2 + ox[i] + C]
        if inputs[pipelines.MIRROR][i]:
            want = want[:, ::-1]
        assert np.array_equal(out[i].permute(1, 2, 0).numpy(), want), i
        assert np.array_equal(inputs["offsets"][i], [ox[i], oy[i]])
    # A mirrored patch's red channel (x coordinate) decreases left to right.
    mirrored = np.flatnonzero(inputs[pipelines.MIRROR])
    assert len(mirrored) and (np.diff(out[mirrored[0], 0, 0].numpy().astype(int)) < 0).all()
    # The same square stored as it is: decoded patch-only, the same pixels.
    square = save_png(np.ascontiguousarray(img[:, S // 2 : S // 2 + S]), tmp_path / "sq.png")
    args = dict(decode="cpu", resize=S, crop=C, stored=True)
    (stored,) = run(pipelines.train_pipeline, args, [(feed(inputs), [square] * n)])
    assert torch.equal(stored, out)


def test_downscaled_image_keeps_its_central_square(tmp_path):
    # 256 x 128 halves to 128 x 64; the central square is x 64..191 of the original.
    img = coded_image(4 * S, 2 * S, 1)
    path = save_png(img, tmp_path / "big.png")
    inputs = draws(range(8), flip=False)
    (out,) = run(
        pipelines.train_pipeline, dict(decode="cpu", resize=S, crop=C), [(feed(inputs), [path] * 8)]
    )
    out = out.float()
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
    args = dict(decode="cpu", resize=S, crop=C)
    (ten,) = run(pipelines.eval_pipeline, {**args, "patches": "ten"}, [({}, [path, path])])
    (centre,) = run(pipelines.eval_pipeline, {**args, "patches": "center"}, [({}, [path])])
    assert ten.shape == (2, 10, 3, C, C)
    d = S - C
    corners = [(0, 0), (d, 0), (0, d), (d, d), (d // 2, d // 2)]  # (x, y): tl, tr, bl, br, centre
    for k, (x, y) in enumerate(corners):
        patch = square[y : y + C, x : x + C].astype(np.uint8)
        assert np.array_equal(ten[0, k].permute(1, 2, 0).numpy(), patch), k
        assert np.array_equal(ten[0, 5 + k].permute(1, 2, 0).numpy(), patch[:, ::-1]), k
    assert torch.equal(centre[0], ten[1, 4])


def test_mean_image_and_channel_mean_are_subtracted(tmp_path):
    img = coded_image(S, S, 3)
    path = save_png(img, tmp_path / "square.png")
    mean_image = np.random.default_rng(1).uniform(0, 255, (S, S, 3)).astype(np.float32)
    norm = augment.Normalizer(mean_image, np.array([10.0, 20.0, 30.0]), C, "cpu")
    args = dict(decode="cpu", resize=S, crop=C)
    (ten,) = run(pipelines.eval_pipeline, {**args, "patches": "ten"}, [({}, [path])])
    views = augment.view_offsets("ten", S - C)
    out = norm.views(ten, views)  # (10, 3, C, C)
    minus = img.astype(np.float32) - mean_image
    for k, (x, y, m) in enumerate(views):
        want = minus[y : y + C, x : x + C] - [10, 20, 30]
        want = want[:, ::-1] if m else want
        np.testing.assert_allclose(out[k].permute(1, 2, 0).numpy(), want, atol=1e-4)
    # Training patches: the mean under each drawn patch, mirrored with it.
    inputs = draws(range(16))
    (patches,) = run(pipelines.train_pipeline, args, [(feed(inputs), [path] * 16)])
    mirror = inputs[pipelines.MIRROR].astype(bool)
    out = norm.train(patches, inputs["offsets"], mirror, np.zeros((16, 3)))
    for i, (x, y) in enumerate(inputs["offsets"]):
        want = minus[y : y + C, x : x + C] - [10, 20, 30]
        want = want[:, ::-1] if mirror[i] else want
        np.testing.assert_allclose(out[i].permute(1, 2, 0).numpy(), want, atol=1e-4)
    assert mirror.any() and not mirror.all()


def test_lighting_offset_statistics():
    sigma = 0.1
    inputs = draws(range(8000), sigma=sigma)
    shift = inputs["shift"]  # (n, 3) RGB added to every pixel, 0-255
    want = sigma**2 * 255**2 * IMAGENET_EIGVEC @ np.diag(IMAGENET_EIGVAL**2) @ IMAGENET_EIGVEC.T
    sd = np.sqrt(np.diag(want))
    assert (np.abs(shift.mean(axis=0)) < 4 * sd / np.sqrt(len(shift))).all()
    cov = np.cov(shift.T)
    assert np.linalg.norm(cov - want) / np.linalg.norm(want) < 0.06  # sampling error ~2%
    # The dominant direction is the first eigenvector (brightness), as in §4.1.
    top = np.linalg.eigh(cov)[1][:, -1]
    assert abs(top @ IMAGENET_EIGVEC[:, 0]) > 0.999
    # sigma 0: nothing is added.
    off = draws(range(50), sigma=0.0)["shift"]
    assert np.array_equal(off, np.zeros_like(off))


def test_lighting_shift_reaches_every_pixel(tmp_path):
    path = save_png(coded_image(S, S, 3), tmp_path / "square.png")
    args = dict(decode="cpu", resize=S, crop=C)
    lit = draws(range(4), sigma=0.5)
    dark = draws(range(4), sigma=0.0)
    out = run(pipelines.train_pipeline, args, [(feed(lit), [path] * 4), (feed(dark), [path] * 4)])
    norm = augment.Normalizer(None, np.zeros(3), C, "cpu")
    mirror = lit[pipelines.MIRROR].astype(bool)
    images = [norm.train(o, d["offsets"], mirror, d["shift"]) for o, d in zip(out, (lit, dark))]
    diff = (images[0] - images[1]).numpy()  # same crops and flips, only the lighting differs
    shift = lit["shift"]
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
        assert not np.array_equal(whole["shift"], other["shift"])
    # Switching lighting off leaves crops and flips unchanged.
    dark = draws(range(20), sigma=0.0)
    assert np.array_equal(dark[pipelines.CROP_X], whole[pipelines.CROP_X])
    assert np.array_equal(dark[pipelines.MIRROR], whole[pipelines.MIRROR])
    order = augment.epoch_order(0, 3, 50)
    assert sorted(order) == list(range(50))
    assert np.array_equal(order, augment.epoch_order(0, 3, 50))
    assert not np.array_equal(order, augment.epoch_order(0, 4, 50))
    # A whole epoch drawn at once (the loader's way) equals the draws position by position.
    epoch = augment.EpochDraws.draw(0, 0, 1000, S - C)
    offsets, mirror, shift = epoch.take(np.arange(5, 11), True, 0.1, BASIS)
    assert np.array_equal(offsets, whole["offsets"][5:11])
    assert np.array_equal(mirror.astype(np.int32), whole[pipelines.MIRROR][5:11])
    assert np.array_equal(shift, whole["shift"][5:11])


def test_a_file_dali_cannot_decode_is_named(tmp_path):
    good = save_png(coded_image(S, S, 1), tmp_path / "good.png")
    bad = tmp_path / "garbage.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 2 + b"\xff\xd9")
    with pytest.raises(pipelines.DecodeError, match="garbage.jpg"):
        run(
            pipelines.eval_pipeline,
            dict(decode="cpu", resize=S, crop=C, patches="center"),
            [({}, [good, str(bad), good])],
        )


def test_the_gpu_branch_of_normalisation_dry_run_on_the_cpu_equals_the_cpu_branch():
    """The CUDA branch's arithmetic (one gather of the mean patches, non_blocking copies) run
    on CPU tensors: what the GPU test below checks on a GPU, here on every machine."""
    rng = np.random.default_rng(0)
    mean_image = rng.uniform(0, 255, (S, S, 3)).astype(np.float32)
    patches = torch.from_numpy(rng.integers(0, 256, (16, 3, C, C), dtype=np.uint8))
    inputs = draws(range(16), sigma=0.1)
    mirror = inputs[pipelines.MIRROR].astype(bool)
    cpu = augment.Normalizer(mean_image, np.array([1.0, 2.0, 3.0]), C, "cpu")
    gpu_branch = augment.Normalizer(mean_image, np.array([1.0, 2.0, 3.0]), C, "cpu")
    gpu_branch.cuda = True  # its mean images as tensors, as the constructor makes them on a GPU
    gpu_branch.mean = torch.from_numpy(gpu_branch.mean)
    gpu_branch.mean_mirrored = torch.from_numpy(gpu_branch.mean_mirrored)
    args = (patches, inputs["offsets"], mirror, inputs["shift"])
    torch.testing.assert_close(gpu_branch.train(*args), cpu.train(*args))
    views = augment.view_offsets("ten", S - C)
    ten = patches[:10]  # one image's 10 views
    torch.testing.assert_close(gpu_branch.views(ten, views), cpu.views(ten, views))


@pytest.mark.gpu
def test_normalisation_on_the_gpu_equals_the_cpu():
    """The CUDA branch gathers the mean patches in one kernel; the CPU one slices: same values."""
    rng = np.random.default_rng(0)
    mean_image = rng.uniform(0, 255, (S, S, 3)).astype(np.float32)
    patches = torch.from_numpy(rng.integers(0, 256, (16, 3, C, C), dtype=np.uint8))
    inputs = draws(range(16), sigma=0.1)
    mirror = inputs[pipelines.MIRROR].astype(bool)
    out = [
        augment.Normalizer(mean_image, np.array([1.0, 2.0, 3.0]), C, device).train(
            patches, inputs["offsets"], mirror, inputs["shift"]
        )
        for device in ("cpu", "cuda")
    ]
    assert torch.equal(out[0], out[1].cpu())
