"""Run a function on N gloo ranks on this CPU, standing in for N GPUs.

`run_ranks(fn, world_size, *args)` starts world_size processes with torchrun's environment
variables set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), calls fn(*args) in each and
returns the list of their return values, in rank order. A failure in any rank fails the call
with that rank's traceback. fn must be a module-level function (it is pickled by name).
"""

from __future__ import annotations

import io
import os
import queue as queue_mod
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch

    # Each rank gets one thread: two ranks on two cores, as two GPUs would each have their own.
    torch.set_num_threads(1)
    from repro import dist

    try:
        result = fn(*args)
        # Plain bytes: tensors sent as they are would be shared-memory handles that die
        # with this process before the parent reads them.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        dist.teardown()


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    for _ in range(world_size):
        try:
            rank, status, value = queue.get(timeout=timeout)
        except queue_mod.Empty:
            dead = [r for r, p in enumerate(procs) if not p.is_alive()]
            errors.append(f"no answer within {timeout}s; ranks that exited: {dead}")
            break
        if status == "ok":
            import torch

            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
        else:
            errors.append(f"rank {rank} failed:\n{value}")
            break
    for p in procs:
        p.join(timeout=5 if errors else timeout)
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
