"""Run a function on N gloo ranks on this CPU, standing in for N GPUs.

`run_ranks(fn, world_size, *args)` starts world_size processes with torchrun's environment
variables set, one torch thread each (two ranks on two cores, as two GPUs would each have
their own), calls fn(*args) in each and returns their return values in rank order. A failure
in any rank fails the call with that rank's traceback; fn must be a module-level function.
The spawning itself is the benchmarks' (repro/bench/kit.py), so tests and benchmarks launch
ranks the same way.
"""

from __future__ import annotations

from repro.bench import kit as benchkit


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    return benchkit.run_ranks(fn, world_size, args, threads=1, timeout_s=timeout, every_rank=True)
