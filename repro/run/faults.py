"""How a run ends when it cannot go on, or when the world around it fails: its launcher
dies, memory runs out, a rank stops answering, the disk fills or turns read-only.

`guarded` wraps the whole run: it claims the run folder (repro/run/rundir.py), watches the
launcher, and turns each fault into a TrainingError of one line saying what happened, what is
intact and what to do, which the command prints with exit code 1. A launcher that dies
becomes a stop request (the run saves and ends, as on SIGTERM, with `Stopped`: exit code 0,
as for every torchrun worker asked to stop). Anything else keeps its traceback: it is a bug,
not a fault of the machine.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from repro.config import Config
from repro.net.dist import Layout
from repro.run import agree
from repro.run import checkpoint as ckpt
from repro.run.rundir import claim, continues_this_folder

WATCH_INTERVAL_S = 0.5
"""Seconds between looks at the parent PID."""
LAUNCHER_ENV = "TORCHELASTIC_RUN_ID"
"""Set by torchrun in every worker's environment."""
T = TypeVar("T")


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, a fault of the machine); one line says why."""


class Stopped(Exception):
    """The run was asked to stop (SIGTERM/SIGINT, or its launcher died) and saved its state.

    Not finished, so a command run directly exits with 128 + the signal's number (130 for
    SIGINT, 143 for SIGTERM), as a shell reports a process that signal ended: a script tells
    it from a finished run (0). A torchrun worker exits 0 all the same: torchrun's agent counts
    any other code as a failed worker and, with --max-restarts, would start the job again,
    resuming and training on, though it was asked to stop. torchrun itself exits 1 when it
    was the one signalled (Ctrl-C, a scheduler's preemption).
    """

    def __init__(self, signum: int | None):
        signum = signum or signal.SIGTERM  # None: another rank was asked, as launchers ask
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 0 if "TORCHELASTIC_RUN_ID" in os.environ else 128 + signum


def guarded(cfg: Config, layout: Layout, run: Callable[[], T]) -> T:
    """run() in its claimed run folder, the launcher watched, faults turned into one line.

    Rank 0 claims the folder (every rank raises if it is refused) and holds its lock until
    run() ends, however it ends.
    """
    watch_launcher()
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    run_dir = Path(cfg.train.run_dir)
    continuing = continues_this_folder(cfg.train.resume, run_dir, restarted)
    say = lambda message: print(message, flush=True)  # noqa: E731
    lock = agree.on_main(lambda: claim(run_dir, continuing, cfg.train.overwrite, say), layout)
    try:
        return run()
    except (OSError, RuntimeError) as err:
        message = None if isinstance(err, TrainingError) else describe(err, cfg, layout.is_main)
        if message is None:
            raise
        raise TrainingError(message) from None
    finally:
        if lock is not None:
            lock.release()


_watcher: threading.Thread | None = None
"""The launcher watch of this process, once started (main() starts it before the rendezvous)."""


def watch_launcher(interval_s: float = WATCH_INTERVAL_S) -> threading.Thread | None:
    """Under torchrun: send this worker SIGTERM when its launcher (the parent) dies.

    torchrun forwards SIGTERM/SIGINT to its workers, but when it is killed outright
    (`kill -9`, an OOM killer) the workers are re-parented and would train on, writing into
    the run folder, with no one left to stop them. A thread polls the parent PID: when it
    changes, the worker stops as on SIGTERM (saving last.pt if it is past start-up, ending
    at once if not). Not under plain `python`: a user's shell is not a launcher to outlive.
    (Linux's prctl(PR_SET_PDEATHSIG) would do it without a thread, but only on Linux, and
    it fires when the parent *thread* that forked us ends, not the parent process.)
    """
    global _watcher
    if LAUNCHER_ENV not in os.environ:
        return None
    if _watcher is not None and _watcher.is_alive():  # main() starts it before the rendezvous
        return _watcher
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        os.kill(os.getpid(), signal.SIGTERM)

    _watcher = threading.Thread(target=watch, name="repro-launcher-watch", daemon=True)
    _watcher.start()
    return _watcher


_GLOO_SOURCE = re.compile(r"^\[[^\]]*\]\s*")  # gloo's "[/path/to/pair.cc:561] " prefix
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return _GLOO_SOURCE.sub("", lines[0] if lines else type(error).__name__)[:160]


def _intact(run_dir: Path, is_main: bool) -> str:
    """What the user still has and how to go on, said by rank 0 (the one that reads the folder)."""
    resume = "continue with train.resume=latest"
    if not is_main:
        return f"rank 0 names the latest checkpoint: {resume}"
    try:
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is not None:
            step, _ = ckpt.recorded_position(latest)
            return f"the latest checkpoint {latest} (step {step}) is intact: {resume}"
    except (OSError, ckpt.CheckpointError):
        pass
    return "no checkpoint had been written yet: start the run again"


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    # The CPU allocator raises a plain RuntimeError for the same thing.
    return type(error) is RuntimeError and "can't allocate memory" in text


def is_collective_failure(error: BaseException) -> bool:
    """A collective that timed out or lost its peer: NCCL raises DistError, gloo RuntimeError."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return type(error) is RuntimeError and ("/gloo/" in text or "Timed out waiting" in text)


def describe(error: BaseException, cfg: Config, is_main: bool) -> str | None:
    """One line for a fault of the machine around the run, or None for anything else."""
    t, run_dir = cfg.train, Path(cfg.train.run_dir)
    if is_out_of_memory(error):
        smaller = max(t.batch_size // 2, 1)
        return (
            f"out of memory at train.batch_size={t.batch_size} ({_first_line(error)}); lower it "
            f"(e.g. train.batch_size={smaller}) or spread it over more replicas; "
            f"{_intact(run_dir, is_main)}"
        )
    if is_collective_failure(error):
        text = str(error)
        if "Timed out" in text or "timed out" in text or "Timeout" in text:
            what = f"no answer from another rank within train.dist_timeout_s={t.dist_timeout_s:g} s"
            why = "a rank hung or ended: see its messages"
        else:
            what, why = "lost the connection to another rank", "it ended: see its messages"
        return f"{what} ({_first_line(error)}); {why}; {_intact(run_dir, is_main)}"
    if isinstance(error, OSError) and error.errno in _NO_SPACE + _NOT_WRITABLE:
        where = f" {error.filename}" if error.filename else ""
        fix = "free some space" if error.errno in _NO_SPACE else "make the run folder writable"
        return f"cannot write{where}: {error.strerror}; {fix}; {_intact(run_dir, is_main)}"
    return None
