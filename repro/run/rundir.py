"""One owner per run folder: a lock naming the run that owns it, and no two runs mixed in it.

A run folder (`train.run_dir`) holds one run: its config, metrics.jsonl, checkpoints and
plots. Two runs in one folder would mix without a word (pruning deletes the newer run's
checkpoints, best.pt is overwritten by a worse model, `resume=latest` picks the wrong run),
so rank 0 claims the folder before anything is written:

- `run.lock` is held with flock(2) for the run's life and names its host, PID, start time
  and command. The kernel drops the flock when the process ends, however it ends (kill -9
  too), so a lock file nobody holds is stale: it is taken over with a warning naming the
  run that left it. A lock that is held refuses the second run, naming the first.
- A fresh run (no `train.resume`, or a checkpoint from another folder) into a folder that
  already holds a run (metrics rows or checkpoints) is refused, unless `train.overwrite`
  is true: then the old run is moved aside to `<run_dir>.replaced-<time>`, not deleted.
- Temporary files left by an interrupted atomic write (`.NAME.tmp-PID`) are removed: the
  owner is the only writer, so any there now belong to a run that is gone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from repro.run import checkpoint as ckpt

LOCK_NAME = "run.lock"
TEMPORARY_GLOBS = (".*.tmp-*", "checkpoints/.*.tmp-*", "metrics.jsonl.tmp")
"""What an interrupted atomic write leaves: checkpoints, config.yaml, metrics.jsonl."""


class RunDirError(RuntimeError):
    """A run folder that cannot be used: a file, not writable, owned by a live run, or taken."""


def _cannot_use(run_dir: Path, error: OSError) -> RunDirError:
    reason = error.strerror or str(error)
    where = f" ({error.filename})" if error.filename and str(error.filename) != str(run_dir) else ""
    return RunDirError(
        f"train.run_dir={run_dir} cannot be used: {reason}{where}; "
        "choose a writable folder with train.run_dir=..."
    )


class RunLock:
    """The flock on `run_dir/run.lock`, held until release() (or the process ends)."""

    def __init__(self, run_dir: Path, say: Callable[[str], None]):
        self.path = run_dir / LOCK_NAME
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read(fd)
                os.close(fd)
                raise RunDirError(
                    f"train.run_dir={run_dir} is in use by {_describe(owner)}; wait for it to "
                    "end or stop it, or choose another train.run_dir"
                ) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
                    os.close(fd)
                    raise
                # Some network file systems lend no locks: go on, owner recorded but unenforced.
                say(f"repro: warning: {self.path}: {e.strerror}; make sure no other run uses it")
            # A previous owner may have unlinked the file between our open and our flock: then
            # we hold a lock on a file nobody else will find. Start again on the current one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        self.created = False  # set by claim() when this run made the folder
        stale = _read(fd)
        if stale and stale.get("pid") != os.getpid():
            say(
                f"repro: warning: taking over {self.path} from {_describe(stale)}, which has "
                "ended (its lock was no longer held)"
            )
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock; safe to call twice.

        A folder this run created and left empty (it failed before writing anything) goes too,
        so bad input leaves no partial run folder behind.
        """
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still held, so no one locks a doomed file
        os.close(self._fd)
        self._fd = None
        if self.created:
            with contextlib.suppress(OSError):  # not empty: the run wrote something, keep it
                self.path.parent.rmdir()


def _read(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:  # a lock file written half-way (its writer died) or by hand
        return {}
    return data if isinstance(data, dict) else {}


def _describe(owner: dict) -> str:
    if not owner:
        return "another run (its lock file names none)"
    return (
        f"PID {owner.get('pid', '?')} on {owner.get('host', '?')} "
        f"(started {owner.get('started', '?')}: {owner.get('command', '?')[:120]})"
    )


def holds_a_run(run_dir: Path) -> str:
    """What of a run `run_dir` holds ('' if nothing): metrics rows, checkpoints."""
    found = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    folder = ckpt.checkpoint_dir(run_dir)
    saved = sorted(p.name for p in folder.glob("*.pt")) if folder.is_dir() else []
    if saved:
        shown = ", ".join(saved[-3:]) if len(saved) <= 3 else f"..., {', '.join(saved[-3:])}"
        found.append(f"{len(saved)} checkpoint(s): {shown}")
    return "; ".join(found)


def continues_this_folder(resume: str, run_dir: Path, restarted: bool) -> bool:
    """Is the run a continuation of the one in `run_dir` (rather than a fresh one)?"""
    if restarted or resume == "latest":
        return True
    if not resume:
        return False
    return Path(resume).resolve().parent == ckpt.checkpoint_dir(run_dir).resolve()


def move_aside(run_dir: Path) -> Path:
    """Move everything in run_dir but the lock to a new sibling `<name>.replaced-<time>`."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{n}")
    aside.mkdir()
    for entry in run_dir.iterdir():
        if entry.name != LOCK_NAME:
            entry.rename(aside / entry.name)  # same parent, same file system: a rename
    return aside


def remove_temporaries(run_dir: Path) -> list[Path]:
    """Delete what interrupted atomic writes left behind; returns the removed paths."""
    removed = []
    for pattern in TEMPORARY_GLOBS:
        for path in run_dir.glob(pattern):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def claim(
    run_dir: str | Path,
    continuing: bool,
    overwrite: bool,
    say: Callable[[str], None] = print,
) -> RunLock:
    """Make `run_dir` this run's (rank 0 only): lock it, check it, clear leftovers.

    `continuing`: the run resumes the one already in the folder (see continues_this_folder).
    Raises RunDirError with one line saying what is wrong and what to do.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(
            f"train.run_dir={run_dir} is a file, not a folder; choose another train.run_dir"
        )
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir, say)
        lock.created = created
    except OSError as e:  # read-only, no permission, a parent that is a file, disk full
        raise _cannot_use(run_dir, e) from None
    try:
        found = "" if continuing else holds_a_run(run_dir)
        if found and not overwrite:
            raise RunDirError(
                f"train.run_dir={run_dir} already holds a run ({found}); continue it with "
                "train.resume=latest, choose another train.run_dir, or set train.overwrite=true "
                f"to move it aside to {run_dir.name}.replaced-<time>"
            )
        if found:
            say(f"repro: train.overwrite=true: moved the previous run to {move_aside(run_dir)}")
        removed = remove_temporaries(run_dir)
        if removed:
            names = ", ".join(str(p.relative_to(run_dir)) for p in removed)
            say(
                f"repro: removed {len(removed)} unfinished file(s) of an interrupted write: {names}"
            )
    except BaseException as e:
        lock.release()
        if isinstance(e, OSError):
            raise _cannot_use(run_dir, e) from None
        raise
    return lock
