"""The loaders: repro/data/loaders.py, on JPEG class-folder trees made here.

Proves: batches have the documented shapes, dtypes, device and value ranges; labels are the
index of the image's class folder in sorted order (each class has its own colour, so the
pixels tell the class); an epoch drops its last partial batch; `epoch(e, start_step=k)`
yields exactly batches k.. of `epoch(e)`; the 10-patch evaluation keeps an image's views
adjacent and its 5th view is the centre patch; on 2 gloo ranks the two towers of a replica
get identical batches equal to one process's (also with uneven shares and an empty share),
and 2 replicas read disjoint shards whose union is the one-process batch and validation
set; ImageNet's flat validation folder reads both label formats; bad files are skipped with
a warning naming each, and each layout mistake is an error naming the path.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from spawn import run_ranks

from repro.config import DataConfig
from repro.data import loaders as data
from repro.net import dist
from repro.net.dist import single_process_layout

ROOT = Path(__file__).resolve().parents[1]

# Created in this order on purpose: class order must be the sorted names (ant, moth, zebra).
COLOURS = {"zebra": 0, "ant": 1, "moth": 2}  # the RGB channel each class is bright in
CLASSES = sorted(COLOURS)
N_TRAIN, N_VAL = 12, 3  # per class: 36 training, 9 validation images


def write_image(path: Path, channel: int, rng: np.random.Generator) -> None:
    w, h = int(rng.integers(40, 81)), int(rng.integers(30, 61))
    img = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
    img[..., channel] += 180
    Image.fromarray(img).save(path, quality=90)


def make_tree(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        for name, channel in COLOURS.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                write_image(root / split / name / f"{name}_{i:02d}.jpg", channel, rng)
    return root


def config(root: Path, **kw) -> DataConfig:
    base = dict(root=str(root), resize=32, crop=28, threads=1, mean="none", lighting_std=0.0)
    return DataConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("tree"))


def class_of(images: torch.Tensor) -> list[int]:
    """The class each image's colour says (mean over pixels, brightest channel)."""
    bright = images.mean(dim=(2, 3)).argmax(dim=1).tolist()
    by_channel = {c: CLASSES.index(n) for n, c in COLOURS.items()}
    return [by_channel[c] for c in bright]


def test_train_batches_shapes_labels_and_ranges(tree):
    loader = data.build_train_loader(config(tree), single_process_layout(), 8, seed=0)
    assert loader.class_names == CLASSES
    assert loader.steps_per_epoch == 36 // 8  # the last partial batch (4 images) is dropped
    batches = list(loader.epoch(0))
    assert len(batches) == 4
    for images, labels in batches:
        assert images.shape == (8, 3, 28, 28) and images.dtype == torch.float32
        assert labels.shape == (8,) and labels.dtype == torch.int64
        assert images.device.type == "cpu" and labels.device.type == "cpu"
        assert 0 <= images.min() and images.max() <= 255  # mean 'none', no lighting
        assert class_of(images) == labels.tolist()
    # Each image at most once per epoch: 32 draws from 12 per class.
    counts = np.bincount(torch.cat([lab for _, lab in batches]).numpy(), minlength=3)
    assert counts.sum() == 32 and counts.max() <= N_TRAIN


def test_mean_subtraction_and_lighting_change_values(tree):
    layout = single_process_layout()
    plain = next(data.build_train_loader(config(tree), layout, 8, seed=0).epoch(0))[0]
    with pytest.warns(UserWarning, match="no statistics file"):
        lit = data.build_train_loader(config(tree, mean="channel", lighting_std=0.1), layout, 8, 0)
    images = next(lit.epoch(0))[0]
    offset = (plain - images).mean(dim=(2, 3))  # (8, 3): channel mean - lighting shift
    assert images.min() < 0
    assert offset.std(dim=0).max() > 0.1  # the shift differs per image
    imagenet_mean = torch.tensor([0.485, 0.456, 0.406]) * 255
    assert torch.allclose(offset.mean(dim=0), imagenet_mean, atol=15)
    unlit = next(lit.epoch(0, lighting=False))[0]
    assert torch.allclose(plain - unlit, imagenet_mean[None, :, None, None].expand_as(plain))


@pytest.mark.filterwarnings("ignore:no statistics file")
def test_resume_yields_the_remaining_batches(tree):
    loader = data.build_train_loader(config(tree, lighting_std=0.1), single_process_layout(), 6, 3)
    full = list(loader.epoch(2))
    assert len(full) == 6
    resumed = list(loader.epoch(2, start_step=4))
    assert len(resumed) == 2
    for (a, la), (b, lb) in zip(full[4:], resumed):
        assert torch.equal(a, b) and torch.equal(la, lb)
    # An abandoned epoch leaves nothing behind, and another epoch is another order.
    next(iter(loader.epoch(5)))
    again = list(loader.epoch(2))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(full, again))
    other = next(loader.epoch(3))[1]
    assert not torch.equal(other, full[0][1])
    with pytest.raises(data.DataError, match="start_step"):
        next(loader.epoch(0, start_step=7))


def test_eval_centre_and_ten_patches(tree):
    layout = single_process_layout()
    centre = data.build_eval_loader(config(tree), layout, 4, patches="center")
    ten = data.build_eval_loader(config(tree), layout, 4, patches="ten", channels_last=True)
    assert centre.num_images == ten.num_images == 9 and len(centre) == 3
    c_batches, t_batches = list(centre), list(ten)
    assert [len(lab) for _, lab in c_batches] == [4, 4, 1]  # the last partial batch is kept
    labels = torch.cat([lab for _, lab in c_batches])
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # sorted classes, sorted files
    for (ci, cl), (ti, tl) in zip(c_batches, t_batches):
        n = len(cl)
        assert ci.shape == (n, 3, 28, 28) and ti.shape == (n * 10, 3, 28, 28)
        assert ti.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(cl, tl)
        views = ti.reshape(n, 10, 3, 28, 28)
        assert torch.equal(views[:, 4], ci)  # view 4: the centre patch
        assert torch.equal(views[:, 9], ci.flip(-1))  # view 9: its mirror
        assert class_of(ci) == cl.tolist()


def test_synthetic_source():
    cfg = DataConfig(source="synthetic", crop=28, synthetic_images=100)
    loader = data.build_train_loader(cfg, single_process_layout(), 8, seed=0, num_classes=5)
    assert loader.steps_per_epoch == 12 and loader.class_names == [str(i) for i in range(5)]
    batches = list(loader.epoch(0, start_step=10))
    assert len(batches) == 2
    images, labels = batches[0]
    assert images.shape == (8, 3, 28, 28) and labels.dtype == torch.int64
    assert labels.max() < 5 and images.std() > 10
    val = data.build_eval_loader(cfg, single_process_layout(), 4, patches="ten", num_classes=5)
    images, labels = next(iter(val))
    assert images.shape == (40, 3, 28, 28) and labels.shape == (4,)


# -- two ranks ------------------------------------------------------------------------------


def _rank_batches(root: str, towers: int, batch: int, steps: int):
    layout = dist.init_distributed(towers=towers, device="cpu")
    cfg = config(Path(root), lighting_std=0.1, mean="channel")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no stats file: ImageNet constants
        train = data.build_train_loader(cfg, layout, batch, seed=7)
        val = data.build_eval_loader(cfg, layout, 4, patches="ten")
    out = list(train.epoch(1, start_step=1))[:steps]
    return {
        "replica": layout.replica,
        "train": [(x.clone(), y.clone()) for x, y in out],
        "val": [(x.clone(), y.clone()) for x, y in val],
        "num_images": val.num_images,
    }


def _reference(root: Path, batch: int, steps: int):
    cfg = config(root, lighting_std=0.1, mean="channel")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train = data.build_train_loader(cfg, single_process_layout(), batch, seed=7)
        val = data.build_eval_loader(cfg, single_process_layout(), 4, patches="ten")
    return list(train.epoch(1, start_step=1))[:steps], list(val)


def test_two_towers_get_identical_batches_equal_to_one_process(tree):
    # b = 5 over 2 towers: shares of 3 and 2; the last validation batch (1 image) leaves
    # tower 1 an empty share.
    ranks = run_ranks(_rank_batches, 2, str(tree), 2, 5, 3)
    ref_train, ref_val = _reference(tree, 5, 3)
    assert len(ranks[0]["train"]) == 3
    for r in ranks:
        assert r["num_images"] == 9
        for (x, y), (rx, ry) in zip(r["train"], ref_train):
            assert torch.equal(x, rx) and torch.equal(y, ry)
        assert len(r["val"]) == len(ref_val) == 3
        for (x, y), (rx, ry) in zip(r["val"], ref_val):
            assert torch.equal(x, rx) and torch.equal(y, ry)


def test_two_replicas_read_disjoint_shards_covering_the_set(tree):
    ranks = run_ranks(_rank_batches, 2, str(tree), 1, 4, 3)
    assert [r["replica"] for r in ranks] == [0, 1]
    ref_train, _ = _reference(tree, 8, 3)  # global batch 2 x 4
    for step, (rx, ry) in enumerate(ref_train):
        (x0, y0), (x1, y1) = ranks[0]["train"][step], ranks[1]["train"][step]
        assert torch.equal(torch.cat([x0, x1]), rx) and torch.equal(torch.cat([y0, y1]), ry)
        assert not torch.equal(x0, x1)
    assert [r["num_images"] for r in ranks] == [4, 5]
    _, ref_val = _reference(tree, 4, 0)
    both = [t for r in ranks for t in r["val"]]
    assert torch.equal(torch.cat([x for x, _ in both]), torch.cat([x for x, _ in ref_val]))
    assert torch.equal(torch.cat([y for _, y in both]), torch.cat([y for _, y in ref_val]))


def test_four_ranks_are_two_replicas_of_two_identical_towers(tree):
    ranks = run_ranks(_rank_batches, 4, str(tree), 2, 3, 2)  # b = 3: tower shares 2 and 1
    assert [r["replica"] for r in ranks] == [0, 0, 1, 1]
    ref_train, ref_val = _reference(tree, 6, 2)
    for step, (rx, ry) in enumerate(ref_train):
        x = [r["train"][step][0] for r in ranks]
        y = [r["train"][step][1] for r in ranks]
        assert torch.equal(x[0], x[1]) and torch.equal(x[2], x[3])  # towers agree
        assert torch.equal(y[0], y[1]) and torch.equal(y[2], y[3])
        assert torch.equal(torch.cat([x[0], x[2]]), rx) and torch.equal(torch.cat([y[0], y[2]]), ry)
    val = [t for r in (ranks[0], ranks[2]) for t in r["val"]]
    assert torch.equal(torch.cat([x for x, _ in val]), torch.cat([x for x, _ in ref_val]))
    assert all(
        torch.equal(a[0], b[0])
        for i in (0, 2)
        for a, b in zip(ranks[i]["val"], ranks[i + 1]["val"])
    )


# -- ImageNet's flat validation folder --------------------------------------------------------


def flat_val(root: Path) -> list[str]:
    """Move val/<class>/* to a flat val/ and return (file name, class) in sorted name order."""
    names = []
    for cls_dir in sorted((root / "val").iterdir()):
        for f in sorted(cls_dir.iterdir()):
            target = root / "val" / f"ILSVRC_{f.name}"
            f.rename(target)
            names.append((target.name, cls_dir.name))
        cls_dir.rmdir()
    return sorted(names)


def test_flat_validation_with_both_label_formats(tmp_path):
    root = make_tree(tmp_path / "d")
    names = flat_val(root)
    (root / "ints.txt").write_text("".join(f"{CLASSES.index(c) + 1}\n" for _, c in names))
    (root / "pairs.txt").write_text("".join(f"{n} {c}\n" for n, c in reversed(names)))
    want = [CLASSES.index(c) for _, c in names]
    for labels_file in ("ints.txt", str(root / "pairs.txt")):
        cfg = config(root, source="imagenet", val_labels=labels_file)
        val = data.build_eval_loader(cfg, single_process_layout(), 4)
        got = [lab for _, labels in val for lab in labels.tolist()]
        assert got == want
        assert class_of(torch.cat([x for x, _ in val])) == want


def test_flat_validation_label_errors(tmp_path):
    root = make_tree(tmp_path / "d")
    names = flat_val(root)
    layout = single_process_layout()
    (root / "short.txt").write_text("1\n2\n")
    with pytest.raises(data.DataError, match="short.txt has 2 labels but .* holds 9 images"):
        data.build_eval_loader(config(root, source="imagenet", val_labels="short.txt"), layout, 4)
    (root / "unknown.txt").write_text("".join(f"{n} dog\n" for n, _ in names))
    with pytest.raises(data.DataError, match="unknown.txt line 1"):
        data.build_eval_loader(config(root, source="imagenet", val_labels="unknown.txt"), layout, 4)
    with pytest.raises(data.DataError, match="set data.val_labels"):
        data.build_eval_loader(config(root, source="imagenet"), layout, 4)


def test_ilsvrc_ids_map_through_the_devkit(tmp_path):
    from scipy.io import savemat

    root = tmp_path / "d"
    for wnid in ("n01440764", "n02119789"):
        (root / "train" / wnid).mkdir(parents=True)
        write_image(root / "train" / wnid / "a.jpg", 0, np.random.default_rng(0))
    (root / "val").mkdir()
    for i in range(3):
        write_image(root / "val" / f"v{i}.JPEG", 1, np.random.default_rng(i))
    # ILSVRC2012 id 1 is n02119789, which sorts after n01440764.
    (root / "gt.txt").write_text("1\n2\n1\n")
    cfg = config(root, source="imagenet", val_labels="gt.txt")
    with pytest.raises(data.DataError, match="meta.mat"):
        data.build_eval_loader(cfg, single_process_layout(), 4)
    synsets = np.array(
        [(1, "n02119789"), (2, "n01440764")], dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")]
    )
    savemat(str(root / "meta.mat"), {"synsets": synsets})
    labels = next(iter(data.build_eval_loader(cfg, single_process_layout(), 4)))[1]
    assert labels.tolist() == [1, 0, 1]


# -- bad files and layout errors ----------------------------------------------------------------


def test_bad_files_are_skipped_with_a_warning_naming_each(tmp_path):
    root = make_tree(tmp_path / "d")
    good = root / "train" / "ant" / "ant_00.jpg"
    bad = {
        "truncated": root / "train" / "ant" / "truncated.jpg",
        "text": root / "train" / "moth" / "notes.jpg",
        "empty": root / "train" / "zebra" / "empty.JPG",
    }
    bad["truncated"].write_bytes(good.read_bytes()[:300])
    bad["text"].write_text("not an image\n")
    bad["empty"].write_bytes(b"")
    (root / "train" / "zebra" / "readme.txt").write_text("ignored: not an image name")
    with pytest.warns(UserWarning, match="skipping 3 unreadable") as caught:
        loader = data.build_train_loader(config(root), single_process_layout(), 12, seed=0)
    message = str(caught[0].message)
    for path in bad.values():
        assert str(path) in message
    assert len(loader.images.paths) == 36 and loader.steps_per_epoch == 3
    assert sum(len(y) for _, y in loader.epoch(0)) == 36


def test_layout_errors_name_the_problem(tmp_path):
    layout = single_process_layout()
    with pytest.raises(data.DataError, match=r"train does not exist"):
        data.build_train_loader(config(tmp_path), layout, 4, 0)
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "dog").mkdir()
    write_image(tmp_path / "train" / "cat" / "a.jpg", 0, np.random.default_rng(0))
    with pytest.raises(data.DataError, match=r"class folder .*dog holds no images"):
        data.build_train_loader(config(tmp_path), layout, 1, 0)
    write_image(tmp_path / "train" / "dog" / "a.jpg", 0, np.random.default_rng(0))
    with pytest.raises(data.DataError) as too_few:  # the key and the largest value that fits
        data.build_train_loader(config(tmp_path), layout, 4, 0)
    assert str(too_few.value) == (
        f"{tmp_path}: 2 training images cannot fill one global batch of train.batch_size = 4; "
        "set train.batch_size=2 or lower (a multiple of 2)"
    )
    two_replicas = dataclasses.replace(layout, replicas=2)  # 2 x 2 towers: no batch under 4
    with pytest.raises(
        data.DataError, match="smallest train.batch_size this layout can split is 4"
    ):
        data.build_train_loader(config(tmp_path), two_replicas, 2, 0)
    with pytest.raises(data.DataError, match=r"val does not exist"):
        data.build_eval_loader(config(tmp_path), layout, 4)
    (tmp_path / "val" / "cow").mkdir(parents=True)
    write_image(tmp_path / "val" / "cow" / "a.jpg", 0, np.random.default_rng(0))
    with pytest.raises(data.DataError, match=r"\['cow'\] .* are not training classes"):
        data.build_eval_loader(config(tmp_path), layout, 4)
    with pytest.raises(data.DataError, match="data.mean must be"):
        data.build_train_loader(dataclasses.replace(config(tmp_path), mean="pixel"), layout, 1, 0)
    with pytest.raises(data.DataError, match="decodes on a GPU"):
        data.build_train_loader(config(tmp_path, decode="mixed"), layout, 1, 0)
