"""The data benchmark: repro/bench/data.py through launch/bench.py.

Proves (never asserting speed): `bench.py data` makes its own natural-looking JPEG set (and
with --prepared its 256x256 store), alternates the loaders round by round and writes a JSON
whose figures are consistent (one images/s per round and contender, medians and spreads of
them, per core = median / workers, each ratio the median of the rounds' DALI / DataLoader
pairs, gather bytes = half a batch of uint8 224^2 patches) beside the machine, versions,
git revision and load; --wait reports a data-wait share in (0, 1); `--help` shows examples;
the DataLoader side yields what DALI yields in shape, dtype and value range; every bench
sub-command refuses a count that would crash or be replaced (0 steps, rounds, workers...) at
the command line, a GPU where none is, and an --out it cannot write before measuring; the
made photos may be small.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path
from unittest import mock

import pytest
import torch

from repro.bench import data as bench_data
from repro.data import loaders as data

ROOT = Path(__file__).resolve().parents[1]


def load_launcher():
    spec = importlib.util.spec_from_file_location("bench_launcher", ROOT / "launch" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_data_alternates_and_writes_sane_figures(tmp_path, capsys):
    out = tmp_path / "data.json"
    argv = ["data", "--images", "24", "--size", "120", "90", "--prepared", "--workers", "1"]
    argv += ["--batch", "4"]
    argv += ["--rounds", "2", "--batches", "2", "--out", str(out)]
    argv += [
        "--wait",
        str(ROOT / "configs" / "demo.yaml"),
        "--wait-steps",
        "2",
        "--wait-batch",
        "4",
    ]
    assert load_launcher().main(argv) == 0
    printed = capsys.readouterr().out
    assert "DALI / DataLoader on originals" in printed and "images/s" in printed
    result = json.loads(out.read_text())
    loaders = result["loaders"]
    assert len(loaders) == 4  # DALI and DataLoader, on the originals and on the store
    for r in loaders.values():
        assert len(r["rounds"]) == 2 and all(v > 0 for v in r["rounds"])
        assert r["images_per_s"]["median"] == pytest.approx(statistics.median(r["rounds"]))
        assert r["images_per_s"]["min"] == min(r["rounds"])
        assert r["per_core"] == pytest.approx(r["images_per_s"]["median"] / 1)
        assert len(r["cpu_rounds"]) == 2 and all(v > 0 for v in r["cpu_rounds"])
        assert r["cpu_ms_per_image"]["median"] == pytest.approx(statistics.median(r["cpu_rounds"]))
    for label in ("originals", "256x256 store"):
        dali = loaders[f"DALI, CPU decode | {label}"]["rounds"]
        torch_ = loaders[f"DataLoader, torchvision | {label}"]["rounds"]
        pairs = [a / b for a, b in zip(dali, torch_)]
        ratio = result["ratio_dali_over_dataloader"][label]
        assert ratio["images_per_s"]["median"] == pytest.approx(statistics.median(pairs))
        dali_cpu = loaders[f"DALI, CPU decode | {label}"]["cpu_rounds"]
        torch_cpu = loaders[f"DataLoader, torchvision | {label}"]["cpu_rounds"]
        pairs = [b / a for a, b in zip(dali_cpu, torch_cpu)]
        assert ratio["cpu_per_image"]["median"] == pytest.approx(statistics.median(pairs))
    assert result["gather_bytes_per_rank_step"] == {
        "uint8": 2 * 3 * 224 * 224,
        "float32": 8 * 3 * 224 * 224,
    }
    (wait,) = result["data_wait"]
    assert 0 < wait["wait_share"] < 1 and wait["steps"] == 2
    assert result["settings"]["workers"] == 1 and result["settings"]["prepared"]
    context = result["context"]
    assert context["versions"]["torch"] == torch.__version__
    assert "git_revision" in context and len(context["load_average_end"]) == 3


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit):
        load_launcher().main(["data", "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "python launch/bench.py data --prepared" in text


def test_dataloader_side_does_the_same_work(tmp_path):
    root = bench_data.make_jpegs(tmp_path, images=4, size=(300, 260))
    paths, labels, classes = data.scan_class_folders(root / "train")
    assert len(paths) == 4 and classes == [f"class{i}" for i in range(4)]
    dataset = bench_data.AugmentedFiles(paths, labels, 256, 224, 0.1)
    x, label = dataset[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and label == labels[0]
    assert x.min() < 0 < x.max() and x.abs().max() < 300  # mean-subtracted 0-255 pixels
    assert torch.equal(dataset[1][0], dataset[1][0])  # draws are seeded per sample


def test_dali_side_ignores_the_folders_own_statistics(tmp_path):
    """The demo's folder holds stats.npz for resize 72; the bench decodes at 256 with ImageNet's
    constants (as the DataLoader side does), so that file must not stop it (it raised)."""
    from repro.data.stats import compute_stats

    root = bench_data.make_jpegs(tmp_path, images=4, size=(120, 90))
    compute_stats(root, resize=72, progress=False)  # as the demo writes it
    contender = bench_data.DaliContender(root, workers=1, batch=2)
    with contender.round() as batches:
        images, labels = next(batches)[:2]
    assert tuple(images.shape)[0] == 2 and len(labels) == 2


def test_counts_that_would_crash_or_be_replaced_are_refused_at_the_command_line(capsys, tmp_path):
    """A 0 divided by zero deep in a run, or silently became the default (--rounds 0 -> 3)."""
    for argv, said in (
        (["train", "--tiny", "--layouts", "0"], "argument --layouts: must be >= 1, got 0"),
        (["train", "--tiny", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
        (["train", "--tiny", "--rounds", "0"], "argument --rounds: must be >= 1, got 0"),
        (["infer", "--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
        (["train", "--classes", "1"], "argument --classes: must be >= 2, got 1"),
        (["exchange", "--batch", "0"], "argument --batch: must be >= 1, got 0"),
        (["data", "--workers", "0"], "argument --workers: must be >= 1, got 0"),
        (["data", "--batches", "x"], "argument --batches: expected a whole number, got 'x'"),
    ):
        with pytest.raises(SystemExit) as exit:
            load_launcher().main(argv)
        assert exit.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(said), argv
    # A GPU asked for where none is: one line (exchange took it and measured on the CPU).
    with mock.patch.object(torch.cuda, "is_available", lambda: False):
        assert load_launcher().main(["exchange", "--tiny", "--device", "cuda"]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert said == ["bench: error: --device cuda but no CUDA GPU is visible"], said
    # Too few made images for one batch: named by the bench's options, not train.batch_size.
    assert load_launcher().main(["data", "--images", "16", "--out", str(tmp_path / "d.json")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "bench: error: --images 16 cannot fill one --batch 64: give --images 64 or more, "
        "or --batch 16 or less"
    ]
    # An --out that cannot be written is named before the benchmark runs, not after it.
    (tmp_path / "afile").write_text("")
    for out, message in (
        (tmp_path, f"--out {tmp_path} is a folder: name a JSON file"),
        (tmp_path / "afile" / "x.json", f"its folder {tmp_path / 'afile'} exists and is not a"),
    ):
        with mock.patch.object(bench_data, "run", side_effect=AssertionError("measured")):
            assert load_launcher().main(["data", "--out", str(out)]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("bench: error: ") and message in line, line
    # Photos narrower than 40 px drew their ellipses' radius from an empty range.
    root = bench_data.make_jpegs(tmp_path, images=2, size=(10, 10))
    assert len(list((root / "train").rglob("*.jpg"))) == 2
