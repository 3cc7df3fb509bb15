"""The training step never waits for the host: what the loop itself sends, and when it reads.

Proves, on 2 gloo ranks with synthetic data: the loop issues no blocking collective in any
step; each `log_every` window's losses and stop flags leave in one async all_reduce at the
window's last step and are read one step later (a partial window at the end is read at
once); the logged loss is the window's mean; a stop requested on ONE rank stops EVERY rank at
the same step, the one after the window that carried the flag.
"""

from __future__ import annotations

import torch
from spawn import run_ranks

from repro.config import Config, DataConfig, ModelConfig, TrainConfig, WandbConfig
from repro.net import dist
from repro.run import train as loop
from repro.run import window

TINY = ModelConfig(widths=(8, 12, 16, 16, 12), fc_width=32, image_size=67)


class _Rows:
    """A tracker that keeps what it is given."""

    def __init__(self):
        self.rows = []

    def log(self, row, step):
        self.rows.append((step, row))

    def log_image(self, *args):
        pass

    def finish(self):
        pass


class _Counting:
    """Stands in for torch.distributed in repro/run/window.py (the log windows' all_reduce):
    notes every collective it sends."""

    def __init__(self, events: list, step: list):
        self.events, self.step = events, step

    def __getattr__(self, name):
        return getattr(torch.distributed, name)

    def all_reduce(self, tensor, *args, async_op=False, **kwargs):
        kind = "async all_reduce" if async_op else "blocking all_reduce"
        self.events.append((kind, self.step[0]))
        return torch.distributed.all_reduce(tensor, *args, async_op=async_op, **kwargs)


def _loop_rank(tmp: str):
    """Two epochs' worth of the loop on this rank: undisturbed, then a stop at step 2."""
    layout = dist.init_distributed(towers=2, device="cpu")
    real_dist, real_f = window.dist, loop.F
    try:
        return [_loop(layout, tmp, stop_at) for stop_at in (None, 2)]
    finally:
        window.dist, loop.F = real_dist, real_f


def _loop(layout, tmp: str, stop_at: int | None):
    cfg = Config(
        model=TINY,
        data=DataConfig(source="synthetic", crop=67, synthetic_images=40),
        train=TrainConfig(
            batch_size=4, log_every=3, max_steps=7, run_dir=tmp, device="cpu", precision="fp32"
        ),
        wandb=WandbConfig(mode="disabled"),
    )
    run = loop.start(cfg, layout)
    run.tracker = _Rows()
    stop = loop.StopRequest()
    events: list = []
    step = [0]  # the optimizer steps taken so far
    window.dist = _Counting(events, step)
    real_cpu = torch.Tensor.cpu

    def cpu(self, *args, **kwargs):  # a host read of a device value
        events.append(("host read", step[0]))
        return real_cpu(self, *args, **kwargs)

    torch.Tensor.cpu = cpu
    real_step = run.optimizer.step

    def optimizer_step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        step[0] += 1
        if stop_at is not None and step[0] == stop_at and layout.rank == 1:
            stop.requested = True  # one rank only, as a signal to one process would
        return out

    run.optimizer.step = optimizer_step
    losses = []
    real_loss = loop.F.cross_entropy
    loop.F = type(
        "F", (), {"cross_entropy": staticmethod(lambda *a, **k: _keep(real_loss, losses, a, k))}
    )
    try:
        stopping = loop.train_epoch(run, stop)
    finally:
        torch.Tensor.cpu = real_cpu
    return events, stopping, run.pos.step, run.tracker.rows, losses


def _keep(fn, into, args, kwargs):
    value = fn(*args, **kwargs)
    into.append(value.item())
    return value


def test_no_blocking_collective_in_a_step_reads_one_step_late_and_stops_together(tmp_path):
    results = run_ranks(_loop_rank, 2, str(tmp_path))
    for (events, stopping, steps, rows, losses), _ in results:
        assert not stopping and steps == 7
        assert not [e for e in events if e[0].startswith("blocking")]
        # Windows end at steps 3, 6 and 7 (max_steps): sent then, read a step later; the
        # last, partial one is read as the loop ends.
        assert [s for e, s in events if e == "async all_reduce"] == [3, 6, 7]
        assert [s for e, s in events if e == "host read"] == [4, 7, 7]
        if rows:  # rank 0 tracks
            assert [s for s, _ in rows] == [3, 6, 7]
            means = [sum(losses[0:3]) / 3, sum(losses[3:6]) / 3, losses[6]]
            for (_, row), mean in zip(rows, means):
                assert abs(row["loss"] - mean) <= 1e-5 * abs(mean)
    # Requested during step 2 on rank 1 only; window 1-3 carries the flag; read after step 4.
    stopped = [(stopping, steps) for _, (_, stopping, steps, _, _) in results]
    assert stopped == [(True, 4), (True, 4)]
