"""launch/train.py with one fault injected at a chosen moment, for tests that need the moment.

    python tests/inject.py configs/demo.yaml ...            # as launch/train.py, plus REPRO_INJECT
    torchrun ... tests/inject.py configs/demo.yaml ...

REPRO_INJECT names what happens (rank 0 only, once):

    stop@validate   SIGTERM to the launcher after the first validation batch (torchrun, which
                    forwards it to every worker, as a cluster's preemption does; or this
                    process without torchrun)
    stop@10-patch   the same, after the first batch of the 10-patch evaluation
    stop@save       the same, as an epoch checkpoint's write begins (the write then takes 1 s
                    longer, so the signal lands during it)
    enospc@NAME     the disk is full when a checkpoint whose name contains NAME is written
    oom@N           the N-th training forward pass runs out of memory (as CUDA says it)

Everything else is the real command: its parser, its errors, its exit code.
"""

from __future__ import annotations

import errno
import os
import runpy
import signal
import sys
import time
from pathlib import Path

import torch

from repro.net.model import AlexNet
from repro.run import checkpoint as ckpt
from repro.run import train

ROOT = Path(__file__).resolve().parents[1]
WHAT, _, WHERE = os.environ.get("REPRO_INJECT", "").partition("@")
MAIN = int(os.environ.get("RANK", "0")) == 0
done = False


def stop_now() -> None:
    global done
    if MAIN and not done:
        done = True
        under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
        os.kill(os.getppid() if under_torchrun else os.getpid(), signal.SIGTERM)


if WHAT == "stop" and WHERE in ("validate", "10-patch"):
    # The name train.py's evaluations call (defined in repro/run/window.py, imported there).
    real_bar = train.progress_bar

    def progress_bar(layout, total, desc, initial=0):
        bar = real_bar(layout, total, desc, initial)
        if desc == WHERE:
            update = bar.update
            bar.update = lambda n=1: (update(n), stop_now())
        return bar

    train.progress_bar = progress_bar

if WHAT == "stop" and WHERE == "save":
    real_save = ckpt.save_checkpoint

    def save_checkpoint(path, state):
        if Path(path).name.startswith("epoch") and not done:
            stop_now()
            time.sleep(1.0)
        return real_save(path, state)

    ckpt.save_checkpoint = save_checkpoint

if WHAT == "enospc":
    real_torch_save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):
        if WHERE in str(getattr(f, "name", "")):
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_torch_save(obj, f, *args, **kwargs)

    torch.save = full_disk_save

if WHAT == "oom":
    real_forward, calls = AlexNet.forward, [0]

    def forward(self, x):
        calls[0] += self.training
        if self.training and calls[0] == int(WHERE):
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                "of 79.10 GiB of which 1.06 GiB is free."
            )
        return real_forward(self, x)

    AlexNet.forward = forward

sys.argv = [str(ROOT / "launch" / "train.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
