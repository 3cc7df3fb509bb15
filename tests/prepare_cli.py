"""`python launch/prepare_data.py ARGS...` run as a user runs it, from the repo root.

`cli(*args, timeout=120)` returns the finished process (exit code, stdout and stderr as text);
the arguments may be paths or numbers. A command that would take longer than `timeout`
seconds fails the test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "launch/prepare_data.py", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
