"""`bench.py exchange`: what the towers send each other, and what it costs on 2 ranks.

    python launch/bench.py exchange                    # CPU: gloo, batch 32
    python launch/bench.py exchange --batch 128 --precision bf16   # 2 GPUs: NCCL
    python launch/bench.py exchange --mode infer --batch 64

Two tables. The first is derived from the layer shapes (repro.bench.traffic.exchange_volume):
bytes per image one rank sends at each cross-tower link, forward (all_gather of its share)
and backward (reduce_scatter: the other tower's share of the gradient, the same count; what
an all_reduce of the whole gradient would send beside it), and the time each would take
over the assumed links.

The second is measured on 2 ranks, one tower each, by two methods, interleaved:
- stand-in difference: the training step as it is, minus the same step with stand-in
  collectives that copy locally and send nothing (same shapes, same local copies); the
  difference is the exchange time the step could not hide (transfers + waiting for the peer);
- timed collectives: every collective timed on its own (device synchronized before and
  after; an async one until its wait returns), attributed to its link, with the bytes the
  rank really sent per image, checked against the derived table, and the bandwidth reached.
Where fewer than 2 devices are at hand (one GPU) the second table is not measured.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from repro.bench import kit as benchkit
from repro.bench import schemes
from repro.bench.step import Case, Job, rank_main
from repro.bench.traffic import LinkModel, dtype_bytes, exchange_volume, modelled_seconds
from repro.bench.train import TINY
from repro.config import ModelConfig
from repro.net.dist import LayoutError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gpu = torch.cuda.is_available()
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--batch", type=benchkit.at_least(1), default=128 if gpu else 32, help="global batch"
    )
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument(
        "--mode", choices=("train", "infer"), default="train", help="the step measured on 2 ranks"
    )
    parser.add_argument(
        "--threads",
        type=benchkit.at_least(0),
        default=0,
        help="total torch threads, split over 2 ranks (0: cores)",
    )
    parser.add_argument("--warmup", type=benchkit.at_least(0), default=2)
    parser.add_argument(
        "--steps", type=benchkit.at_least(1), default=2, help="steps per measurement"
    )
    parser.add_argument("--repeats", type=benchkit.at_least(1), default=5)
    parser.add_argument("--classes", type=benchkit.at_least(2), default=1000)
    parser.add_argument(
        "--bandwidth-gbs",
        type=float,
        nargs="+",
        default=[300.0, 25.0],
        help="assumed links for the modelled times (GB/s one way; NVLink-class, PCIe-class)",
    )
    parser.add_argument("--latency-us", type=float, default=10.0, help="per collective")
    parser.add_argument("--tiny", action="store_true", help="a tiny net and 1-step runs (tests)")
    parser.add_argument(
        "--profile", default="", metavar="DIR", help="also profile the real step: traces to DIR"
    )
    parser.add_argument("--out", help="JSON file (default runs/bench/exchange.json)")
    parser.add_argument(
        "--per-gpu-batch", type=benchkit.at_least(1), default=128, help="b of the schemes table"
    )


def volume_rows(
    cfg: ModelConfig, precision: str, batch: int, links: list[LinkModel], backward: bool = True
) -> list:
    """The derived table: per link, bytes per image and per step, modelled ms per link."""
    rows = []
    for v in exchange_volume(cfg, dtype_bytes(precision)):
        per_step = (v["forward_bytes"] + (v["backward_bytes"] if backward else 0)) * batch
        modelled = {link.name: 1e3 * modelled_seconds([v], batch, link, backward) for link in links}
        rows.append({**v, "step_bytes": per_step, "modelled_ms": modelled})
    return rows


def run(args: argparse.Namespace) -> dict:
    gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = "cuda" if gpu else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LayoutError("--device cuda but no CUDA GPU is visible")
    cfg = TINY if args.tiny else ModelConfig(num_classes=args.classes)
    links = [LinkModel(f"{bw:g} GB/s", bw, args.latency_us) for bw in args.bandwidth_gbs]
    threads = args.threads or len(os.sched_getaffinity(0))
    warmup, steps, repeats = (1, 1, 2) if args.tiny else (args.warmup, args.steps, args.repeats)
    ctx = benchkit.context()
    print(f"bench exchange: {benchkit.describe_context(ctx)}")
    volume = volume_rows(cfg, args.precision, args.batch, links, args.mode == "train")
    measured, notes = None, []
    if device == "cuda" and torch.cuda.device_count() < 2:
        visible = torch.cuda.device_count()
        notes.append(f"2-rank exchange times not measured: needs 2 GPUs, {visible} visible")
    else:
        job = Job(
            args.mode,
            cfg,
            device,
            (Case(args.batch, args.precision),),
            warmup,
            steps,
            repeats,
            variants=("real", "standin", "timed"),
            profile_dir=args.profile,
        )
        per_rank = max(1, threads // 2)
        measured = summarize(benchkit.run_ranks(rank_main, 2, (job,), per_rank)[0], volume)
        measured["threads_per_rank"] = per_rank
    result = {
        "command": "exchange",
        "settings": {
            "device": device,
            "mode": args.mode,
            "batch": args.batch,
            "precision": args.precision,
            "threads": threads,
            "warmup": warmup,
            "steps": steps,
            "repeats": repeats,
            "links": [vars(link) for link in links],
            "tiny": args.tiny,
        },
        "volume": volume,
        "measured": measured,
        "notes": notes,
        "context": ctx,
        "schemes": schemes.traffic_table(cfg, args.per_gpu_batch, dtype_bytes(args.precision)),
    }
    print_result(result)
    schemes.print_traffic(result["schemes"])  # data / towers / owt on K = 2, 4, 8, 16
    benchkit.write_json(args.out or "runs/bench/exchange.json", result)
    return result


def summarize(r: dict, volume: list[dict]) -> dict:
    """Medians over repeats: step with and without communication, per-link times and bytes."""
    real, standin = r["step_s"]["real"], r["step_s"]["standin"]
    diffs = [a - b for a, b in zip(real, standin)]  # paired: taken back to back
    per_link = []
    for v in volume:
        for direction in ("forward", "backward"):
            key = f"{v['link']}/{direction}"
            got = [rep[key] for rep in r["link_s"] if key in rep]
            if not got:
                continue
            seconds = statistics.median(got)
            measured = r["sent_bytes_per_image"][key]
            sent = measured * r["case"].batch
            per_link.append(
                {
                    "link": v["link"],
                    "direction": direction,
                    "op": v[direction],
                    "bytes_per_image": measured,
                    "derived_bytes_per_image": v[f"{direction}_bytes"],
                    "bytes_sent_per_rank": sent,
                    "seconds": benchkit.spread(got),
                    "effective_gb_s": sent / seconds / 1e9 if seconds > 0 else None,
                }
            )
    calls = [sum(t for k, t in rep.items() if not k.startswith("replicas")) for rep in r["link_s"]]
    return {
        "layout": r["layout"],
        "step_s": benchkit.spread(real),
        "standin_step_s": benchkit.spread(standin),
        "timed_step_s": benchkit.spread(r["step_s"]["timed"]),
        "exchange_s_standin_difference": benchkit.spread(diffs),
        "exchange_s_timed_calls": benchkit.spread(calls),
        "links": per_link,
        "bytes_match_derived": all(
            x["bytes_per_image"] == x["derived_bytes_per_image"] for x in per_link
        ),
        "profile": r.get("profile"),
    }


def print_result(result: dict) -> None:
    s = result["settings"]
    names = [link["name"] for link in s["links"]]
    print(
        f"\nderived from the layer shapes ({s['precision']}, batch {s['batch']}; "
        "bytes one rank sends; received = sent on 2 ranks):"
    )
    header = ["link", "per tower", "fwd B/img", "bwd B/img", "all_reduce B/img", "MB/step"]
    header += [f"ms @ {n}" for n in names]
    rows = [
        [
            v["link"],
            "x".join(map(str, v["shape"])),
            f"{v['forward_bytes']:,}",
            f"{v['backward_bytes']:,}",
            f"{v['allreduce_bytes']:,}",
            f"{v['step_bytes'] / 1e6:.2f}",
            *(f"{v['modelled_ms'][n]:.3f}" for n in names),
        ]
        for v in result["volume"]
    ]
    total = lambda k: sum(v[k] for v in result["volume"])  # noqa: E731
    rows.append(
        [
            "total",
            "",
            f"{total('forward_bytes'):,}",
            f"{total('backward_bytes'):,}",
            f"{total('allreduce_bytes'):,}",
            f"{total('step_bytes') / 1e6:.2f}",
            *(f"{sum(v['modelled_ms'][n] for v in result['volume']):.3f}" for n in names),
        ]
    )
    benchkit.print_table(header, rows)
    print(
        "(bwd: reduce_scatter, the other tower's share; all_reduce: what an all_reduce of the "
        "whole gradient would send)"
    )
    m = result["measured"]
    if m is None:
        for n in result["notes"]:
            print(f"note: {n}")
        return
    ms = lambda st: f"{st['median'] * 1e3:.1f} [{st['min'] * 1e3:.1f}-{st['max'] * 1e3:.1f}]"  # noqa: E731
    print(
        f"\nmeasured on {m['layout'].split(';')[0]}, {m['threads_per_rank']} thread(s) per rank "
        f"(median [min-max] ms per {s['mode']} step):"
    )
    cost = m["exchange_s_standin_difference"]
    share = ""
    if cost["min"] > 0:
        low, high = cost["min"] / m["step_s"]["max"], cost["max"] / m["step_s"]["min"]
        share = f" = {100 * cost['median'] / m['step_s']['median']:.0f}% of the step"
        share += f" [{100 * low:.0f}-{100 * high:.0f}%]"
    benchkit.print_table(
        ["what", "ms"],
        [
            ["step, real exchanges", ms(m["step_s"])],
            ["step, stand-in exchanges (no communication)", ms(m["standin_step_s"])],
            ["exposed exchange = real - stand-in (paired)", benchkit.ms_interval(cost) + share],
            ["step, collectives timed one by one", ms(m["timed_step_s"])],
            ["time the timed collectives held the rank", ms(m["exchange_s_timed_calls"])],
        ],
    )
    print()
    benchkit.print_table(
        ["link", "direction", "op", "B/img sent", "= derived", "MB sent/rank", "ms held", "GB/s"],
        [
            [
                x["link"],
                x["direction"],
                x["op"],
                f"{x['bytes_per_image']:,}",
                "yes" if x["bytes_per_image"] == x["derived_bytes_per_image"] else "NO",
                f"{x['bytes_sent_per_rank'] / 1e6:.2f}",
                f"{x['seconds']['median'] * 1e3:.2f}",
                "-" if x["effective_gb_s"] is None else f"{x['effective_gb_s']:.2f}",
            ]
            for x in m["links"]
        ],
    )
    print(
        "(bytes read off the collectives the net really called; 'ms held' includes waiting for "
        "the other rank, and for an overlapped exchange only the part not hidden by arithmetic)"
    )
    if m.get("profile"):
        print(f"\nprofile of the real step, rank 0 (trace {m['profile']['trace']}):")
        print(m["profile"]["table"])
