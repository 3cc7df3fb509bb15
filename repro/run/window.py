"""The loop's host side, without syncs: log windows, the stop request, progress bars.

No training step waits for the device. The losses of each `log_every` window and every
rank's stop flag (`StopRequest`, set by SIGTERM/SIGINT) leave in one async all_reduce at the
window's last step (`launch_window`) and are read after the next step has been launched
(`log_window`), which stops on a non-finite loss, logs the mean and shows it on the epoch's
progress bar (`progress_bar`, on rank 0 only). The loop itself is repro/run/train.py.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from repro.net.dist import Layout
from repro.run.faults import TrainingError
from repro.run.optim import current_lr
from repro.run.state import Run


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step and exits."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        """The signal that asked, None if none came to this rank (another rank's stopped it)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested, self.signum = True, signum

    def agreed(self, layout: Layout) -> bool:
        """True on every rank if any rank was asked to stop (a blocking collective when
        distributed). The training step does not call it: its flag travels with the losses of
        each log window, read a step late (`launch_window`), so no step waits for the host."""
        if not layout.distributed:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=layout.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def flag(self, like: torch.Tensor) -> torch.Tensor:
        """This rank's request as a (1,) tensor beside `like`: a fill, no host-device sync."""
        return like.new_full((1,), float(self.requested))


@dataclass
class Window:
    """A log window in flight: its losses and every rank's stop flag, being summed."""

    values: torch.Tensor
    """(n + 1,): the window's n losses, then the stop flag; summed over the world once `work` is done."""
    work: object
    """What to wait for before reading `values`: the async all_reduce's handle (None in one
    process), or on a GPU the event after their copy to pinned host memory."""
    epoch: int
    """Counted from 1, as the progress bar counts: the epoch this window's steps belong to."""
    last_step: int
    seconds: float
    images: int


def launch_window(window: list[torch.Tensor], stop: StopRequest, run: Run, t0: float) -> Window:
    """Send the window's losses and this rank's stop flag in one async all_reduce (world sum).

    Every rank of a replica holds its replica's loss, so the world sum over the world size is
    the mean over replicas; the summed flag is > 0 if any rank was asked to stop.
    """
    losses = torch.stack(window).float()
    values = torch.cat([losses, stop.flag(losses)])
    layout = run.layout
    work = dist.all_reduce(values, async_op=True) if layout.distributed else None
    if values.is_cuda:  # copied now, behind this step: reading them waits for it, not the next
        if work is not None:
            work.wait()  # NCCL: the stream waits for the sum, the host does not
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        values, work = host.copy_(values, non_blocking=True), torch.cuda.Event()
        work.record()
    return Window(
        values=values,
        work=work,
        epoch=run.pos.epoch + 1,
        last_step=run.pos.step,
        seconds=time.perf_counter() - t0,
        images=len(window) * run.per_replica * layout.replicas,
    )


def log_window(window: Window, run: Run, bar=None) -> bool:
    """Read a window (the host waits here, for it alone), stop on the first non-finite loss,
    log the mean loss; True if any rank was asked to stop."""
    if isinstance(window.work, torch.cuda.Event):
        window.work.synchronize()
    elif window.work is not None:
        window.work.wait()
    values = window.values.cpu()
    losses, stop = values[:-1] / run.layout.world_size, bool(values[-1] > 0)
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        step = window.last_step - len(losses) + int(bad[0]) + 1
        raise TrainingError(
            f"loss became {losses[bad[0]].item()} at step {step} (epoch {window.epoch}); "
            "the last good checkpoint is kept; lower optim.lr or check the data"
        )
    row = {
        "epoch": window.epoch,
        "loss": float(losses.mean()),
        "lr": current_lr(run.optimizer),
        "images_per_s": window.images / max(window.seconds, 1e-9),
    }
    run.tracker.log(row, window.last_step)
    run.last = row
    if bar is not None:
        bar.set_postfix(
            loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2g}", img_s=f"{row['images_per_s']:.0f}"
        )
    return stop


def progress_bar(layout: Layout, total: int, desc: str, initial: int = 0):
    """A tqdm bar on rank 0 (ETA included); a silent stand-in elsewhere."""
    return tqdm(
        total=total,
        desc=desc,
        initial=initial,
        disable=not layout.is_main,
        dynamic_ncols=True,
        leave=False,
    )
