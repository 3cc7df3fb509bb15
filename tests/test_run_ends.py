"""How a one-process run ends, trained in this process on a tiny synthetic run (2 steps an epoch).

Proves: a run asked to stop by Ctrl-C saves last.pt and ends the command with exit code 130,
not 0 as a finished run does.
"""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from repro import cli
from repro.config import Config, DataConfig, ModelConfig, TrainConfig, WandbConfig
from repro.net.dist import single_process_layout
from repro.run import train
from repro.run.checkpoint import load_checkpoint
from repro.run.tracking import MetricsFile

TINY = ModelConfig(widths=(8, 12, 16, 16, 12), fc_width=32, image_size=67, num_classes=4)


def tiny(run_dir: Path, **options) -> Config:
    """Two steps of 2 synthetic images an epoch, on the CPU, each step logged."""
    steps = TrainConfig(
        batch_size=2, epochs=1, log_every=1, run_dir=str(run_dir), device="cpu",
        precision="fp32", compile="off", deterministic=False,
    )  # fmt: skip
    return Config(
        model=TINY,
        data=DataConfig(source="synthetic", crop=67, synthetic_images=4),
        train=replace(steps, **options),
        wandb=WandbConfig(mode="disabled"),
    )


@pytest.fixture
def command():
    """`command(cfg)`: what launch/train.py does with cfg, in this process; its exit code.

    The SIGINT/SIGTERM handlers the run installs are put back afterwards.
    """
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    layout = single_process_layout(TINY.towers, torch.device("cpu"))

    def command(cfg: Config) -> int:
        def run() -> int:  # as launch/train.py's
            train.train(cfg, layout)
            return 0

        return cli.run("train", run)

    yield command
    for s, handler in handlers.items():
        signal.signal(s, handler)


def test_a_run_stopped_by_ctrl_c_saves_and_exits_130(command, monkeypatch, tmp_path, capsys):
    class CtrlC(MetricsFile):
        def log(self, metrics, step):  # the user presses Ctrl-C as the first row is written
            super().log(metrics, step)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train, "make_tracker", lambda cfg, run_dir, *a, **k: CtrlC(run_dir))
    assert command(tiny(tmp_path, epochs=3)) == 130
    said = capsys.readouterr().out
    assert f"repro: stop requested; checkpoint {tmp_path}/checkpoints/last.pt" in said
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 2
