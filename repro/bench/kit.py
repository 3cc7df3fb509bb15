"""What every model benchmark shares: timing, spread, a matmul peak, ranks, the record.

- `time_region(fn, n, device)`: seconds for n calls, with CUDA events on a GPU and
  perf_counter after a synchronisation elsewhere (cifar10-airbench's habit: time exactly
  the measured region on the device's own clock).
- `spread(values)`: median, min, max and quartiles; benchmarks report the median and spread
  over repeated measurements, never a single run. `ratio_interval`, `verdict` and
  `ms_interval` turn spreads into a claim only where the spread supports one.
- `matmul_peak(device, dtype)`: FLOP/s of a large square matmul timed the same way; the
  denominator of model FLOP utilisation (MFU), measured on the machine that ran the model.
- `run_ranks(fn, world_size, args, threads)`: fn on world_size spawned processes with
  torchrun's environment set (gloo on CPU, NCCL with one GPU per rank); returns rank 0's value.
- `context()` and `write_json`: the machine, versions, git revision and load average that
  go beside every figure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import queue as queue_mod
import socket
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.multiprocessing as mp


def at_least(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= `least` (a count of steps, rounds, images...), so a
    0 that would divide by zero or silently become a default is refused at the command line."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
        return value

    parse.__name__ = f"whole number >= {least}"
    return parse


def time_region(fn: Callable[[], object], n: int, device: torch.device) -> float:
    """Seconds taken by n calls of fn, the device drained before the clock starts and stops."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # ms -> s
    begin = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - begin


def spread(values: Sequence[float]) -> dict:
    """Median, min, max, first and third quartile and count of a list of measurements."""
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "q1": q1,
        "q3": q3,
        "n": len(ordered),
    }


def ratio_interval(num: dict, den: dict) -> tuple[float, float, float]:
    """Ratio of two spreads' medians, with the interval their interquartile ranges allow:
    (median ratio, q1(num) / q3(den), q3(num) / q1(den))."""
    return num["median"] / den["median"], num["q1"] / den["q3"], num["q3"] / den["q1"]


def verdict(low: float, high: float, target: float, enough: bool = True) -> str:
    """'met' if the whole interval is at or under the target, 'NOT met' if all of it is above
    it, 'inconclusive' when the measured spread straddles the target or is too thin to judge
    (`enough` False: too few measurements)."""
    if not enough:
        return "inconclusive"
    if high <= target:
        return "met"
    if low > target:
        return "NOT met"
    return "inconclusive"


def ms_interval(stats: dict) -> str:
    """'84.0 ms [49.1-101.3]' (median [min-max]); a median below zero is printed only with its
    interval and the remark that the cost is not distinguishable from zero."""
    text = f"{stats['median'] * 1e3:.1f} ms [{stats['min'] * 1e3:.1f} to {stats['max'] * 1e3:.1f}]"
    if stats["q1"] <= 0 <= stats["q3"] or stats["median"] < 0:
        text += ": not distinguishable from 0"
    return text


def matmul_peak(
    device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5, threads: int = 0
) -> dict:
    """FLOP/s (2 n^3 per product) of a size x size matmul in dtype: the best of the repeats.

    On the CPU `threads` (if > 0) fixes torch's threads for the measurement and restores them.
    """
    old = torch.get_num_threads()
    if threads > 0 and device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(size, size, device=device, generator=gen).to(dtype)
        b = torch.randn(size, size, device=device, generator=gen).to(dtype)
        out = torch.empty(size, size, device=device, dtype=dtype)
        call = lambda: torch.matmul(a, b, out=out)  # noqa: E731
        time_region(call, 2, device)  # first products pay for allocation and kernel choice
        # Enough products per measurement for ~0.2 s, judged from one warm product.
        one = max(time_region(call, 1, device), 1e-6)
        n = max(1, min(200, int(0.2 / one)))
        times = [time_region(call, n, device) / n for _ in range(repeats)]
    finally:
        torch.set_num_threads(old)
    stats = spread(times)
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "size": size,
        "threads": threads if device.type == "cpu" else None,
        # The fastest repeat: load on a shared machine only ever slows a matmul down.
        "flop_s": 2 * size**3 / stats["min"],
        "flop_s_median": 2 * size**3 / stats["median"],
        "seconds": stats,
    }


# -- ranks --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, world_size: int, port: int, threads: int, fn, args, results) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(threads)  # fixed before any work: the comparison is per thread count
    from repro.net.dist import teardown

    try:
        value = fn(*args)
        buffer = io.BytesIO()
        torch.save(value, buffer)  # plain bytes: shared-memory tensors would die with the rank
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        teardown()


def run_ranks(
    fn: Callable,
    world_size: int,
    args: tuple,
    threads: int,
    timeout_s: float = 3600.0,
    every_rank: bool = False,
) -> object:
    """fn(*args) on world_size fresh processes (rank = process index); rank 0's return value,
    or with `every_rank` the list of every rank's, in rank order (the tests compare them).

    Every layout, one process included, runs in fresh processes so that no row inherits
    another's allocations or compiled graphs. A rank that fails fails the call with its
    traceback; fn must be a module-level function (it is pickled by name).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rank_entry, args=(r, world_size, port, threads, fn, args, results))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    values: dict[int, object] = {}
    error = ""
    try:
        for _ in range(world_size):
            try:
                rank, status, value = results.get(timeout=timeout_s)
            except queue_mod.Empty:
                error = f"no answer from the ranks within {timeout_s:.0f} s"
                break
            if status != "ok":
                error = f"rank {rank} failed:\n{value}"
                break
            values[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=10 if error else timeout_s)
            if p.is_alive():
                p.kill()
    if error:
        raise RuntimeError(error)
    return [values[r] for r in range(world_size)] if every_rank else values[0]


# -- the record beside every figure ------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform's answer where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "gpus": gpus,
        "platform": platform.platform(),
    }


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import nvidia.dali as dali

        found["dali"] = dali.__version__
    except ImportError:
        found["dali"] = None
    if torch.cuda.is_available():
        found["cuda"] = torch.version.cuda
    return found


def git_revision() -> str | None:
    """HEAD's hash, with '+dirty' when the working tree has uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=here
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=here,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: on a shared machine, how busy the cores were."""
    return [round(x, 2) for x in os.getloadavg()]


def context() -> dict:
    return {
        "machine": machine(),
        "versions": versions(),
        "git_revision": git_revision(),
        "load_average_start": load_average(),
    }


def write_json(path: str | Path, result: dict) -> Path:
    """Write the figures (with the load average at the end added) and say where."""
    result.setdefault("context", context())["load_average_end"] = load_average()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"figures written to {out}")
    return out


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A fixed-width table, columns as wide as their widest cell; text left, numbers right."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [bool(rows) and all(_is_number(r[i]) for r in cells[1:]) for i in range(len(header))]
    for n, r in enumerate(cells):
        line = "  ".join(
            c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))
        )
        print(line.rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _is_number(cell: str) -> bool:
    """A cell that reads as a figure ('12.5', '1,234', '3.2%', '-') is right-aligned."""
    try:
        float(cell.replace(",", "").rstrip("%x"))
        return True
    except ValueError:
        return cell in ("-", "")


def describe_context(ctx: dict) -> str:
    m, v = ctx["machine"], ctx["versions"]
    gpus = ", ".join(m["gpus"]) or "no GPU"
    return (
        f"{m['cpu']}, {m['usable_cores'] or m['cores']} cores, {gpus}; torch {v['torch']}, "
        f"DALI {v['dali']}, Python {v['python']}; git {ctx['git_revision']}; "
        f"load average {ctx['load_average_start']}"
    )
