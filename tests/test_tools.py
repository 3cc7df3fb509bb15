"""The tools around the net: launch/evaluate.py, launch/predict.py, launch/visualize.py.

Each command runs as a user runs it (a subprocess from the repo root) on a class-folder JPEG
tree made here (3 classes, each bright in its own colour channel; faint validation images so
the net makes some mistakes) and a checkpoint of a tiny two-tower net trained a few steps on
it, saved in the format train.py writes. Proves:

- evaluate's centre-patch confusion matrix (hence top-1) is what the test gets by running the
  model on the eval loader's batches and counting; its 10-patch one is what the test gets by
  cutting the 10 views of §4.1 itself from the mean-subtracted square and averaging their
  softmax; two ranks under torchrun give the same numbers as one process;
- predict's probabilities sum to 1, equal the model's softmax on the eval loader's centre
  patch of the same image (and, with --patches ten, the mean over the test's own 10 views),
  and unreadable files are named on stderr, skipped, and make the exit code 1;
- every PNG is written at its documented pixel size; the kernel picture is exactly
  repro.run.plots.kernel_grid of conv1 and the colour-specificity score matches its definition;
- each bad input ends the command with exit code 2 and one line saying why (predict given
  only paths that do not exist too); --device cuda without a GPU is refused naming --device;
  visualize's --out must name a .png (a folder or another ending is refused, nothing written)
  and its line names the file written.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from repro.config import (
    Config,
    DataConfig,
    ModelConfig,
    TrainConfig,
    config_to_dict,
)
from repro.data import pipelines
from repro.data.loaders import build_eval_loader, build_train_loader
from repro.data.stats import compute_stats
from repro.net.dist import LayoutError, single_process_layout
from repro.net.model import AlexNet
from repro.run.checkpoint import FORMAT_VERSION, save_checkpoint
from repro.run.plots import KERNEL_SCALE, figure3_block_origin, kernel_grid
from repro.tools import report
from repro.tools.inference import OutputError
from repro.tools.predict import PLOT_DPI, PLOT_SIZE, patch_picture, predict
from repro.tools.report import figure_inches
from repro.tools.visualize import DPI, activation_figsize, colour_specificity

ROOT = Path(__file__).resolve().parents[1]

COLOURS = {"ant": 0, "moth": 1, "zebra": 2}  # the RGB channel each class is bright in
CLASSES = sorted(COLOURS)
N_TRAIN, N_VAL = 8, 6  # per class
RESIZE, CROP = 72, 64  # the net's smallest input is 64; 72 - 64 = 8 is even, so centre = 4
# fp32 on the CPU on any machine: the test's own numbers are fp32 CPU ones (a GPU run is bf16).
CPU_BATCH_4 = ("--device", "cpu", "--batch", "4")


def make_tree(root: Path, classes: dict[str, int], seed: int = 0) -> Path:
    """root/{train,val}/<class>/*.jpg, 80 x 96: noise plus the class's channel lifted."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        for name, channel in classes.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 120, (80, 96, 3)).astype(np.uint8)
                # Validation images are faint (lift 0..59), so the net gets some of them wrong.
                img[..., channel] += 100 if split == "train" else int(rng.integers(0, 60))
                Image.fromarray(img).save(root / split / name / f"{name}_{i}.jpg", quality=90)
    return root


def tiny_config(root: Path) -> Config:
    # Wider init and no dropout so a dozen steps give a net that is right most of the time.
    model = ModelConfig(
        num_classes=3,
        widths=(8, 8, 8, 8, 8),
        fc_width=16,
        image_size=CROP,
        init_std=0.1,
        conv345_init_std=0.1,
        bias_one=0.1,
        dropout=0.0,
    )
    data = DataConfig(root=str(root), resize=RESIZE, crop=CROP, threads=1, lighting_std=0.0)
    return Config(model=model, data=data, train=TrainConfig(batch_size=8, compile="off"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """The data tree, its stats.npz, a trained checkpoint, and the odd files the errors need."""
    base = tmp_path_factory.mktemp("tools")
    root = make_tree(base / "data", COLOURS)
    compute_stats(root, resize=RESIZE, progress=False, threads=1)  # the run's mean image (§2)
    cfg = tiny_config(root)
    torch.manual_seed(0)
    model = AlexNet(cfg.model, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = build_train_loader(cfg.data, single_process_layout(), 8, seed=0)
    for epoch in range(3):
        for images, labels in loader.epoch(epoch):
            loss = F.cross_entropy(model(images), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    ckpt = save_checkpoint(
        base / "run" / "checkpoints" / "best.pt",
        {
            "format_version": FORMAT_VERSION,
            "model": model.full_state_dict(),
            "config": config_to_dict(cfg),
            "class_names": CLASSES,
            "epoch": 3,
            "step": 9,
        },
    )
    (base / "bad.jpg").write_text("<html>not found</html>")
    (base / "not_a_checkpoint.pt").write_text("hello")
    (base / "a_file").write_text("")
    make_tree(base / "two", {"ant": 0, "moth": 1})
    rows = [{"step": s, "epoch": s // 3, "loss": 1.1 - s / 20, "lr": 0.01} for s in range(1, 10)]
    rows += [{"step": 9, "epoch": 3, "top1_error": 30.0, "top5_error": 0.0}]
    (base / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"base": base, "root": root, "cfg": cfg, "model": model, "ckpt": ckpt}


def cli(tool: str, *args, torchrun: bool = False) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [sys.executable, *(launcher if torchrun else []), f"launch/{tool}.py", *args]
    return subprocess.run(
        list(map(str, command)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def png_size(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as im:
        return im.size


def centre_batches(setup) -> list[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """(images, labels, paths) of the eval loader's centre-patch batches over val/."""
    loader = build_eval_loader(setup["cfg"].data, single_process_layout(), 5, "center")
    out, start = [], 0
    for images, labels in loader:
        out.append((images, labels, loader.images.paths[start : start + len(labels)]))
        start += len(labels)
    return out


def ten_views(setup, paths: list[str]) -> torch.Tensor:
    """(n, 10, 3, crop, crop) built here: the §4.1 patches of the mean-subtracted square.

    The square is DALI's (decode, shorter side to RESIZE, central square: the tested
    loader's own first stage); the corners, centre and mirrors are cut by hand.
    """
    runner = pipelines.FedPipeline(
        pipelines.square_pipeline,
        dict(decode="cpu", resize=RESIZE),
        len(paths),
        1,
        torch.device("cpu"),
        gpu=False,
    )
    (squares,) = list(runner.run([({}, paths)]))  # (n, R, R, 3) uint8
    with np.load(setup["root"] / "stats.npz") as z:
        mean = torch.from_numpy(z["mean_image"])  # (R, R, 3) float32, the run's mean (§2)
    x = (squares.float() - mean).permute(0, 3, 1, 2)  # (n, 3, R, R)
    s, c = RESIZE - CROP, CROP
    patches = [x[..., y : y + c, x0 : x0 + c] for x0, y in ((0, 0), (s, 0), (0, s), (s, s))]
    patches.append(x[..., s // 2 : s // 2 + c, s // 2 : s // 2 + c])
    patches += [p.flip(-1) for p in patches]
    return torch.stack(patches, dim=1)


def confusion(true: list[int], predicted: list[int]) -> list[list[int]]:
    m = np.zeros((3, 3), np.int64)
    for t, p in zip(true, predicted):
        m[t, p] += 1
    return m.tolist()


@pytest.fixture(scope="module")
def evaluated(setup) -> dict:
    """One process, both patch schemes, into a chosen folder."""
    result = cli("evaluate", setup["ckpt"], "--out", setup["base"] / "eval1", *CPU_BATCH_4)
    assert result.returncode == 0, result.stderr
    report = json.loads((setup["base"] / "eval1" / "eval.json").read_text())
    return {"stdout": result.stdout, "report": report}


def test_evaluate_centre_patch_equals_counting_directly(setup, evaluated):
    model = setup["model"]
    true, predicted, nll = [], [], 0.0
    with torch.no_grad():
        for images, labels, _ in centre_batches(setup):
            logits = model(images)
            predicted += logits.argmax(dim=1).tolist()
            true += labels.tolist()
            nll += F.cross_entropy(logits, labels, reduction="sum").item()
    got = evaluated["report"]["results"]["center"]
    assert got["images"] == len(true) == 3 * N_VAL
    assert got["confusion"] == confusion(true, predicted)
    wrong = sum(t != p for t, p in zip(true, predicted))
    assert 0 < wrong < len(true), "the test net should be neither perfect nor useless"
    assert got["top1_error"] == pytest.approx(100 * wrong / len(true))
    per_class = [np.mean([p == c for t, p in zip(true, predicted) if t == c]) for c in range(3)]
    assert got["per_class_accuracy"] == pytest.approx(per_class)
    assert got["loss"] == pytest.approx(nll / len(true), rel=1e-5)
    assert f"{got['top1_error']:.2f}%" in evaluated["stdout"]  # the printed table


def test_evaluate_ten_patches_average_the_softmax_of_ten_views(setup, evaluated):
    model = setup["model"]
    val = sorted(str(p) for p in (setup["root"] / "val").glob("*/*.jpg"))
    true = [CLASSES.index(Path(p).parent.name) for p in val]
    views = ten_views(setup, val)  # (18, 10, 3, 64, 64)
    with torch.no_grad():
        probs = model(views.flatten(0, 1)).softmax(dim=1).view(len(val), 10, 3).mean(dim=1)
    got = evaluated["report"]["results"]["ten"]
    assert got["images"] == len(val)
    assert got["confusion"] == confusion(true, probs.argmax(dim=1).tolist())
    # The loss is -log of the averaged probability of the true class: it pins the average
    # down to these ten views (one view, or nine, would give another number).
    nll = -probs[torch.arange(len(val)), true].log().mean().item()
    assert got["loss"] == pytest.approx(nll, rel=1e-5)
    with torch.no_grad():
        centre = model(views[:, 4]).softmax(dim=1)[torch.arange(len(val)), true]
    assert abs(-centre.log().mean().item() - nll) > 1e-3  # the centre view alone differs


def test_evaluate_writes_confusion_pngs_at_their_size(setup, evaluated):
    side = round(figure_inches(3) * 100)
    for scheme in ("center", "ten"):
        png = Path(evaluated["report"]["results"][scheme]["confusion_png"])
        assert png.parent == setup["base"] / "eval1"
        assert png_size(png) == (side, side)


def test_evaluate_on_two_ranks_matches_one_process(setup, evaluated):
    out = setup["base"] / "eval2"
    result = cli("evaluate", setup["ckpt"], "--out", out, *CPU_BATCH_4, torchrun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    assert report["world_size"] == 2
    one = evaluated["report"]["results"]
    for scheme in ("center", "ten"):
        for key in ("images", "top1_error", "top5_error", "per_class_accuracy", "confusion"):
            assert report["results"][scheme][key] == one[scheme][key], key  # counts: exact
        assert report["results"][scheme]["loss"] == pytest.approx(one[scheme]["loss"])


def test_predict_probabilities_unreadable_files_and_plots(setup):
    base, model = setup["base"], setup["model"]
    bad, missing = base / "bad.jpg", base / "missing.jpg"
    plots = base / "plots"
    result = cli(
        "predict", setup["ckpt"], setup["root"] / "val", bad, missing,
        "--top-k", "3", "--json", "--plot", plots, "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr  # some inputs were unreadable
    skipped = [ln for ln in result.stderr.splitlines() if ln.startswith("predict: skipped")]
    assert skipped == [
        f"predict: skipped {bad}: not an image DALI decodes (starts like b'<htm')",
        f"predict: skipped {missing}: no such file",
    ]
    out = json.loads(result.stdout)
    by_path = {p["path"]: p for p in out["predictions"]}
    assert len(by_path) == 3 * N_VAL and out["unreadable"] == [str(bad), str(missing)]
    with torch.no_grad():
        for images, _, paths in centre_batches(setup):
            probs = model(images).softmax(dim=1)
            for path, p in zip(paths, probs):
                got = by_path[path]
                assert sum(got["probabilities"]) == pytest.approx(1.0, abs=1e-5)
                assert got["indices"][0] == int(p.argmax())
                assert got["classes"][0] == CLASSES[int(p.argmax())]
                assert got["probabilities"] == pytest.approx(p[got["indices"]].tolist(), abs=1e-5)
    for path in by_path:
        assert png_size(plots / f"{Path(path).stem}.png") == (
            round(PLOT_SIZE[0] * PLOT_DPI),
            round(PLOT_SIZE[1] * PLOT_DPI),
        )
    assert f"wrote {len(by_path)} plot(s) to {plots}/" in result.stderr  # stdout is the JSON


def test_predict_ten_patches_and_table(setup):
    image = str(setup["root"] / "val" / "moth" / "moth_3.jpg")
    ten = ("predict", setup["ckpt"], image, "--patches", "ten", "--json", "--top-k", "2")
    plain = ("predict", setup["ckpt"], image)
    with ThreadPoolExecutor(2) as pool:  # both at once: each is mostly start-up
        result, table = pool.map(lambda a: cli(*a, "--device", "cpu"), (ten, plain))
    assert result.returncode == 0, result.stderr
    (got,) = json.loads(result.stdout)["predictions"]
    with torch.no_grad():
        probs = setup["model"](ten_views(setup, [image])[0]).softmax(dim=1).mean(dim=0)
    top = probs.topk(2)
    assert got["indices"] == top.indices.tolist()
    assert got["probabilities"] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert table.returncode == 0 and table.stdout.splitlines()[0] == image
    assert len(table.stdout.splitlines()) == 1 + 3  # top-5 of 3 classes shows all 3


def test_predict_plot_shows_the_patches_the_net_saw():
    """One patch as it is; the 10 patches of §4.1 as 2 rows of 5 (mirrors below), 2 px apart."""
    views = torch.arange(10.0).view(10, 1, 1, 1).expand(10, 3, 4, 4) * 20  # view i: grey 20*i
    one = patch_picture(views[:1])
    assert one.shape == (4, 4, 3) and (one == 0).all()
    ten = patch_picture(views)
    assert ten.shape == (2 * 4 + 2, 5 * 4 + 4 * 2, 3)
    for i in range(10):
        r, k = divmod(i, 5)
        assert (ten[r * 6 : r * 6 + 4, k * 6 : k * 6 + 4] == 20 * i).all(), i
    assert (ten[4:6] == 255).all() and (ten[:, 4:6] == 255).all()  # white gaps


def test_colour_specificity_definition():
    k = torch.randn(1, 1, 11, 11)
    grey = k.expand(1, 3, 11, 11)  # the same in R, G, B: luminance only
    opponent = torch.cat([k, -k, torch.zeros_like(k)], dim=1)  # red minus green
    single = torch.cat([k, torch.zeros_like(k), torch.zeros_like(k)], dim=1)
    scores = colour_specificity(torch.cat([grey, opponent, single, torch.zeros(1, 3, 11, 11)]))
    assert scores.tolist() == pytest.approx([0.0, 1.0, 2 / 3, 0.0])


def test_visualize_kernels_png_and_score(setup):
    out = setup["base"] / "figs" / "k.png"
    result = cli("visualize", "kernels", setup["ckpt"], "--out", out)
    assert result.returncode == 0, result.stderr
    conv1 = setup["model"].grouped_state_dict()["conv1.weight"]  # (16, 3, 11, 11)
    with Image.open(out) as im:
        picture = np.asarray(im.convert("RGB"))
    for tower in (0, 1):  # Figure 3: each tower's block is exactly kernel_grid of its kernels
        block = kernel_grid(conv1[8 * tower : 8 * (tower + 1)], 1, scale=KERNEL_SCALE)
        (h, w), (left, top) = block.shape[:2], figure3_block_origin(tower, block.shape[0])
        assert np.array_equal(picture[top : top + h, left : left + w], block), tower
        # a label above the block and the score under it: dark text pixels in both strips
        assert (picture[top - 20 : top - 2, left : left + w] < 100).any(axis=2).sum() > 50
        assert (picture[top + h + 4 : top + h + 22, left : left + w] < 100).any(axis=2).sum() > 50
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["step"] == 9 and f"{out}" in result.stdout
    u = np.ones(3) / np.sqrt(3)  # the grey direction
    for tower in (0, 1):
        w = conv1[8 * tower : 8 * (tower + 1)].double().numpy()  # (8, 3, 11, 11)
        along = np.einsum("nchw,c->nhw", w, u)  # each pixel's RGB projected on grey
        ratio = (along**2).sum(axis=(1, 2)) / (w**2).sum(axis=(1, 2, 3))
        row = report["towers"][tower]
        assert row["per_kernel"] == pytest.approx(1 - ratio, abs=1e-5)
        assert row["colour_specificity"] == pytest.approx(np.mean(1 - ratio))
        assert f"tower {tower}: colour specificity {np.mean(1 - ratio):.3f}" in result.stdout


def test_visualize_activations_and_curves_default_paths(setup):
    image = setup["root"] / "val" / "zebra" / "zebra_0.jpg"
    run_dir = setup["base"] / "run"
    with ThreadPoolExecutor(2) as pool:  # both at once: each is mostly start-up
        result, curves = pool.map(
            lambda a: cli("visualize", *a),
            (("activations", setup["ckpt"], image), ("curves", run_dir)),
        )
    assert result.returncode == 0, result.stderr
    png = setup["ckpt"].parent / "best_activations_zebra_0.png"  # beside the checkpoint
    w, h = activation_figsize(2)
    assert png_size(png) == (round(w * DPI), round(h * DPI))
    with Image.open(png) as im:
        assert np.asarray(im.convert("L")).std() > 10  # maps drawn, not a blank canvas
    assert curves.returncode == 0, curves.stderr
    assert png_size(run_dir / "curves.png") == (800, 900)


def test_help_of_every_command_has_an_example():
    for args in (["evaluate"], ["predict"], ["visualize"], ["visualize", "kernels"]):
        tool, *sub = args
        result = subprocess.run(
            [sys.executable, f"launch/{tool}.py", *sub, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0 and f"python launch/{tool}.py" in result.stdout


def test_bad_inputs_exit_2_with_one_line(setup):
    base, ckpt = setup["base"], setup["ckpt"]
    truncated = base / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[:3000])
    shutil.copy(setup["root"] / "stats.npz", base / "two" / "stats.npz")
    cases = [
        (("evaluate", base / "nope.pt"), "no such checkpoint file"),
        (("predict", base / "not_a_checkpoint.pt", base / "bad.jpg"), "not a torch checkpoint"),
        (("visualize", "kernels", truncated), "truncated or corrupt"),
        (
            ("evaluate", ckpt, "--data-root", base / "two"),
            f"{ckpt} was trained for 3 classes but {base / 'two' / 'train'} has 2",
        ),
        (("evaluate", ckpt, "--out", base / "a_file" / "x"), "cannot write to output folder"),
        (("predict", ckpt, base / "bad.jpg", "--plot", base / "a_file"), "cannot write"),
        (("visualize", "activations", ckpt, base / "bad.jpg"), "cannot read image"),
        (("visualize", "curves", base / "two"), "metrics.jsonl does not exist"),
    ]
    with ThreadPoolExecutor(2) as pool:  # two at a time: each is mostly interpreter start-up
        results = list(pool.map(lambda case: cli(*case[0]), cases))
    for (args, message), result in zip(cases, results):
        tool = args[0]
        lines = [ln for ln in result.stderr.splitlines() if ln.startswith(f"{tool}: ")]
        assert result.returncode == 2, (args, result.stderr)
        assert len(lines) == 1 and lines[0].startswith(f"{tool}: error: "), result.stderr
        assert message in lines[0], (message, lines[0])


def test_device_cuda_without_a_gpu_names_the_option_given(setup, monkeypatch):
    """Not training's train.device, which the layout's own refusal names: --device, and its
    valid values."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    image = str(setup["root"] / "val" / "moth" / "moth_3.jpg")
    for call in (
        lambda: report.run(setup["ckpt"], device="cuda"),
        lambda: predict(setup["ckpt"], [image], device="cuda"),
    ):
        with pytest.raises(LayoutError) as refused:
            call()
        assert str(refused.value) == (
            "--device cuda was given but no CUDA GPU is visible; use --device auto (the GPU "
            "where there is one, else the CPU) or --device cpu"
        )


def test_predict_of_only_missing_paths_is_one_line_and_exit_2(setup, monkeypatch, capsys):
    """Nothing named exists, so nothing to predict: a bad input, like an empty folder (one
    missing among others is skipped with exit 1: test_predict_probabilities_...)."""
    missing = setup["base"] / "missing.jpg"
    monkeypatch.setattr(sys, "argv", ["predict", str(setup["ckpt"]), str(missing)])
    assert runpy.run_path(str(ROOT / "launch" / "predict.py"))["main"]() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"predict: error: no such image file or folder: {missing}"]


def test_visualize_out_must_name_a_png_and_the_line_names_the_file_written(setup, tmp_path, capsys):
    """A folder, or a name without .png, was written beside itself as NAME.png while the line
    named NAME (or matplotlib refused another ending with a traceback)."""
    from repro.tools import visualize

    (tmp_path / "afile").write_text("")
    for out, message in (
        (tmp_path, "is a folder: name a PNG file in it"),
        (tmp_path / "afile", "name a .png file"),
        (tmp_path / "k.txt", "name a .png file"),
    ):
        with pytest.raises(OutputError, match=message):
            visualize.kernels(setup["ckpt"], out=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing written
    capsys.readouterr()
    visualize.kernels(setup["ckpt"], out=tmp_path / "k.PNG")
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"wrote {tmp_path / 'k.PNG'} and {tmp_path / 'k.json'}"
    )
    assert (tmp_path / "k.PNG").stat().st_size > 0
