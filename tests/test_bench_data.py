"""The data benchmark: repro/bench/data.py through launch/bench.py.

Proves (never asserting speed): `bench.py data` makes its own JPEG set, times both loaders
over the requested batches and writes a JSON whose figures are consistent (images = timed
batches x batch, images/s = images / seconds, ratio = DALI / DataLoader) beside the
machine, versions and git revision; the DataLoader side yields what DALI yields in shape,
dtype and value range.
"""

from __future__ import annotations

import importlib.util
import json
from importlib.metadata import version
from pathlib import Path

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


def test_bench_data_writes_sane_figures(tmp_path, capsys):
    out = tmp_path / "data.json"
    argv = ["data", "--images", "24", "--size", "120", "90", "--workers", "1", "--batch", "4"]
    assert (
        load_launcher().main([*argv, "--batches", "3", "--seconds", "60", "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "DALI / DataLoader" in printed and "images/s" in printed
    result = json.loads(out.read_text())
    for side in ("dali", "dataloader"):
        r = result[side]
        assert r["images"] == 3 * 4
        assert r["seconds"] > 0
        assert r["images_per_s"] == pytest.approx(r["images"] / r["seconds"])
    assert result["ratio"] == pytest.approx(
        result["dali"]["images_per_s"] / result["dataloader"]["images_per_s"]
    )
    assert result["dataloader"]["implementation"] == "torchvision"
    assert result["settings"]["workers"] == 1 and result["settings"]["batch"] == 4
    assert result["machine"]["cpu_count"] >= 1 and result["machine"]["platform"]
    assert result["versions"]["torch"] == version("torch")
    assert "git_revision" in result


def test_dataloader_side_does_the_same_work(tmp_path):
    root = bench_data.make_jpegs(tmp_path, images=4, size=(300, 260))
    paths, labels, classes = data.scan_class_folders(root / "train")
    assert len(paths) == 4 and classes == [f"class{i}" for i in range(4)]
    dataset = bench_data.AugmentedFiles(paths, labels, 256, 224, 0.1)
    x, label = dataset[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and label == labels[0]
    assert x.min() < 0 < x.max() and x.abs().max() < 300  # mean-subtracted 0-255 pixels
    assert torch.equal(dataset[1][0], dataset[1][0])  # draws are seeded per sample
