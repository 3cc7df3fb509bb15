"""What every launch/ entry point shares: its parser, and user errors as one line and an exit code.

A user error is one the person running the command can fix (a wrong key, a missing folder, a
checkpoint for another model); it ends the command with `PROG: error: ...` on stderr and exit
code 2. A run stopped for a non-finite loss exits with 1; a run asked to stop (SIGINT,
SIGTERM) saves a checkpoint and exits with 128 + the signal's number, 130 or 143, as a shell
reports a process the signal ended (0 as a torchrun worker: faults.Stopped says why); a
Ctrl-C before that, wherever it lands, prints `PROG: interrupted` and exits with 130. Anything else is a bug and keeps its traceback.
This module sits above every room: it may import any of them, none imports it.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def parser(prog: str, description: str, usage_doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose --help ends with the entry point's docstring (its examples)."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=usage_doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def user_errors() -> tuple[type[BaseException], ...]:
    from repro.config import ConfigError
    from repro.data.folders import DataError, DecodeError
    from repro.net.dist import LayoutError
    from repro.run.checkpoint import CheckpointError
    from repro.run.kernels import CompileError
    from repro.run.rundir import RunDirError
    from repro.tools.inference import OutputError

    return (
        ConfigError,
        DataError,
        LayoutError,
        CheckpointError,
        RunDirError,
        CompileError,
        DecodeError,
        OutputError,
        FileNotFoundError,
    )


def run(
    prog: str,
    fn: Callable[[], int | None],
    also: tuple[type[BaseException], ...] = (),
    trace: bool = False,
) -> int:
    """Call fn; turn user errors into one line on stderr and exit code 2.

    `also`: more exception types that are user errors for this command (their message is
    folded onto one line); `trace`: re-raise them instead, for --traceback. Our warnings are
    one line too (`warnings_as_lines`).
    """
    try:  # this import loads torch (a second or more): a Ctrl-C may land in it
        from repro.run.faults import Stopped, TrainingError
    except KeyboardInterrupt:
        return interrupted(prog)
    try:
        with warnings_as_lines(prog):
            return int(fn() or 0)
    except KeyboardInterrupt:
        return interrupted(prog)
    except user_errors() as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"{prog}: stopped: {err}", file=sys.stderr)
        return 1
    except Stopped as err:  # asked to stop; the run has said where its checkpoint is
        return err.exit_code
    except also as err:
        if trace:
            raise
        print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


@contextmanager
def warnings_as_lines(prog: str) -> Iterator[None]:
    """While a command runs, each of repro's warnings (ReproWarning) is printed once, as
    `PROG: warning: ...`.

    Python's own format adds the source line of the `warnings.warn` call, and prints a warning
    again after any `catch_warnings` (which clears its memory of those shown): the run's
    loaders each load the statistics, with such blocks in between. Other packages' warnings
    print as Python prints them, naming their file, even when reported from repro's lines.
    """
    from repro.config import ReproWarning

    with warnings.catch_warnings():  # puts showwarning back afterwards
        show, shown = warnings.showwarning, set()

        def one_line(message, category, filename, lineno, file=None, line=None) -> None:
            if not issubclass(category, ReproWarning):
                show(message, category, filename, lineno, file, line)
            elif str(message) not in shown:
                shown.add(str(message))
                print(f"{prog}: warning: {message}", file=file or sys.stderr)

        warnings.showwarning = one_line
        yield


def interrupted(prog: str) -> int:
    print(f"{prog}: interrupted", file=sys.stderr)
    return 130


def exit_with(main: Callable[[], int]) -> None:
    """`if __name__ == "__main__": cli.exit_with(main)`: the process exits with main's code.

    A Ctrl-C before main reaches `run` (parsing its arguments) ends as in `run`; PROG is the
    script's name, which every entry point also gives its parser.
    """
    try:
        code = main()
    except KeyboardInterrupt:
        code = interrupted(Path(sys.argv[0]).stem)
    sys.exit(code)
