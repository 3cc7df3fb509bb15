"""Checkpoints: a round trip restores tensors, optimizer and random state; a write killed
half-way leaves the previous file loadable; every unusable file is a one-line CheckpointError;
`latest` picks the highest step recorded inside the files (not names, not file times);
retention keeps the highest steps; differing class names are named; momentum saved in one
memory format resumes in the other; a used run folder is described with its checkpoint count."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from repro.config import Config, ModelConfig, OptimConfig, config_to_dict
from repro.net.model import AlexNet
from repro.run.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    CheckpointWarning,
    best_path,
    check_class_names,
    checkpoint_path,
    last_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    recorded_position,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from repro.run.optim import build_optimizer, load_momentum_by_name, momentum_by_name

REPO = Path(__file__).resolve().parents[1]


def make_state(step: int = 10, fill: float = 1.0) -> dict:
    model = torch.nn.Linear(4, 3)
    torch.nn.init.constant_(model.weight, fill)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()  # momentum buffers exist now
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=1)
    sched.step(0.5)
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "lr_scheduler": sched.state_dict(),
        "epoch": 2,
        "step": step,
        "config": config_to_dict(Config()),
        "class_names": ["a", "b", "c"],
        "best_error": 41.5,
        "rng": rng_state(),
        "metrics": {"train/loss": 2.5},
    }


def test_round_trip(tmp_path: Path) -> None:
    state = make_state()
    path = save_checkpoint(checkpoint_path(tmp_path, 2, 10), state)
    assert path.name == "epoch0002_step000010.pt"
    back = load_checkpoint(path)
    assert back["format_version"] == FORMAT_VERSION
    assert torch.equal(back["model"]["weight"], state["model"]["weight"])
    buf = back["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(buf, state["optimizer"]["state"][0]["momentum_buffer"])
    assert back["lr_scheduler"]["best"] == 0.5 and back["config"] == state["config"]
    assert (back["epoch"], back["step"], back["best_error"]) == (2, 10, 41.5)
    assert back["class_names"] == ["a", "b", "c"]
    assert not list(tmp_path.rglob(".*tmp*")), "no temporary file is left behind"


def test_rng_state_restores_every_generator(tmp_path: Path) -> None:
    random.gauss(0, 1)  # python's cached second gaussian is part of the state
    saved = load_checkpoint(save_checkpoint(tmp_path / "c.pt", make_state()))["rng"]
    # make_state drew from torch after capturing the state; restore and draw again
    set_rng_state(saved)
    first = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.rand())
    set_rng_state(saved)
    again = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_missing_required_key_is_refused_on_save(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path / "c.pt", {"model": {}, "epoch": 0, "config": {}})


def test_failure_mid_write_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    first = make_state(step=1, fill=1.0)
    path = save_checkpoint(tmp_path / "c.pt", first)
    real_save = torch.save

    def half_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # half the bytes are on disk ...
        raise OSError(28, "No space left on device")  # ... then the disk fills up

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(OSError):
        save_checkpoint(path, make_state(step=2, fill=2.0))
    monkeypatch.undo()
    old = load_checkpoint(path)
    assert old["step"] == 1 and torch.equal(old["model"]["weight"], first["model"]["weight"])
    assert os.listdir(tmp_path) == ["c.pt"]


def test_sigkill_mid_write_keeps_the_old_file(tmp_path: Path) -> None:
    """A real process, SIGKILLed after writing the new bytes but before the rename."""
    path = save_checkpoint(tmp_path / "c.pt", make_state(step=1, fill=1.0))
    script = textwrap.dedent(
        f"""
        import os, sys, time, torch
        from repro.run.checkpoint import save_checkpoint
        def stall(fd):  # the bytes are written; stall where a slow disk would
            print("writing", flush=True)
            time.sleep(60)
        os.fsync = stall
        state = {{"model": {{"w": torch.zeros(4_000_000)}}, "epoch": 9, "step": 9, "config": {{}}}}
        save_checkpoint({str(path)!r}, state)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(path)["step"] == 1
    assert latest_checkpoint(tmp_path) is None  # the stray temporary file is not a checkpoint


def one_line_error(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_unusable_files_give_one_line_errors(tmp_path: Path) -> None:
    good = save_checkpoint(tmp_path / "good.pt", make_state())
    data = good.read_bytes()

    assert "no such checkpoint" in one_line_error(tmp_path / "missing.pt")
    assert "not a file" in one_line_error(tmp_path)
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in one_line_error(tmp_path / "trunc.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "empty" in one_line_error(tmp_path / "empty.pt")
    (tmp_path / "notes.pt").write_text("epoch 3 was good\n")
    assert "not a torch checkpoint" in one_line_error(tmp_path / "notes.pt")

    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, tmp_path / "foreign.pt")
    message = one_line_error(tmp_path / "foreign.pt")
    assert "without the repro checkpoint key(s)" in message and "state_dict" in message
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    assert "holding Tensor" in one_line_error(tmp_path / "tensor.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled object, not data
    assert "objects other than tensors" in one_line_error(tmp_path / "module.pt")

    save_checkpoint(tmp_path / "future.pt", {**make_state(), "format_version": FORMAT_VERSION + 1})
    assert "newer" in one_line_error(tmp_path / "future.pt")


def touch(path: Path, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    os.utime(path, (mtime, mtime))
    return path


def saved(path: Path, step: int, epoch: int, mtime: float) -> Path:
    """A real (small) checkpoint recording `step` and `epoch`, its file time set to `mtime`."""
    save_checkpoint(path, {**make_state(step=step), "epoch": epoch})
    os.utime(path, (mtime, mtime))
    return path


def test_latest_checkpoint_is_the_highest_recorded_step(tmp_path: Path) -> None:
    """`latest` reads the step inside each file: names and file times can lie (a `cp -r`,
    a rename, a `touch`)."""
    assert latest_checkpoint(tmp_path) is None
    # The step outgrows its zero padding: a string sort would pick step 999999.
    saved(checkpoint_path(tmp_path, 1, 999_999), 999_999, 1, 3000)
    newest = saved(checkpoint_path(tmp_path, 2, 1_000_500), 1_000_500, 2, 1000)
    saved(checkpoint_path(tmp_path, 0, 500), 500, 0, 5000)
    saved(best_path(tmp_path), 2_000_000, 9, 9000)  # best is never "latest"
    touch(tmp_path / "checkpoints" / ".epoch0003_step2000000.pt.tmp-123", 9000)
    assert newest.name == "epoch0002_step1000500.pt"
    assert latest_checkpoint(tmp_path) == newest

    # After `cp -r` the copy's times are arbitrary: a stale last.pt (step 23) is the newest
    # file, an epoch checkpoint (step 66) the oldest. The steps inside decide.
    copy = tmp_path / "copy"
    saved(checkpoint_path(copy, 3, 66), 66, 3, 1000)
    saved(last_path(copy), 23, 1, 9000)
    assert latest_checkpoint(copy) == checkpoint_path(copy, 3, 66)
    later = saved(last_path(copy), 70, 3, 10)  # a stop request after it, however old its time
    assert latest_checkpoint(copy) == later
    # A tie: last.pt written when a stop came during epoch 3's validation (epoch 2 still
    # open) and the epoch checkpoint written once that validation was done: the latter.
    saved(last_path(copy), 66, 2, 9000)
    assert latest_checkpoint(copy) == checkpoint_path(copy, 3, 66)
    saved(last_path(copy), 66, 3, 9000)  # the same position: the epoch checkpoint still wins
    assert latest_checkpoint(copy) == checkpoint_path(copy, 3, 66)


def test_latest_passes_over_an_unreadable_candidate_with_a_warning(tmp_path: Path) -> None:
    good = saved(checkpoint_path(tmp_path, 1, 10), 10, 1, 1000)
    touch(checkpoint_path(tmp_path, 2, 20), 2000)  # not a checkpoint at all
    with pytest.warns(CheckpointWarning, match="epoch0002_step000020.pt"):
        assert latest_checkpoint(tmp_path) == good
    assert recorded_position(good) == (10, 1)


def test_class_names_that_differ_are_named() -> None:
    check_class_names("c.pt", ["ant", "bee", "cat"], ["ant", "bee", "cat"])
    check_class_names("c.pt", None, ["ant"])  # a checkpoint without names is not checked
    with pytest.raises(CheckpointError) as info:
        check_class_names("c.pt", ["ant", "bee", "cat", "dog"], ["ant", "cat", "bee", "dog"])
    message = str(info.value)
    assert "class 1 is 'bee' in the checkpoint but 'cat' in the data" in message
    assert "class 2 is 'cat' in the checkpoint but 'bee' in the data" in message
    assert "dog" not in message and "\n" not in message
    with pytest.raises(CheckpointError, match="the checkpoint has 2 classes, the data 3"):
        check_class_names("c.pt", ["a", "b"], ["a", "b", "c"])


def test_retention_keeps_the_newest_and_best(tmp_path: Path) -> None:
    paths = [touch(checkpoint_path(tmp_path, e, e * 100), 1000 + e) for e in range(1, 6)]
    best, last = touch(best_path(tmp_path), 1), touch(last_path(tmp_path), 1)
    assert prune_checkpoints(tmp_path, keep=0) == []
    removed = prune_checkpoints(tmp_path, keep=2)
    assert removed == paths[:3]
    assert sorted((tmp_path / "checkpoints").iterdir()) == sorted([*paths[3:], best, last])
    assert prune_checkpoints(tmp_path, keep=2) == []


def _stepped(memory: torch.memory_format, buffers: dict | None = None):
    """A small net laid out in `memory`, its momentum from `buffers` (or fresh), after one fused
    SGD step on fixed gradients: (model, optimizer)."""
    cfg = ModelConfig(num_classes=5, widths=(4, 6, 8, 8, 6), fc_width=16, image_size=67)
    model = AlexNet(cfg, seed=0).to(memory_format=memory)
    optimizer = build_optimizer(model, OptimConfig())
    if buffers is not None:
        load_momentum_by_name(model, optimizer, buffers)
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen))
    optimizer.step()
    return model, optimizer


def test_momentum_resumes_in_the_other_memory_format() -> None:
    """A CPU run's (NCHW) checkpoint resumed on a GPU (channels_last), and back: each restored
    buffer takes its weight's layout, or fused SGD would refuse it (CUDA) or pair the wrong
    elements (CPU)."""
    formats = (torch.contiguous_format, torch.channels_last)
    for saved, resumed in (formats, formats[::-1]):
        model, optimizer = _stepped(saved)
        buffers = {n: b.clone() for n, b in momentum_by_name(model, optimizer).items()}
        ref, _ = _stepped(saved, buffers)  # the next step where the run was saved
        got, opt = _stepped(resumed, buffers)
        for name, p in got.named_parameters():
            assert opt.state[p]["momentum_buffer"].stride() == p.stride(), name
        torch.testing.assert_close(dict(got.named_parameters()), dict(ref.named_parameters()))


def test_a_used_folder_is_described_with_its_checkpoint_count(tmp_path: Path) -> None:
    """The refusal of a fresh run into a used folder lists the newest names under their count."""
    from repro.run.rundir import holds_a_run

    assert holds_a_run(tmp_path) == ""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    names = ["best.pt", *(f"epoch000{e}_step0000{e}0.pt" for e in (1, 2, 3)), "last.pt"]
    for name in names:
        (folder / name).write_bytes(b"")
    assert holds_a_run(tmp_path) == (
        "5 checkpoint(s): ..., epoch0002_step000020.pt, epoch0003_step000030.pt, last.pt"
    )
    for name in names[:2]:
        (folder / name).unlink()
    assert holds_a_run(tmp_path) == (
        "3 checkpoint(s): epoch0002_step000020.pt, epoch0003_step000030.pt, last.pt"
    )
