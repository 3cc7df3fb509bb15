"""The three schemes side by side: traffic from the shapes, a modelled step time, CPU rows.

    python launch/bench.py exchange            # + bytes per rank for data/towers/owt, K = 2..16
    python launch/bench.py train --schemes     # + measured compute, the modelled speedups and
                                               #   measured steps of every scheme on 2 and 4 ranks

Traffic is what ONE rank sends per step, with b images per rank (B = K*b in all; the
OWT paper used b = 128 per GPU). Ring algorithms: an all-gather or a reduce-scatter of a
tensor of N elements in all sends (K-1)/K * N per rank, an all-reduce twice that.
- data: every gradient all-reduced, 2 (K-1)/K * P per step (P = 60.97M for 1000 classes).
- towers: R = K/2 replicas of 2 tower ranks, 2b images per replica (so that each GPU
  computes as much as under the other schemes): the five cross-tower links of
  repro/bench/traffic.py for 2b images (backward as the all_reduce parallel.py makes), plus
  one tower's gradients (P/2) all-reduced over the R replicas.
- owt (PAPER.md §7; repro/net/hybrid.py): pool5 gathered along the batch and its gradient
  reduce-scattered, (K-1) b 9216 elements each way; fc6 -> fc7 and fc7 -> fc8 gathered along
  the units and reduce-scattered, (K-1) b 4096 each way; the logits gathered, (K-1) b C;
  the labels; the convolution gradients (P_conv = 2.33M) all-reduced. fc gradients stay.
  Unequal unit shares (1000 classes on 16 ranks) travel padded to the widest.

The MODEL of a step: every scheme gives each GPU the same arithmetic (b images through the
convolutions and b images' worth of fc units), so a step is that compute plus the traffic
over a link at its bandwidth, plus a latency per collective, without overlap. The compute is
measured on this machine; `--conv-ms`/`--fc-ms` put in figures measured elsewhere (a GPU).
It is a model, printed as one: no GPU, NVLink, PCIe or InfiniBand was measured here.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.distributed as dist
from torch.nn import functional as F

from repro.bench import kit as benchkit
from repro.bench.traffic import LinkModel, exchange_volume
from repro.config import ModelConfig
from repro.net.dist import init_distributed
from repro.net.layers import spatial_sizes
from repro.net.model import AlexNet, split_classes
from repro.net.schemes import batch_labels, build_model, reduce_gradients
from repro.net.summary import summarize
from repro.run import kernels

SCHEMES = ("data", "towers", "owt")
RANKS = (2, 4, 8, 16)
LINKS = (
    LinkModel("NVLink 300 GB/s", 300.0, 10.0),
    LinkModel("PCIe 4 x16 25 GB/s", 25.0, 10.0),
    LinkModel("InfiniBand EDR 12.5 GB/s", 12.5, 10.0),
)
"""Assumed links, one direction; the latency is per collective."""


def parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(convolution parameters, fully connected parameters) of the whole net."""
    rows = summarize(cfg)
    conv = sum(r.params_total for r in rows if r.layer.startswith("conv"))
    return conv, sum(r.params_total for r in rows if r.layer.startswith("fc"))


def traffic(cfg: ModelConfig, scheme: str, ranks: int, b: int, act_bytes: int = 4) -> list[dict]:
    """What one rank sends per step under `scheme` on `ranks` ranks, b images each; [] if K = 1.

    Rows: link, op, elements, bytes (per step) and bytes_per_image (per image of the rank's b).
    Gradients are float32 (4 bytes); activations `act_bytes` (2 under bf16 autocast).
    """
    k, ring = ranks, (ranks - 1) / ranks
    conv, fc = parameters(cfg)
    rows: list[tuple[str, str, float, int]] = []  # (link, op, elements, bytes per element)
    if k == 1:
        return []
    if scheme == "data":
        rows.append(("gradients", "all_reduce", 2 * ring * (conv + fc), 4))
    elif scheme == "towers":
        if k % cfg.towers:
            raise ValueError(f"towers needs a multiple of {cfg.towers} ranks, got {k}")
        replicas = k // cfg.towers
        for v in exchange_volume(cfg):  # per image per rank, 2b images per replica
            rows.append((v["link"], "all_gather", v["forward_elements"] * 2 * b, act_bytes))
            if v["backward_elements"]:
                rows.append((v["link"], "all_reduce", v["backward_elements"] * 2 * b, act_bytes))
        if replicas > 1:
            share = 2 * (replicas - 1) / replicas * (conv + fc) / cfg.towers
            rows.append(("gradients", "all_reduce", share, 4))
    elif scheme == "owt":
        side = spatial_sizes(cfg)["pool5"]
        features = cfg.widths[4] * side * side * cfg.towers  # 9216
        units = cfg.fc_width * cfg.towers  # 4096
        widest = max(split_classes(units, k))  # a rank's share of fc6/fc7, padded
        classes = max(split_classes(cfg.num_classes, k))
        rows += [
            ("pool5 (fc6 input)", "all_gather", (k - 1) * b * features, act_bytes),
            ("pool5 (fc6 input)", "reduce_scatter", (k - 1) * b * features, act_bytes),
            ("fc6 -> fc7", "all_gather", (k - 1) * k * b * widest, act_bytes),
            ("fc6 -> fc7", "reduce_scatter", (k - 1) * k * b * widest, act_bytes),
            ("fc7 -> fc8", "all_gather", (k - 1) * k * b * widest, act_bytes),
            ("fc7 -> fc8", "reduce_scatter", (k - 1) * k * b * widest, act_bytes),
            ("logits", "all_gather", (k - 1) * k * b * classes, act_bytes),
            ("labels", "all_gather", (k - 1) * b, 8),
            ("conv gradients", "all_reduce", 2 * ring * conv, 4),
        ]
    else:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    return [
        {
            "link": link,
            "op": op,
            "elements": round(n),
            "bytes": round(n) * size,
            "bytes_per_image": round(n) * size / b,
        }
        for link, op, n, size in rows
    ]


def traffic_table(cfg: ModelConfig, b: int, act_bytes: int = 4) -> list[dict]:
    """Per scheme and K = 2, 4, 8, 16: MB per step and KB per image one rank sends."""
    out = []
    for scheme in SCHEMES:
        for k in RANKS:
            rows = traffic(cfg, scheme, k, b, act_bytes)
            out.append(
                {
                    "scheme": scheme,
                    "ranks": k,
                    "per_rank_batch": b,
                    "bytes_per_step": sum(r["bytes"] for r in rows),
                    "bytes_per_image": sum(r["bytes_per_image"] for r in rows),
                    "collectives": len(rows),
                    "links": rows,
                }
            )
    return out


def print_traffic(table: list[dict]) -> None:
    b = table[0]["per_rank_batch"]
    print(
        f"\nthe three schemes, derived from the shapes: what one rank sends, {b} images per "
        "rank (towers: 2 ranks share a replica's 2b images)"
    )
    header = ["scheme", *[f"K={k} MB/step" for k in RANKS], *[f"K={k} KB/img" for k in RANKS]]
    rows = []
    for scheme in SCHEMES:
        mine = {r["ranks"]: r for r in table if r["scheme"] == scheme}
        rows.append(
            [
                scheme,
                *(f"{mine[k]['bytes_per_step'] / 1e6:.1f}" for k in RANKS),
                *(f"{mine[k]['bytes_per_image'] / 1e3:.0f}" for k in RANKS),
            ]
        )
    benchkit.print_table(header, rows)
    owt = next(r for r in table if r["scheme"] == "owt" and r["ranks"] == 4)
    print("owt on 4 ranks, per link:")
    benchkit.print_table(
        ["link", "op", "MB/step", "KB/img"],
        [
            [x["link"], x["op"], f"{x['bytes'] / 1e6:.2f}", f"{x['bytes_per_image'] / 1e3:.1f}"]
            for x in owt["links"]
        ],
    )


# -- the model of a step -----------------------------------------------------------------------


def modelled(cfg: ModelConfig, compute: dict, b: int, links=LINKS) -> list[dict]:
    """Step seconds and speedup over one device (b images) per scheme, K and link: a MODEL.

    compute: {'conv_s', 'fc_s'} seconds per image for the whole net's convolutions and fc
    layers, forward + backward. Every scheme gives a device b images' worth of each.
    """
    one = b * (compute["conv_s"] + compute["fc_s"])
    out = []
    for link in links:
        for scheme in SCHEMES:
            for k in RANKS:
                rows = traffic(cfg, scheme, k, b)
                comm = sum(r["bytes"] for r in rows) / (link.bandwidth_gb_s * 1e9)
                comm += len(rows) * link.latency_us * 1e-6
                step = one + comm
                out.append(
                    {
                        "link": link.name,
                        "scheme": scheme,
                        "ranks": k,
                        "step_s": step,
                        "comm_s": comm,
                        "speedup": k * one / step,
                    }
                )
    return out


def measure_compute(cfg: ModelConfig, batch: int, device: str = "cpu", repeats: int = 3) -> dict:
    """Seconds per image of the convolutions and of fc6-fc8 (forward + backward), one process.

    The whole step, minus fc6-fc8 run alone on pool5-shaped features of the same batch.
    """
    dev = torch.device(device)
    model = AlexNet(cfg, seed=0).to(dev).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=gen).to(dev)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=gen).to(dev)
    side = spatial_sizes(cfg)["pool5"]
    pool5 = torch.randn(batch, cfg.widths[4] * side * side * cfg.towers, device=dev)  # (B, 9216)
    towers = list(model.towers.values())

    def whole() -> None:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()

    def fc_only() -> None:
        parts = list(pool5.chunk(len(towers), dim=1))  # each tower's (B, 4608)
        for name in ("fc6", "fc7"):
            parts = [F.relu(a) for a in model.linked(parts, name)]  # each (B, 2048)
        F.cross_entropy(torch.cat(model.linked(parts, "fc8"), 1), y).backward()

    whole(), fc_only()  # warm-up
    t_all = statistics.median(benchkit.time_region(whole, 1, dev) for _ in range(repeats))
    t_fc = statistics.median(benchkit.time_region(fc_only, 1, dev) for _ in range(repeats))
    return {
        "device": device,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "conv_s": max(t_all - t_fc, 0.0) / batch,
        "fc_s": t_fc / batch,
    }


# -- measured steps of every scheme on gloo ranks ----------------------------------------------


def scheme_rank(
    cfg: ModelConfig, scheme: str, batch: int, warmup: int, repeats: int, cpu_memory: str = "keep"
) -> dict:
    """In each rank: SGD steps of the net under `scheme` as repro/run/train.py runs them."""
    layout = init_distributed(cfg.towers, "cpu", parallel=scheme)
    kernels.cpu_memory(cpu_memory, layout.device)  # as a training run on this device
    model = build_model(cfg, layout, seed=0).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)
    b = batch // layout.replicas
    gen = torch.Generator().manual_seed(layout.replica)
    x = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=gen)
    y = torch.randint(0, cfg.num_classes, (b,), generator=gen)

    def step() -> None:
        loss = F.cross_entropy(model(x), batch_labels(y, layout))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        reduce_gradients(model, layout)
        opt.step()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t = torch.tensor([benchkit.time_region(step, 1, layout.device)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step is done when every rank is
        times.append(float(t))
    return {"scheme": scheme, "ranks": layout.world_size, "batch": batch, "step_s": times}


def measured_rows(
    cfg: ModelConfig, batch: int, threads: int, warmup: int, repeats: int, cpu_memory: str = "keep"
) -> list:
    """Every scheme on 2 and 4 gloo ranks at one global batch (threads split over the ranks)."""
    rows = []
    for k in (2, 4):
        for scheme in SCHEMES:
            per_rank = max(1, threads // k)
            job = (cfg, scheme, batch, warmup, repeats, cpu_memory)
            r = benchkit.run_ranks(scheme_rank, k, job, per_rank)
            step = benchkit.spread(r["step_s"])
            rows.append({**r, "threads_per_rank": per_rank, "step_s": step})
            rows[-1]["images_per_s"] = batch / step["median"]
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `bench.py train --schemes` adds."""
    parser.add_argument(
        "--schemes", action="store_true", help="data/towers/owt: model + rows on 2 and 4 ranks"
    )
    parser.add_argument(
        "--per-gpu-batch", type=benchkit.at_least(1), default=128, help="b of the model (OWT: 128)"
    )
    parser.add_argument(
        "--conv-ms", type=float, help="conv ms per image for the model (else measured)"
    )
    parser.add_argument("--fc-ms", type=float, help="fc6-fc8 ms per image for the model")
    parser.add_argument("--no-rows", action="store_true", help="--schemes: the model only")


def run(args: argparse.Namespace, s: dict, tiny: bool) -> dict:
    """`bench.py train --schemes`: measured compute, the model, CPU rows on 2 and 4 ranks.

    `s`: bench/train.py's resolved settings (model, device, threads, the first batch size).
    """
    cfg, batch, threads = s["cfg"], s["cases"][0].batch, s["threads"]
    torch.set_num_threads(threads)
    if args.conv_ms is not None and args.fc_ms is not None:
        compute = {"conv_s": args.conv_ms / 1e3, "fc_s": args.fc_ms / 1e3, "given": True}
    else:
        compute = measure_compute(cfg, batch, s["device"], repeats=1 if tiny else 3)
    model = modelled(cfg, compute, args.per_gpu_batch)
    rows = (
        []
        if args.no_rows
        else measured_rows(cfg, batch, threads, 1, 2 if tiny else 3, s["cpu_memory"])
    )
    result = {"compute": compute, "model": model, "measured": rows}
    print_schemes(result, args.per_gpu_batch)
    return result


def print_schemes(result: dict, b: int) -> None:
    c = result["compute"]
    source = (
        "given"
        if c.get("given")
        else f"measured on {c['device']}, batch {c['batch']}, {c['threads']} threads"
    )
    print(
        f"\nMODEL (not a measurement): step = b x ({c['conv_s'] * 1e3:.2f} ms conv + "
        f"{c['fc_s'] * 1e3:.2f} ms fc per image, {source}) + bytes / link + latency, no overlap; "
        f"b = {b} per device; speedup over 1 device"
    )
    header = ["link", "scheme", *[f"K={k}" for k in RANKS]]
    rows = []
    for link in dict.fromkeys(r["link"] for r in result["model"]):
        for scheme in SCHEMES:
            mine = {
                r["ranks"]: r
                for r in result["model"]
                if r["link"] == link and r["scheme"] == scheme
            }
            rows.append([link, scheme, *(f"{mine[k]['speedup']:.2f}x" for k in RANKS)])
    benchkit.print_table(header, rows)
    if not result["measured"]:
        return
    print("\nmeasured on this CPU, gloo ranks (median [min-max] ms per training step):")
    benchkit.print_table(
        ["scheme", "ranks", "thr/rank", "batch", "step ms", "images/s"],
        [
            [
                r["scheme"],
                r["ranks"],
                r["threads_per_rank"],
                r["batch"],
                f"{r['step_s']['median'] * 1e3:.0f} [{r['step_s']['min'] * 1e3:.0f}-"
                f"{r['step_s']['max'] * 1e3:.0f}]",
                f"{r['images_per_s']:.1f}",
            ]
            for r in result["measured"]
        ],
    )
