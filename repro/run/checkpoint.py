"""Checkpoints: one file format, written atomically, read back with errors a user can act on.

Format (FORMAT_VERSION 1): a `torch.save` zip of one dict holding only tensors, numbers,
strings, None, lists, tuples and dicts, so that `torch.load(weights_only=True)` can read it
without running any pickled code. Keys follow pytorch/examples `imagenet/main.py`:

    format_version  int    FORMAT_VERSION; a newer file is refused with a message
    model           dict   the model's state_dict (the same names in every layout)
    optimizer       dict   the optimizer's state_dict
    lr_scheduler    dict   the schedule's state_dict
    epoch           int    epochs completed when it was written
    step            int    optimizer steps completed
    config          dict   repro.config.config_to_dict(cfg) of the run
    class_names     list   class index -> name
    best_error      float  best validation top-1 error so far
    rng             dict   name -> tensor (rng_state() below)
    metrics         dict   the last logged numbers

`format_version`, `model`, `epoch`, `step` and `config` are required; the rest may be absent.

Names in a run folder (the step is zero-padded so `ls` sorts, but parsed as a number):

    run_dir/checkpoints/epoch0003_step001200.pt   after an epoch (checkpoint_path)
    run_dir/checkpoints/best.pt                   on the best validation error (best_path)
    run_dir/checkpoints/last.pt                   when the job is asked to stop (last_path)
"""

from __future__ import annotations

import math
import os
import pickle
import random
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from repro.config import ReproWarning
from repro.net.dist import Layout

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "model", "epoch", "step", "config")
STEP_NAME = re.compile(r"epoch(\d+)_step(\d+)\.pt")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, truncated, corrupt or not ours."""


class CheckpointWarning(ReproWarning):
    """A checkpoint was passed over (unreadable), and the run goes on without it."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | Path, epoch: int, step: int) -> Path:
    """run_dir/checkpoints/epochEEEE_stepSSSSSS.pt"""
    return checkpoint_dir(run_dir) / f"epoch{epoch:04d}_step{step:06d}.pt"


def best_path(run_dir: str | Path) -> Path:
    return checkpoint_dir(run_dir) / "best.pt"


def last_path(run_dir: str | Path) -> Path:
    return checkpoint_dir(run_dir) / "last.pt"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` to `path` so that `path` is always either the old file or the new one.

    The bytes go to a temporary file in the same folder (same file system, so the rename is
    atomic), are flushed and fsync'ed, then os.replace puts them in place; a process killed
    mid-write leaves the previous checkpoint intact and at most a stray `.NAME.tmp-PID` file.
    """
    missing = [k for k in REQUIRED_KEYS if k != "format_version" and k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks the required key(s) {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # Persist the rename itself (the directory entry) against a power cut.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def _why_unreadable(error: BaseException) -> str:
    if isinstance(error, pickle.UnpicklingError) and "Weights only" in str(error):
        return (
            "it holds objects other than tensors, numbers, strings, lists and dicts "
            "(not written by repro.run.checkpoint)"
        )
    # The zip header was there (checked before), so the rest is damaged or missing.
    detail = str(error).splitlines()[0][:100] if str(error) else ""
    return f"truncated or corrupt, was its write interrupted? ({type(error).__name__}: {detail})"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict at `path`, or CheckpointError with a one-line reason."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    if not magic:
        raise CheckpointError(f"{path}: the file is empty (was its write interrupted?)")
    if magic != b"PK\x03\x04":  # torch.save has written zip archives since PyTorch 1.6
        raise CheckpointError(f"{path}: not a torch checkpoint (no torch.save zip archive)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own notes about pickle protocols
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types; each becomes one readable line
        raise CheckpointError(f"{path}: {_why_unreadable(e)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: a torch file holding {type(state).__name__}, not a repro checkpoint dict"
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(
            f"{path}: a torch file without the repro checkpoint key(s) {', '.join(missing)} "
            f"(keys found: {', '.join(map(str, list(state)[:8])) or 'none'})"
        )
    version = state["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {version!r} is newer than this code reads ({FORMAT_VERSION})"
        )
    return state


def check_class_names(path: str | Path, saved: Sequence[str] | None, data: Sequence[str]) -> None:
    """CheckpointError naming the first differences if the checkpoint's classes are not the data's.

    Same count, other names (a renamed or swapped class folder) would silently change what
    every label index means on resume. A checkpoint without class names is not checked.
    """
    if saved is None:
        return
    saved, data = list(saved), list(data)
    if saved == data:
        return
    diffs = [
        f"class {i} is {a!r} in the checkpoint but {b!r} in the data"
        for i, (a, b) in enumerate(zip(saved, data))
        if a != b
    ]
    if len(saved) != len(data):
        diffs.append(f"the checkpoint has {len(saved)} classes, the data {len(data)}")
    more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
    raise CheckpointError(
        f"{path}: trained on other classes than the data holds: {'; '.join(diffs[:3])}{more}; "
        "resume on the data it was trained on, or start a fresh run without train.resume"
    )


def load_on_rank0(
    pick: Callable[[], Path | None], layout: Layout
) -> tuple[Path | None, dict[str, Any] | None]:
    """(path, state) of the checkpoint rank 0 picks, on every rank; (None, None) if it picks none.

    Only rank 0 calls `pick` (e.g. `latest_checkpoint` of its run folder) and opens the file;
    the state reaches the other ranks over the process group. Run folders may then be
    node-local: a node without the checkpoint resumes from node 0's, at the same step, instead
    of starting fresh while its gradients are averaged with resumed ones. A CheckpointError on
    rank 0 is raised on every rank, so no rank waits for a state that never comes.
    """
    if not layout.distributed:
        path = pick()
        return path, (load_checkpoint(path) if path is not None else None)
    message: list = [None]
    if layout.is_main:
        try:
            path = pick()
            state = load_checkpoint(path) if path is not None else None
            message[0] = ("ok", None if path is None else str(path), state)
        except CheckpointError as err:
            message[0] = ("error", str(err), None)
    # The tensors travel pickled, as in gather_named_tensors; NCCL sends the bytes from this
    # rank's GPU (init_distributed made it the current device), gloo from the CPU.
    dist.broadcast_object_list(message, src=0)
    status, path, state = message[0]
    if status == "error":
        raise CheckpointError(path)
    return (None if path is None else Path(path)), state


def step_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """[(step, path)] of the run's epochNNNN_stepNNNNNN.pt files, oldest step first."""
    folder = checkpoint_dir(run_dir)
    found = []
    for p in folder.glob("epoch*_step*.pt") if folder.is_dir() else ():
        m = STEP_NAME.fullmatch(p.name)
        if m:
            found.append((int(m.group(2)), p))
    return sorted(found)


def recorded_position(path: str | Path) -> tuple[int, int]:
    """(step, epoch) as written inside the checkpoint at `path`, or CheckpointError.

    The file is memory-mapped, so its tensors are not read: cheap even for the paper's
    500 MB checkpoints. The position inside the file is the truth; names and file times
    are not (a copy, `cp -r` or `touch` changes times, a rename changes names).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["step"]), int(state["epoch"])
    except Exception as e:  # unreadable, truncated, foreign: one line, as load_checkpoint
        raise CheckpointError(f"{path}: {_why_unreadable(e)}") from None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """What `train.resume: latest` resumes from, or None in a fresh run folder.

    Among the epoch checkpoints and `last.pt` (never `best.pt`: an older state kept for
    evaluation), the one whose recorded (step, epoch) is highest; at a tie an epoch
    checkpoint wins over `last.pt` (the same state, and its validation is done). A candidate
    that cannot be read is skipped with a warning naming it.
    """
    candidates = [p for _, p in step_checkpoints(run_dir)]
    if last_path(run_dir).is_file():
        candidates.append(last_path(run_dir))
    ranked = []
    for path in candidates:
        try:
            step, epoch = recorded_position(path)
        except CheckpointError as e:
            warnings.warn(
                f"passed over by train.resume=latest: {e}", CheckpointWarning, stacklevel=2
            )
            continue
        ranked.append(((step, epoch, path.name != "last.pt"), path))
    return max(ranked)[1] if ranked else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest step checkpoints; best.pt and last.pt stay.

    `keep` <= 0 keeps everything. Returns the deleted paths.
    """
    steps = step_checkpoints(run_dir)
    if keep <= 0 or len(steps) <= keep:
        return []
    doomed = [p for _, p in steps[:-keep]]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def rng_state() -> dict[str, torch.Tensor]:
    """Every global random generator's state as tensors (weights_only-loadable)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor([version, *mt], dtype=torch.int64),
        "python_gauss": torch.tensor(
            [float("nan") if gauss is None else gauss], dtype=torch.float64
        ),
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_extra": torch.tensor([pos, has_gauss, cached], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore what rng_state() captured; generators missing from `state` are left alone."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "python" in state:
        py = state["python"].tolist()
        gauss = float(state["python_gauss"][0]) if "python_gauss" in state else math.nan
        random.setstate((py[0], tuple(py[1:]), None if math.isnan(gauss) else gauss))
    if "numpy" in state:
        pos, has_gauss, cached = state["numpy_extra"].tolist()
        keys = state["numpy"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, int(pos), int(has_gauss), cached))
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        if f"cuda{i}" in state:  # a device that was not there at save time keeps its seed
            torch.cuda.set_rng_state(state[f"cuda{i}"].cpu(), i)
