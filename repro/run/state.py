"""What a training run holds, and that state on disk and back.

`Run` is built once by `start` (repro/run/train.py) and read by the loop's steps; `Position`
is where it stands. `save` gathers every tower's state into the one-process form
(`checkpoint_state`, a collective on every rank) and has rank 0 write it; `resume` has rank 0
pick and read a checkpoint, the state reaching every rank over the process group, and
`restore` loads it into this layout. The files themselves (atomic writes, the format, which
one is latest) are repro/run/checkpoint.py's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from repro.config import Config, config_to_dict
from repro.net.dist import Layout
from repro.net.model import AlexNet
from repro.net.schemes import full_tensors, local_tensors
from repro.run import agree
from repro.run import checkpoint as ckpt
from repro.run.optim import (
    load_momentum_by_name,
    load_schedule_state,
    momentum_by_name,
    schedule_state,
)


@dataclass
class Position:
    """Where the run is: `epoch` in progress, batches of it done, optimizer steps in all."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0

    def where(self) -> str:
        """The position as the rows and progress bars count epochs (from 1)."""
        if self.step_in_epoch:
            return f"step {self.step}, epoch {self.epoch + 1} with {self.step_in_epoch} of its steps done"
        return f"step {self.step}, the end of epoch {self.epoch}"

    @property
    def last_epoch(self) -> int:
        """The epoch the latest step belongs to, counted from 1 as the rows count it."""
        return self.epoch + (1 if self.step_in_epoch else 0)


@dataclass
class Run:
    """What one training run holds, built once by `start` and read by the loop's steps."""

    cfg: Config
    layout: Layout
    run_dir: Path
    model: AlexNet
    forward: Callable  # the model, compiled or not
    optimizer: torch.optim.Optimizer
    schedule: object
    train_data: object
    val_data: object
    autocast: Callable
    channels_last: bool
    per_replica: int  # images per replica per step
    tracker: object = None
    pos: Position = field(default_factory=Position)
    best_error: float = math.inf
    last: dict = field(default_factory=dict)  # the latest logged metrics

    def say(self, *args, **kwargs) -> None:
        if self.layout.is_main:
            print(*args, **kwargs)


def resume(run: Run) -> bool:
    """Continue from `train.resume` (a path or "latest"), or after a torchrun restart.

    Rank 0 alone decides what to resume from and reads it (its run folder, its disk); the
    state reaches every other rank over the process group, so node-local run folders work.
    """
    target = run.cfg.train.resume
    if not target and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        target = "latest"  # torchrun --max-restarts: carry on from the last checkpoint
    if not target:
        return False

    def pick() -> Path | None:
        if target == "latest":
            return ckpt.latest_checkpoint(run.run_dir)
        if not Path(target).exists():
            raise ckpt.CheckpointError(
                f"train.resume={target}: no such checkpoint file; give 'latest' (the newest in "
                f"{run.run_dir / 'checkpoints'}) or the path of a checkpoint"
            )
        return Path(target)

    path, state = ckpt.load_on_rank0(pick, run.layout)
    if path is None:
        run.say(f"repro: no checkpoint in {run.run_dir}/checkpoints yet; starting fresh")
    else:
        run.pos, run.best_error = restore(
            path, state, run.model, run.optimizer, run.schedule, run.train_data.class_names, run.cfg
        )
        run.say(
            f"repro: resumed from {path} at {run.pos.where()} "
            f"(read by rank 0, sent to all {run.layout.world_size} rank(s))"
        )
    return True


def checkpoint_state(run: Run) -> dict:
    """Every tower's state gathered into the one-process form (a collective on every rank)."""
    model = run.model
    return {
        "format_version": ckpt.FORMAT_VERSION,
        "model": model.full_state_dict(),
        "optimizer": {"momentum": full_tensors(model, momentum_by_name(model, run.optimizer))},
        "lr_scheduler": schedule_state(run.schedule),
        "epoch": run.pos.epoch,
        "step_in_epoch": run.pos.step_in_epoch,
        "step": run.pos.step,
        "config": config_to_dict(run.cfg),
        "class_names": list(run.train_data.class_names),
        "best_error": run.best_error,
        "rng": ckpt.rng_state(),
        "metrics": run.last,
    }


def save(run: Run, path: Path) -> None:
    """Gather the state (collective) and let rank 0 write it atomically.

    A failed write (a full disk) leaves the previous file at `path` intact; every rank
    learns of it at once and raises it, naming the file.
    """
    state = checkpoint_state(run)

    def write() -> None:
        try:
            ckpt.save_checkpoint(path, state)
        except OSError as e:  # torch.save's errors name no file
            raise OSError(e.errno, e.strerror, str(path)) from None

    agree.on_main(write, run.layout)


def restore(
    path: Path,
    state: dict,
    model: AlexNet,
    optimizer,
    schedule,
    class_names=None,
    cfg: Config | None = None,
) -> tuple[Position, float]:
    """Load a checkpoint's state (read from `path` by rank 0, any layout) into this one.

    Refused, in one line naming the settings: a run resumed on other classes than it was
    trained on (`class_names`); mid-epoch, another batch size or seed than the checkpoint's
    (`cfg`: the epoch's images would be repeated or skipped, since a position in the epoch is
    steps x batch in the seed's order); a model whose weights do not fit.
    """
    if class_names is not None:
        ckpt.check_class_names(path, state.get("class_names"), class_names)
    saved = state.get("config") or {}
    if cfg is not None and state.get("step_in_epoch", 0):
        changed = _changed(saved, cfg, "train", ("batch_size", "seed"))
        if changed:
            raise ckpt.CheckpointError(
                f"{path}: stopped mid-epoch (step {state['step_in_epoch']} of epoch "
                f"{state['epoch'] + 1}), and {_described(changed)}; resume with "
                f"{' '.join(f'{key}={then}' for key, then, _ in changed)}: with another value "
                "the rest of the epoch would repeat or skip images"
            )
    try:
        model.load_full_state_dict(state["model"])
    except ValueError as err:
        changed = _changed(saved, cfg, "model") if cfg is not None else []
        because = f" ({_described(changed)})" if changed else ""
        raise ckpt.CheckpointError(f"{path}: {err}{because}") from None
    momentum = state.get("optimizer", {}).get("momentum", {})
    load_momentum_by_name(model, optimizer, local_tensors(model, momentum))
    if "lr_scheduler" in state:
        load_schedule_state(schedule, state["lr_scheduler"])
    if "rng" in state:
        ckpt.set_rng_state(state["rng"])
    pos = Position(state["epoch"], state.get("step_in_epoch", 0), state["step"])
    return pos, float(state.get("best_error", math.inf))


def _changed(
    saved: dict, cfg: Config, section: str, keys: tuple[str, ...] = ()
) -> list[tuple[str, object, object]]:
    """(section.key, the checkpoint's value, this run's) for each setting of `section` (`keys`
    only, if given) that the checkpoint's config records with another value."""
    now, then = config_to_dict(cfg)[section], saved.get(section, {})
    return [
        (f"{section}.{key}", then[key], value)
        for key, value in now.items()
        if (not keys or key in keys) and key in then and then[key] != value
    ]


def _described(changed: list[tuple[str, object, object]]) -> str:
    return "; ".join(
        f"{key} is {then} in the checkpoint, {now} in this run" for key, then, now in changed
    )
