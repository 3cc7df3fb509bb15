"""What every launch/ entry point shares: user errors as one line and an exit code, not a traceback.

A user error is one the person running the command can fix (a wrong key, a missing folder, a
checkpoint for another model); it ends the command with `PROG: error: ...` on stderr and exit
code 2. A run stopped for a non-finite loss exits with 1. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class OutputError(ValueError):
    """An output path a command cannot write (not a folder, no permission, a read-only disk)."""


def user_errors() -> tuple[type[BaseException], ...]:
    from repro.checkpoint import CheckpointError
    from repro.config import ConfigError
    from repro.data import DataError
    from repro.dist import LayoutError
    from repro.pipelines import DecodeError

    return (
        ConfigError,
        DataError,
        LayoutError,
        CheckpointError,
        DecodeError,
        OutputError,
        FileNotFoundError,
    )


def run(prog: str, fn: Callable[[], int | None]) -> int:
    """Call fn; turn user errors into one line on stderr and exit code 2."""
    from repro.train import TrainingError

    try:
        return int(fn() or 0)
    except user_errors() as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"{prog}: stopped: {err}", file=sys.stderr)
        return 1
