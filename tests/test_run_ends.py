"""How a one-process run ends, trained in this process on a tiny synthetic run (2 steps an epoch).

Proves: the rows logged at one step (training, validation, 10-patch) name the same epoch,
counted from 1; a finished run resumed says so in one line, exits 0, adds no row and compiles
nothing; a run asked to stop by Ctrl-C saves last.pt and ends the command with exit code 130,
not 0 as a finished run does; a run stopped during the validation of its last step
(train.max_steps) repeats that validation on resume, without torch's lr_scheduler warning;
resuming mid-epoch with another batch size or seed is refused in one line (at an epoch's end
it is taken), a net that does not fit the checkpoint is named by its differing settings, and
a resume target that does not exist names what is valid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from repro import cli
from repro.config import (
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    WandbConfig,
)
from repro.net.dist import single_process_layout
from repro.run import train
from repro.run.checkpoint import load_checkpoint
from repro.run.tracking import TEN_TOP1, MetricsFile

TINY = ModelConfig(widths=(8, 12, 16, 16, 12), fc_width=32, image_size=67, num_classes=4)


def tiny(run_dir: Path, optim: OptimConfig | None = None, **options) -> Config:
    """Two steps of 2 synthetic images an epoch, on the CPU, each step logged."""
    steps = TrainConfig(
        batch_size=2, epochs=1, log_every=1, run_dir=str(run_dir), device="cpu",
        precision="fp32", compile="off", deterministic=False,
    )  # fmt: skip
    return Config(
        model=TINY,
        data=DataConfig(source="synthetic", crop=67, synthetic_images=4),
        train=replace(steps, **options),
        optim=optim or OptimConfig(),
        wandb=WandbConfig(mode="disabled"),
    )


def command(cfg: Config) -> int:
    """What launch/train.py does with cfg, in this process: its exit code. The SIGINT and
    SIGTERM handlers the run installs are put back afterwards."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def run() -> int:  # as launch/train.py's
        train.train(cfg, single_process_layout(TINY.towers, torch.device("cpu")))
        return 0

    try:
        return cli.run("train", run)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A run folder of 2 epochs (4 steps), each validated, and the final 10-patch evaluation."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert command(tiny(run_dir, epochs=2, final_ten_patch=True)) == 0
    return run_dir


def test_the_rows_of_one_step_name_one_epoch_counted_from_1(finished):
    """The training row at an epoch's last step and that epoch's evaluation say the same epoch."""
    epochs = {}
    for row in rows(finished):
        epochs.setdefault(row["step"], set()).add(row["epoch"])
    assert epochs == {1: {1}, 2: {1}, 3: {2}, 4: {2}}


def test_resuming_a_finished_run_says_so_and_adds_no_row(finished, tmp_path, capsys, monkeypatch):
    """...and compiles nothing first (train.compile=on: on a GPU that is a minute)."""

    def compile_model(*args, **kwargs):
        raise AssertionError("a complete run was compiled")

    monkeypatch.setattr(train.kernels, "compile_model", compile_model)
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    before = (run_dir / "metrics.jsonl").read_text()
    resumed = tiny(run_dir, epochs=2, final_ten_patch=True, resume="latest", compile="on")
    assert command(resumed) == 0
    assert (run_dir / "metrics.jsonl").read_text() == before  # no second 10-patch row
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"repro: the run in {run_dir} is already complete at step 4 "
        "(2 full epoch(s), train.epochs reached); raise train.epochs to train on"
    )


def test_a_run_stopped_by_ctrl_c_saves_and_exits_130(monkeypatch, tmp_path, capsys):
    class CtrlC(MetricsFile):
        def log(self, metrics, step):  # the user presses Ctrl-C as the first row is written
            super().log(metrics, step)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train, "make_tracker", lambda cfg, run_dir, *a, **k: CtrlC(run_dir))
    assert command(tiny(tmp_path, epochs=3)) == 130
    said = capsys.readouterr().out
    assert f"repro: stop requested; checkpoint {tmp_path}/checkpoints/last.pt" in said
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 2


def test_a_stop_during_the_last_validation_is_repeated_on_resume(monkeypatch, tmp_path, recwarn):
    """max_steps at an epoch's end, Ctrl-C during that epoch's validation: the resumed run
    validates (it used to find max_steps reached and end without the validation row), and
    steps the schedule before its first optimizer step without torch's warning about that."""
    real_bar = train.progress_bar

    def progress_bar(layout, total, desc, initial=0):
        bar = real_bar(layout, total, desc, initial)
        if desc == "validate":  # Ctrl-C after the first validation batch
            update = bar.update
            bar.update = lambda n=1: (update(n), os.kill(os.getpid(), signal.SIGINT))
        return bar

    monkeypatch.setattr(train, "progress_bar", progress_bar)
    optim = OptimConfig(schedule="steps", drop_epochs=(2,))  # the demo's: an LRScheduler
    assert command(tiny(tmp_path, optim, epochs=3, max_steps=2)) == 130
    assert not [r for r in rows(tmp_path) if "top1_error" in r]
    monkeypatch.setattr(train, "progress_bar", real_bar)
    recwarn.clear()
    assert command(tiny(tmp_path, optim, epochs=3, max_steps=2, resume="latest")) == 0
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]
    validated = [r for r in rows(tmp_path) if "top1_error" in r]
    assert [(r["step"], r["epoch"]) for r in validated] == [(2, 1)]
    assert max(r["step"] for r in rows(tmp_path)) == 2  # no step trained past max_steps


def test_a_stopped_torchrun_worker_exits_0_so_torchrun_does_not_restart_it(monkeypatch):
    """torchrun counts a worker's non-zero exit as a failure and, with --max-restarts, starts
    the job again: a worker asked to stop ends with 0 there, and with 128 + the signal alone."""
    from repro.run.faults import Stopped

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert (Stopped(signal.SIGINT).exit_code, Stopped(signal.SIGTERM).exit_code) == (130, 143)
    assert Stopped(None).exit_code == 143  # another rank was asked: as a launcher asks
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")  # torchrun sets it in every worker
    assert Stopped(signal.SIGTERM).exit_code == Stopped(signal.SIGINT).exit_code == 0


def test_resuming_mid_epoch_with_another_batch_or_seed_is_refused(tmp_path, capsys):
    """A position in an epoch is steps x batch in the seed's order: mid-epoch, another batch
    size or seed would repeat or skip images, so it is refused in one line naming the values;
    at an epoch's end the next epoch starts afresh, and another batch size is taken."""
    assert command(tiny(tmp_path, epochs=2, max_steps=1)) == 0  # last.pt: step 1 of epoch 1
    # Ended mid-epoch by max_steps: the training row and the 10-patch row both say epoch 1.
    assert {(r["step"], r["epoch"]) for r in rows(tmp_path)} == {(1, 1)}
    assert any(TEN_TOP1 in r for r in rows(tmp_path))
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    for changed, line in (
        ({"batch_size": 4}, "train.batch_size is 2 in the checkpoint, 4 in this run"),
        ({"seed": 7}, "train.seed is 0 in the checkpoint, 7 in this run"),
    ):
        capsys.readouterr()
        assert command(tiny(tmp_path, epochs=2, resume="latest", **changed)) == 2
        (error,) = capsys.readouterr().err.strip().splitlines()
        assert (
            error.startswith("train: error: ") and "last.pt: stopped mid-epoch (step 1 of" in error
        )
        assert line in error and "resume with train." in error, error
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before  # untouched
    capsys.readouterr()
    assert command(tiny(tmp_path, epochs=2, max_steps=2, resume="latest")) == 0  # epoch's end
    assert "last.pt at step 1, epoch 1 with 1 of its steps done" in capsys.readouterr().out
    assert command(tiny(tmp_path, epochs=2, batch_size=4, resume="latest")) == 0
    assert "at step 2, the end of epoch 1 (read by rank 0" in capsys.readouterr().out
    assert max(r["step"] for r in rows(tmp_path)) == 3  # epoch 2: one step of 4 images


def test_resuming_into_another_net_names_the_settings_that_differ(finished, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    wider = replace(TINY, fc_width=48)
    cfg = replace(tiny(run_dir, epochs=3, resume="latest"), model=wider)
    assert command(cfg) == 2
    (error,) = capsys.readouterr().err.strip().splitlines()
    assert "model.fc_width is 32 in the checkpoint, 48 in this run" in error, error


def test_a_resume_target_that_does_not_exist_names_what_is_valid(tmp_path, capsys):
    assert command(tiny(tmp_path / "run", resume="lastest")) == 2
    (error,) = capsys.readouterr().err.strip().splitlines()
    assert error == (
        "train: error: train.resume=lastest: no such checkpoint file; give 'latest' (the newest "
        f"in {tmp_path / 'run' / 'checkpoints'}) or the path of a checkpoint"
    )
