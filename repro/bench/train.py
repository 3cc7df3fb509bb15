"""`bench.py train` and `bench.py infer`: images/s of the net in every layout, with MFU.

    python launch/bench.py train                  # CPU: batch 32 and 64; 1 process, 2 and 4 ranks
    python launch/bench.py train --batch 128 512 --precision fp32 bf16 --compile off on   # GPUs
    python launch/bench.py infer --layouts 1 2
    python launch/bench.py train --project        # + one tower timed and a modelled link
    python launch/bench.py train --layouts 1 --compare torchvision   # + torchvision's alexnet()

Layouts (the same step as repro/run/train.py, launched by the bench itself in fresh processes):
1 process holding both towers; 2 ranks, one tower each; 2R ranks, R replicas x 2 towers.
`--rounds` runs the layouts in turn that many times and pools each row's measurements, so
that load from other jobs on a shared machine falls on every layout alike. On the CPU the ranks use gloo and share the machine's threads: the
total thread count (--threads, default all cores) is split evenly, so one process with 2
threads is compared with 2 ranks of 1 thread. On GPUs each rank gets its own GPU (NCCL);
layouts needing more GPUs than there are are skipped with a note.

MFU = training FLOPs per image (repro.net.summary.training_flops; forward only for `infer`)
x images/s / peak, the peak being a large matmul in the row's precision timed by this
command on the same device (per GPU x GPUs used; on the CPU with the total thread count).

Each multi-rank row is split into compute (the same step with stand-in collectives that send
nothing, repro/bench/traffic.py), exposed exchange (the real step minus that, paired
measurement by measurement: the communication the step could not hide behind arithmetic)
and data wait (the host getting the next batch; the synthetic batches here are in memory).

Projection (--project, and by itself on a machine with exactly one GPU): tower 0 alone in
one process with stand-in exchanges (the measured compute of one GPU of a two-GPU run), plus
the exchange volume of repro/bench/traffic.py over an assumed link, with no overlap assumed.
It is a model, labelled as one. `--compare torchvision` adds torchvision's one-tower
`alexnet()` in one process (same batch, threads, precision): the ratio per image and per FLOP
(the conv and fc layers' FLOPs: repro.net.summary's for ours, torch.utils.flop_counter's for
torchvision's, whose only products those are). A target's verdict is printed only
where the interquartile interval of the ratio lies wholly on one side; otherwise the figure
with its interval and "inconclusive". `--profile DIR` adds a torch.profiler run per row.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os

import torch

from repro.bench import kit as benchkit
from repro.bench import schemes
from repro.bench.step import Case, Job, build_model, rank_main
from repro.bench.targets import comparisons, print_rows, target_checks
from repro.bench.traffic import LinkModel, dtype_bytes, exchange_volume, modelled_seconds
from repro.config import CHOICES, ConfigError, ModelConfig
from repro.net.dist import LayoutError, single_process_layout
from repro.net.summary import summarize, training_flops

TINY = ModelConfig(num_classes=10, widths=(8, 12, 16, 16, 12), fc_width=32, image_size=67)
"""--tiny: a net small enough for tests (all code paths, meaningless figures)."""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gpu = torch.cuda.is_available()
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--layouts",
        type=benchkit.at_least(1),
        nargs="+",
        help="world sizes (1, 2, 2R); default: all that fit",
    )
    parser.add_argument(
        "--batch",
        type=benchkit.at_least(1),
        nargs="+",
        help="global batch sizes (default: 128 512 on GPU; 32 64 on CPU, where a batch-128 "
        "step of the paper's net takes seconds)",
    )
    parser.add_argument("--precision", nargs="+", choices=tuple(DTYPES), default=["fp32"])
    parser.add_argument("--channels-last", nargs="+", choices=("off", "on"), default=["off"])
    parser.add_argument("--compile", nargs="+", choices=("off", "on"), default=["off"])
    parser.add_argument(
        "--threads",
        type=benchkit.at_least(0),
        default=0,
        help="total torch threads, split over ranks (0: cores)",
    )
    parser.add_argument(
        "--warmup", type=benchkit.at_least(0), default=2, help="steps before timing (excluded)"
    )
    parser.add_argument(
        "--steps", type=benchkit.at_least(1), default=3 if gpu else 2, help="steps per measurement"
    )
    parser.add_argument(
        "--repeats", type=benchkit.at_least(1), default=7 if gpu else 3, help="measurements"
    )
    parser.add_argument(
        "--rounds",
        type=benchkit.at_least(1),
        help="fresh runs of every layout, alternated in time, pooled per row (default: 3 on "
        "CPU, where load from other jobs then falls on every layout alike; 1 on GPU, --tiny)",
    )
    parser.add_argument("--classes", type=benchkit.at_least(2), default=1000)
    parser.add_argument(
        "--cpu-memory",
        choices=CHOICES["train.cpu_memory"],
        default="keep",
        help="CPU ranks: freed memory kept for reuse as train.cpu_memory's default does "
        "(keep), or glibc's default (release)",
    )
    parser.add_argument("--project", action="store_true", help="add the one-tower projection")
    parser.add_argument(
        "--compare",
        choices=("torchvision",),
        help="also time torchvision's one-tower alexnet() in one process, side by side",
    )
    parser.add_argument(
        "--bandwidth-gbs",
        type=float,
        nargs="+",
        default=[300.0, 25.0],
        help="assumed links for the projection (GB/s one way; NVLink, PCIe)",
    )
    parser.add_argument("--latency-us", type=float, default=10.0, help="per collective")
    parser.add_argument(
        "--peak-size", type=benchkit.at_least(0), default=0, help="matmul side for the peak"
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny net and 1-step runs (tests)")
    parser.add_argument(
        "--profile", default="", metavar="DIR", help="also profile each row: traces go to DIR"
    )
    parser.add_argument("--out", help="JSON file (default runs/bench/<command>.json)")
    schemes.add_arguments(parser)  # --schemes: data / towers / owt side by side


def settings(args: argparse.Namespace) -> dict:
    """Resolved options: device, model, layouts, cases, threads, timing."""
    device = (
        "cuda"
        if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    if device == "cuda" and not torch.cuda.is_available():
        raise LayoutError("--device cuda but no CUDA GPU is visible")
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    cfg = TINY if args.tiny else ModelConfig(num_classes=args.classes)
    if args.layouts:
        layouts = args.layouts
    elif device == "cpu":
        layouts = [1, 2, 4]
    else:
        layouts = sorted(
            {1, *([2] if gpus >= 2 else []), *([2 * (gpus // 2)] if gpus >= 4 else [])}
        )
    bad = [w for w in layouts if w != 1 and w % 2]
    if bad:
        raise LayoutError(f"--layouts {bad}: a layout is 1 process or 2R ranks (2 towers)")
    batches = args.batch or ([4] if args.tiny else [128, 512] if device == "cuda" else [32, 64])
    if min(batches) < 1 or args.threads < 0:
        raise ConfigError(
            f"--batch {batches} --threads {args.threads}: batch sizes must be >= 1 and "
            "--threads >= 0 (0: every core)"
        )
    cases = tuple(
        Case(b, p, cl == "on", c == "on")
        for b, p, cl, c in itertools.product(
            batches, args.precision, args.channels_last, args.compile
        )
    )
    tiny = dict(warmup=1, steps=1, repeats=2) if args.tiny else {}
    return {
        "command": args.command,
        "device": device,
        "gpus": gpus,
        "cfg": cfg,
        "layouts": layouts,
        "cases": cases,
        "threads": args.threads or len(os.sched_getaffinity(0)),
        "warmup": tiny.get("warmup", args.warmup),
        "steps": tiny.get("steps", args.steps),
        "repeats": tiny.get("repeats", args.repeats),
        "rounds": args.rounds or (1 if args.tiny or device == "cuda" else 3),
        "project": args.project or (device == "cuda" and gpus == 1),
        "compare": args.compare,
        "cpu_memory": args.cpu_memory,
        "links": [LinkModel(f"{bw:g} GB/s", bw, args.latency_us) for bw in args.bandwidth_gbs],
        "peak_size": args.peak_size or (256 if args.tiny else 8192 if device == "cuda" else 2048),
    }


def flops_per_image(cfg: ModelConfig, mode: str) -> int:
    """Training: forward + both gradients (repro.net.summary); inference: forward, 2 per MAC."""
    if mode == "train":
        return training_flops(cfg)
    return 2 * sum(r.macs_total for r in summarize(cfg))


def counted_flops(model: str, cfg: ModelConfig, mode: str) -> int:
    """FLOPs of one image through `model` ('repro' or 'torchvision'), counted by
    torch.utils.flop_counter: forward, plus backward in training (no gradient for the image).
    For repro's net this also counts the LRN's band products, which are no layer's FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    net = build_model(Job(mode, cfg, "cpu", (), model=model), single_process_layout(cfg.towers))
    images = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    with FlopCounterMode(display=False) as counter:
        if mode == "train":
            net(images).sum().backward()
        else:
            with torch.no_grad():
                net.eval()(images)
    return counter.get_total_flops()


ENTRIES = ("layout", "one_tower", "torchvision")  # what a row measures


def run(args: argparse.Namespace) -> dict:
    s = settings(args)
    ctx = benchkit.context()
    print(f"bench {s['command']}: {benchkit.describe_context(ctx)}")
    device = torch.device(s["device"])

    def measure_peaks() -> dict:
        return {
            p: benchkit.matmul_peak(device, DTYPES[p], s["peak_size"], threads=s["threads"])
            for p in sorted({c.precision for c in s["cases"]})
        }

    first = measure_peaks()
    job = dict(
        mode=s["command"],
        cfg=s["cfg"],
        device=s["device"],
        cases=s["cases"],
        warmup=s["warmup"],
        steps=s["steps"],
        repeats=s["repeats"],
        cpu_memory=s["cpu_memory"],
    )
    notes, entries = [], []  # (world size, threads per rank, what)
    for world in s["layouts"]:
        if s["device"] == "cuda" and world > s["gpus"]:
            notes.append(f"{world} ranks skipped: needs {world} GPUs, {s['gpus']} visible")
            continue
        per_rank = max(1, s["threads"] // world)
        if s["device"] == "cpu" and per_rank * world > s["threads"]:
            notes.append(
                f"{world} ranks use {per_rank * world} threads in all ({s['threads']} asked): "
                "one thread per rank is the least"
            )
        entries.append((world, per_rank, "layout"))
    if s["project"]:
        entries.append((1, s["threads"], "one_tower"))
    if s["compare"]:
        entries.append((1, s["threads"], "torchvision"))
    # Rounds alternate the layouts in time, so that load from other jobs on a shared machine
    # falls on every layout alike; each row pools its measurements over the rounds.
    pooled: dict[tuple[int, int], dict] = {}
    for round_ in range(s["rounds"]):
        for e, (world, per_rank, what) in enumerate(entries):
            variants = ("real", "standin") if what == "layout" and world > 1 else ("real",)
            spec = Job(
                **job,
                one_tower=what == "one_tower",
                variants=variants,
                profile_dir=args.profile if round_ == 0 else "",
                model="torchvision" if what == "torchvision" else "repro",
            )
            for c, r in enumerate(benchkit.run_ranks(rank_main, world, (spec,), per_rank)):
                row = pooled.setdefault((e, c), {**r, "step_s": {}, "data_s": {}})
                for key in ("step_s", "data_s"):
                    for v, values in r[key].items():
                        row[key].setdefault(v, []).extend(values)
    # The peak at the start and at the end, the better of each: a busy moment understates it.
    second = measure_peaks()
    peaks = {p: max(first[p], second[p], key=lambda x: x["flop_s"]) for p in first}
    flops = {"repro": flops_per_image(s["cfg"], s["command"])}
    if s["compare"]:
        flops["counted"] = {
            "repro": flops["repro"],  # the conv and fc layers, as torchvision's count
            "torchvision": counted_flops("torchvision", s["cfg"], s["command"]),
        }
    # Busier than its cores (1-minute load, at the start or now): no verdict between layouts.
    load = max(ctx["load_average_start"][0], benchkit.load_average()[0])
    cores = ctx["machine"]["usable_cores"] or ctx["machine"]["cores"]
    quiet = load <= cores
    if not quiet:
        notes.append(f"load average {load:.1f} on {cores} cores: every verdict is inconclusive")
    if args.tiny:  # torchvision's net stays full size: no ratio or target means anything
        notes.append("--tiny: a tiny net that runs the code paths; every verdict is inconclusive")
    judged = quiet and not args.tiny  # else every verdict is 'inconclusive'
    rows = []
    for (e, _), r in sorted(pooled.items()):
        world, per_rank, what = entries[e]
        if what == "one_tower":
            rows += project(s, r, peaks)
            continue
        devices = world if s["device"] == "cuda" else 1
        name = (
            "torchvision alexnet() (1 tower, 1 process)" if what == "torchvision" else label(world)
        )
        per_image = flops["counted"]["torchvision"] if what == "torchvision" else None
        rows.append(_row(s, r, peaks, devices, name, per_rank, image_flops=per_image))
    result = {
        "command": s["command"],
        "settings": {
            **{
                k: s[k]
                for k in (
                    "device",
                    "layouts",
                    "threads",
                    "warmup",
                    "steps",
                    "repeats",
                    "rounds",
                    "cpu_memory",
                )
            },
            "model": dataclasses.asdict(s["cfg"]),
            "tiny": args.tiny,
            "flops_per_image": flops["repro"],
            "counted_flops_per_image": flops.get("counted"),
        },
        "peaks": peaks,
        "rows": rows,
        "checks": target_checks(rows, s["device"], judged),
        "comparisons": comparisons(rows, flops.get("counted"), judged),
        "notes": notes,
        "context": ctx,
    }
    print_rows(result)
    if getattr(args, "schemes", False) and s["command"] == "train":
        result["schemes"] = schemes.run(args, s, args.tiny)
    benchkit.write_json(args.out or f"runs/bench/{s['command']}.json", result)
    return result


def label(world: int) -> str:
    if world == 1:
        return "1 process (2 towers)"
    if world == 2:
        return "2 ranks (1 tower each)"
    return f"{world} ranks ({world // 2} replicas x 2 towers)"


def split(r: dict, step_s: list[float]) -> dict:
    """The step's parts, each a spread over the measurements: compute, exposed exchange (the
    real step minus the stand-in step measured right after it), data wait."""
    data = r["data_s"]["real"]
    standin = r["step_s"].get("standin")
    if standin is None:  # one process: nothing to exchange
        return {
            "compute_s": benchkit.spread([t - d for t, d in zip(step_s, data)]),
            "exposed_exchange_s": None,
            "data_wait_s": benchkit.spread(data),
        }
    quiet = r["data_s"]["standin"]
    return {
        "compute_s": benchkit.spread([t - d for t, d in zip(standin, quiet)]),
        "exposed_exchange_s": benchkit.spread([a - b for a, b in zip(step_s, standin)]),
        "data_wait_s": benchkit.spread(data),
    }


def _row(
    s: dict,
    r: dict,
    peaks: dict,
    devices: int,
    name: str,
    per_rank: int,
    step_s: list[float] | None = None,
    image_flops: int | None = None,
    **extra,
) -> dict:
    case = r["case"]
    step_s = r["step_s"]["real"] if step_s is None else step_s
    step = benchkit.spread(step_s)
    images_s = case.batch / step["median"]
    per_image = image_flops or flops_per_image(s["cfg"], s["command"])
    flop_s = per_image * images_s
    return {
        "layout": name,
        "model": r.get("model", "repro"),
        "device": s["device"],
        "world_size": r["world_size"],
        "threads_per_rank": per_rank,
        "batch": case.batch,
        "precision": case.precision,
        "channels_last": case.channels_last,
        "compile": case.compile,
        "step_s": step,
        "split": split(r, step_s) if "projection" not in extra else None,
        "images_per_s": images_s,
        "images_per_s_range": [case.batch / step["max"], case.batch / step["min"]],
        "flops_per_image": per_image,
        "flop_s": flop_s,
        "mfu": flop_s / (peaks[case.precision]["flop_s"] * devices),
        "mfu_devices": devices,
        "profile": r.get("profile"),
        "measurements": {"step_s": r["step_s"], "data_s": r["data_s"]},
        **extra,
    }


def project(s: dict, r: dict, peaks: dict) -> list[dict]:
    """Projected two-device rows: one tower's measured compute + modelled exchanges per link."""
    case, tower = r["case"], r["step_s"]["real"]
    volume = exchange_volume(s["cfg"], dtype_bytes(case.precision))
    rows = []
    for link in s["links"]:
        extra = modelled_seconds(volume, case.batch, link, backward=s["command"] == "train")
        name = f"PROJECTION 2 devices: 1 tower measured + {link.name}, {link.latency_us:g} us"
        projection = {
            "one_tower_step_s": benchkit.spread(tower),
            "modelled_exchange_s": extra,
            "link": vars(link),
            "overlap": "none assumed",
        }
        step_s = [t + extra for t in tower]
        rows.append(_row(s, r, peaks, 2, name, s["threads"], step_s=step_s, projection=projection))
    return rows
