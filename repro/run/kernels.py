"""How a run uses its device's kernels: determinism, cuDNN autotuning, torch.compile.

- `deterministic_env(on)`: with `train.deterministic`, cuBLAS needs CUBLAS_WORKSPACE_CONFIG
  before it creates its first handle, or `torch.use_deterministic_algorithms` raises at the
  first matrix multiply on a GPU. `main` calls this before anything touches CUDA.
- `kernel_flags(on, device)`: deterministic algorithms, cuDNN deterministic and no
  autotuning; otherwise cuDNN's benchmark mode on GPU runs (the shapes never change between
  steps, so the autotuned choice is made once and pays every step).
- `cpu_memory(mode, device)`: on a CPU run, glibc keeps the pages of freed blocks for the next
  step ('keep') instead of handing every large tensor back to the OS and faulting its pages
  in again when the next step allocates it ('release', glibc's default).
- `compile_model(model, example, autocast)`: torch.compile with one training step on a
  stand-in batch, run here, before the loop. The compile happens now, not inside the first
  real step, and a failure (no C compiler in a slim container, a Triton error) falls back to
  the eager model with one warning naming the cause.

Where compile may run: `switches` (repro/run/train.py) turns `compile: auto` on only for a
one-process GPU run, which has no collectives: nothing waits with a timeout while it
compiles. With `compile: on` across ranks the model's exchanges are inside the compiled
graphs (Dynamo traces the all-gathers), so the warm-up step is a collective step: each
rank's compile time then counts against `train.dist_timeout_s`, and a failure cannot fall
back on one rank alone without leaving the others waiting in a collective; it ends the run
with one line naming the cause and `train.compile=off`.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from repro.config import CHOICES, ReproWarning
from repro.net.dist import Layout

CUBLAS_WORKSPACE = ":4096:8"
"""cuBLAS's documented setting for reproducible results (8 buffers of 4 MiB)."""


class CompileError(RuntimeError):
    """torch.compile failed where the run cannot fall back to eager (across ranks)."""


class CompileWarning(ReproWarning, RuntimeWarning):
    """torch.compile failed and the run goes on eagerly."""


def deterministic_env(on: bool) -> None:
    """Set CUBLAS_WORKSPACE_CONFIG for deterministic runs (a user's own value is kept)."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


def kernel_flags(on: bool, device: torch.device) -> None:
    """Deterministic kernels everywhere, or cuDNN's autotuner on a GPU."""
    deterministic_env(on)
    if on != torch.are_deterministic_algorithms_enabled():
        # The setter imports torch._inductor (2.3 s of a 7 s demo start on 2 cores): only
        # when the setting changes.
        torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = (not on) and device.type == "cuda"


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt's parameter numbers (glibc malloc.h)


def cpu_memory(mode: str, device: torch.device) -> bool:
    """'keep': freed CPU tensors' memory stays in the process for reuse; 'release' leaves glibc
    as it is (it does not undo an earlier 'keep').

    glibc serves large blocks (over its adaptive mmap threshold, 128 KiB-32 MiB) with a fresh
    mmap and unmaps them when freed, and trims the heap's free top, so each step of a CPU run
    page-faults ~0.5 GB in again (100,000-135,000 faults a batch-32 training step of the
    paper's net): 11-15% of the step on 2 cores (docs/performance.md). M_MMAP_MAX=0 serves
    large blocks from the heap too, and a 1 GiB trim threshold keeps the freed top of the
    heap; resident memory then stays at the run's peak (measured 3-8% higher).
    Process-wide, so set once at the start of a run; a no-op on GPU runs (CUDA has its own
    caching allocator), 'release', or a C library without mallopt (musl, macOS). True means
    mallopt accepted both settings; a preloaded jemalloc or tcmalloc accepts and ignores them.
    """
    if mode not in CHOICES["train.cpu_memory"]:
        raise ValueError(f"train.cpu_memory={mode!r}: expected 'keep' or 'release'")
    if mode != "keep" or device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the C library this process runs on
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def _reason(err: BaseException) -> str:
    """The innermost cause of a compile failure, on one line (Dynamo wraps the backend's error)."""
    while True:  # BackendCompilerFailed and friends keep the backend's own error inside
        inner = getattr(err, "inner_exception", None) or err.__cause__
        if inner is None:
            break
        err = inner
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


def compile_model(
    model: nn.Module,
    example: Tensor,
    autocast: Callable,
    layout: Layout,
    backend: str | Callable = "inductor",
) -> tuple[Callable[[Tensor], Tensor], str | None]:
    """(the forward to train with, the reason compile was given up or None).

    Runs one forward and backward of the compiled model on `example` (a batch shaped, typed
    and laid out like the real ones, under the run's autocast), so Dynamo and the backend
    compile both graphs now. The step leaves no trace: gradients are cleared, non-tensor
    state (the towers' dropout draw counters) and the random generators are restored.
    """
    compiled = torch.compile(model, backend=backend)
    extra = {k: v for k, v in model.state_dict().items() if not isinstance(v, Tensor)}
    devices = [layout.device] if layout.device.type == "cuda" else []
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=devices):
            model.train()
            with autocast():
                logits = compiled(example)
            labels = torch.zeros(example.shape[0], dtype=torch.long, device=example.device)
            F.cross_entropy(logits.float(), labels).backward()
    except Exception as err:  # any backend failure: Dynamo, Inductor, Triton, a C compiler
        reason = _reason(err)
        if layout.distributed:
            raise CompileError(
                f"torch.compile failed on rank {layout.rank} ({reason}); "
                "set train.compile=off to train without it"
            ) from None
        warnings.warn(
            f"torch.compile failed ({reason}); training runs eagerly "
            "(train.compile=off skips the attempt)",
            CompileWarning,
            stacklevel=2,
        )
        return model, reason
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict({**model.state_dict(), **extra})
        model.train(was_training)
    return compiled, None
