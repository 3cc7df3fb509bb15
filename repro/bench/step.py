"""The measured step, run inside each rank: build the net in a layout and time its steps.

A `Job` says what one set of ranks measures: training steps (forward, cross-entropy,
backward, data-parallel gradient average, SGD step of §5, exactly as repro/run/train.py runs
them) or evaluation forwards (model.eval(), no_grad), for each `Case` (batch, precision,
channels_last, torch.compile), under one or more exchange variants:

- 'real': the exchanges of repro/net/parallel.py as they are;
- 'standin': the same exchanges with local stand-in collectives (repro/bench/traffic.py): every
  local copy runs, nothing crosses between processes;
- 'timed': the real collectives, each call timed and attributed to its link.

Images come from the synthetic source, made once on the device, so no data loading is
timed. Warm-up steps run first and are excluded; then `repeats` measurements of `steps`
steps each, the variants interleaved so that a burst of load on a shared machine hits them
alike. A measurement's time is the slowest rank's: a step is done when every rank is.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import functional as F

from repro.bench.kit import time_region
from repro.bench.traffic import (
    attribute_calls,
    dtype_bytes,
    exchange_volume,
    local_collectives,
    one_tower_layout,
    sent_bytes_per_image,
    timed_collectives,
)
from repro.config import DataConfig, ModelConfig, OptimConfig
from repro.data.synthetic import SyntheticLoader
from repro.net.dist import Layout, init_distributed
from repro.net.model import AlexNet
from repro.net.replicas import GradientAverage
from repro.run import kernels
from repro.run.optim import build_optimizer

VARIANTS = ("real", "standin", "timed")


@dataclass(frozen=True)
class Case:
    """One point of the grid a benchmark sweeps."""

    batch: int
    """Global batch: split over replicas; both towers of a replica see all of it."""
    precision: str = "fp32"
    """'fp32' or 'bf16' (autocast, as train.precision)."""
    channels_last: bool = False
    compile: bool = False


@dataclass(frozen=True)
class Job:
    """What one set of ranks measures; pickled to every rank."""

    mode: str
    """'train' or 'infer'."""
    cfg: ModelConfig
    device: str
    """'cpu' or 'cuda' (rank r uses GPU r)."""
    cases: tuple[Case, ...]
    warmup: int = 2
    steps: int = 2
    repeats: int = 5
    one_tower: bool = False
    """Run tower 0 alone in one process with stand-in exchanges (the projection)."""
    variants: tuple[str, ...] = field(default=("real",))
    cpu_memory: str = "keep"
    """CPU ranks: train.cpu_memory's setting (repro/run/kernels.py), set before anything is built."""
    profile_dir: str = ""
    """If set, `steps` more steps of the first variant under torch.profiler; a chrome trace
    per rank is written there and the top operators come back in the result."""
    model: str = "repro"
    """'repro' (the two-tower net in the layout) or 'torchvision' (its one-tower alexnet(), one
    process only: the comparison users make)."""


def rank_main(job: Job) -> list[dict]:
    """Entry point of every rank: one result dict per case (identical on every rank)."""
    if job.one_tower:
        device = torch.device("cuda", 0) if job.device == "cuda" else torch.device("cpu")
        layout = one_tower_layout(device)
    else:
        layout = init_distributed(job.cfg.towers, job.device)
    kernels.cpu_memory(job.cpu_memory, layout.device)  # as a training run on this device
    results = []
    for case in job.cases:
        results.append(measure(job, case, layout))
        gc.collect()  # the last case's net, optimizer and batch go before the next is built
        if layout.device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def build_model(job: Job, layout: Layout) -> torch.nn.Module:
    """The net a job measures: repro's AlexNet in the layout, or torchvision's one-tower alexnet."""
    torch.manual_seed(0)
    if job.model == "torchvision":
        from torchvision.models import alexnet  # the one-tower net users pick instead

        return alexnet(num_classes=job.cfg.num_classes)
    return AlexNet(job.cfg, layout, seed=0)


def measure(job: Job, case: Case, layout: Layout) -> dict:
    """Per-step seconds of every repeat for each variant; per-link seconds for 'timed'."""
    device, cfg = layout.device, job.cfg
    if case.batch % layout.replicas:
        raise ValueError(f"batch {case.batch} does not split over {layout.replicas} replicas")
    per_replica = case.batch // layout.replicas
    kernels.kernel_flags(False, device)  # as train.deterministic=false runs: cuDNN autotunes
    model = build_model(job, layout).to(device)
    if case.channels_last:
        model = model.to(memory_format=torch.channels_last)
    source = DataConfig(source="synthetic", crop=cfg.image_size)
    loader = SyntheticLoader(
        source, layout, per_replica, 0, cfg.num_classes, case.channels_last
    )  # the batch lives on the device: no decoding in the timed region
    batches = itertools.cycle(loader.epoch(0, loader.steps_per_epoch - 1))
    forward = torch.compile(model) if case.compile else model
    bf16 = case.precision == "bf16"
    train = job.mode == "train"
    waited = [0.0]  # seconds the host spent getting batches (data wait), this measurement

    def next_batch():
        start = time.perf_counter()
        batch = next(batches)
        waited[0] += time.perf_counter() - start
        return batch

    if train:
        model.train()
        optimizer = build_optimizer(model, OptimConfig())  # §5: momentum 0.9, decay 5e-4
        replicas = GradientAverage(list(model.parameters()), layout)  # buckets during backward

        def step() -> None:
            images, labels = next_batch()
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                logits = forward(images)
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            replicas.finish()  # no-op with one replica
            optimizer.step()
    else:
        model.eval()

        def step() -> None:
            images, _ = next_batch()
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                forward(images)

    volume = exchange_volume(cfg, dtype_bytes(case.precision))
    times: dict[str, list[float]] = {v: [] for v in job.variants}
    data: dict[str, list[float]] = {v: [] for v in job.variants}
    links: list[dict] = []
    sent: dict[str, int] = {}
    for variant in job.variants:  # warm-up: allocator, kernels, compiled graphs, gloo buffers
        with _variant(variant, job.one_tower, []):
            for _ in range(job.warmup):
                step()
    for _ in range(job.repeats):
        for variant in job.variants:
            calls: list = []
            _barrier(layout)
            waited[0] = 0.0
            with _variant(variant, job.one_tower, calls):
                seconds = time_region(step, job.steps, device)
            times[variant].append(_slowest(seconds, layout) / job.steps)
            data[variant].append(_slowest(waited[0], layout) / job.steps)
            if variant == "timed":
                per_link = attribute_calls(volume, calls, job.steps, backward=train)
                links.append({f"{k[0]}/{k[1]}": s / job.steps for k, s in per_link.items()})
                waits = [c[3] for c in calls if c[0] == "all_reduce"]  # the replica average
                links[-1]["replicas/backward"] = sum(waits) / job.steps
                per_image = sent_bytes_per_image(volume, calls, job.steps, train, cfg.towers)
                sent = {f"{k[0]}/{k[1]}": b for k, b in per_image.items()}
    result = {
        "profile": _profile(job, case, layout, step) if job.profile_dir else None,
        "case": case,
        "model": job.model,
        "layout": layout.describe(),
        "world_size": layout.world_size,
        "replicas": layout.replicas,
        "threads_per_rank": torch.get_num_threads(),
        "step_s": times,
        "data_s": data,
        "link_s": links,
        "sent_bytes_per_image": sent,
    }
    return result


def _profile(job: Job, case: Case, layout: Layout, step) -> dict:
    """Where a step's time goes on this rank: top operators by self time, and the collectives."""
    from torch.profiler import ProfilerActivity, profile

    cuda = layout.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with _variant(job.variants[0], job.one_tower, []), profile(activities=activities) as prof:
        for _ in range(job.steps):
            step()
        if cuda:
            torch.cuda.synchronize(layout.device)
    name = f"{job.mode}_b{case.batch}_{case.precision}_w{layout.world_size}_rank{layout.rank}.json"
    path = Path(job.profile_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    comm = [
        e for e in events if any(w in e.key for w in ("gloo", "nccl", "all_reduce", "all_gather"))
    ]
    return {
        "trace": str(path),
        "table": events.table(sort_by=key, row_limit=15),
        "collectives_self_s": {e.key: getattr(e, key) / 1e6 / job.steps for e in comm},
    }


def _variant(name: str, one_tower: bool, calls: list) -> contextlib.AbstractContextManager:
    if name not in VARIANTS:
        raise ValueError(f"exchange variant must be one of {VARIANTS}, got {name!r}")
    if one_tower or name == "standin":
        return local_collectives(calls)
    if name == "timed":
        return timed_collectives(calls)
    return contextlib.nullcontext()


def _barrier(layout: Layout) -> None:
    """Line the ranks up before a measurement (an all_reduce works on gloo and NCCL alike)."""
    if layout.world_size > 1:
        dist.all_reduce(torch.zeros(1, device=layout.device))


def _slowest(seconds: float, layout: Layout) -> float:
    if layout.world_size == 1:
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64, device=layout.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
