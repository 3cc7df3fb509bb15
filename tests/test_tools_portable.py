"""Any checkpoint works on any machine: a GPU run's checkpoint in the tools on a CPU.

A checkpoint whose config says what a GPU run says (`data.decode: mixed`, `train.device:
cuda`, channels_last and compile on) and one identical but for `data.decode: cpu` give the
same evaluation, the same predictions and the same activation picture on this CPU-only
machine; before, the first was refused ("data.decode 'mixed' decodes on a GPU").
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repro.config import Config, DataConfig, ModelConfig, TrainConfig, config_to_dict
from repro.data.stats import STATS_NAME, compute_stats
from repro.net.model import AlexNet
from repro.run.checkpoint import save_checkpoint
from repro.tools import inference, predict, report, visualize

MODEL = ModelConfig(num_classes=2, widths=(4, 4, 4, 4, 4), fc_width=8, image_size=64)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """Two classes of small JPEGs, their stats.npz, and the GPU-run and CPU-run checkpoints."""
    base = tmp_path_factory.mktemp("portable")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog")):
            (base / split / name).mkdir(parents=True)
            for i in range(3):
                img = rng.integers(0, 120, (70, 90, 3)).astype(np.uint8)
                img[..., c] += 100
                Image.fromarray(img).save(base / split / name / f"{i}.jpg", quality=90)
    compute_stats(base, resize=72, progress=False, threads=1)
    model = AlexNet(MODEL, seed=1).eval()
    data = DataConfig(root=str(base), resize=72, crop=64, threads=1)
    train = TrainConfig(device="cuda", channels_last="on", compile="on", batch_size=4)
    paths = {}
    for decode in ("mixed", "cpu"):
        cfg = Config(model=MODEL, data=dataclasses.replace(data, decode=decode), train=train)
        state = {
            "model": model.full_state_dict(),
            "epoch": 1,
            "step": 3,
            "config": config_to_dict(cfg),
            "class_names": ["cat", "dog"],
        }
        paths[decode] = save_checkpoint(base / decode / "checkpoints" / "best.pt", state)
    return {"base": base, **paths}


def test_evaluate_accepts_a_mixed_decode_checkpoint(checkpoints, tmp_path):
    results = {
        decode: report.run(checkpoints[decode], patches="center", batch=4, out=tmp_path / decode,
                           device="cpu")["results"]["center"]
        for decode in ("mixed", "cpu")
    }  # fmt: skip
    assert results["mixed"]["images"] == 6
    assert results["mixed"]["confusion"] == results["cpu"]["confusion"]
    assert results["mixed"]["loss"] == results["cpu"]["loss"]


def test_predict_accepts_a_mixed_decode_checkpoint(checkpoints, capsys):
    image = str(checkpoints["base"] / "val" / "dog" / "0.jpg")
    printed = {}
    for decode in ("mixed", "cpu"):
        unreadable = predict.predict(
            checkpoints[decode], [image], top_k=2, as_json=True, device="cpu", progress=False
        )
        assert unreadable == 0
        printed[decode] = json.loads(capsys.readouterr().out)["predictions"]
    assert printed["mixed"] == printed["cpu"]
    assert sum(printed["mixed"][0]["probabilities"]) == pytest.approx(1.0)


def test_visualize_activations_accepts_a_mixed_decode_checkpoint(checkpoints, tmp_path):
    image = checkpoints["base"] / "val" / "cat" / "1.jpg"
    pictures = {
        decode: visualize.activations(checkpoints[decode], image, tmp_path / f"{decode}.png")
        for decode in ("mixed", "cpu")
    }
    assert Path(pictures["mixed"]).read_bytes() == Path(pictures["cpu"]).read_bytes()


def test_the_loaded_config_decodes_where_this_machine_can(checkpoints):
    _, cfg, names = inference.read_trained(checkpoints["mixed"])
    assert cfg.data.decode == "auto" and names == ["cat", "dog"]
    assert inference.STATS_NAME == STATS_NAME  # one name, imported without DALI
    model, _, _ = inference.load_trained(checkpoints["mixed"], device="cpu")
    assert next(model.parameters()).device == torch.device("cpu")
