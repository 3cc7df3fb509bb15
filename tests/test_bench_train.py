"""The model benchmarks: exchange volume, the stand-in exchanges, and every bench sub-command.

Proves, never asserting speed: the bytes per image counted at each cross-tower link equal
the numbers worked out by hand from PAPER.md §1 (conv3 reads 128x13x13 per tower, after
pool2; 128x27x27 before it would be a different figure), and the net itself sends exactly
those shapes through its exchanges, so moving an exchange in model.py fails here; the link
model adds bytes / bandwidth and latency per collective; recorded collective times are
attributed to the right links; `bench.py train`, `infer`, `exchange` and `data` run on the
CPU with tiny settings and write JSON whose figures agree with each other (images/s =
batch / median step time over every round, MFU = FLOP/s / peak, the 2-rank / 1-process
ratio, the projection = one tower + modelled link) beside the machine, versions, git
revision and load average.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from repro.bench.traffic import (
    LinkModel,
    attribute_calls,
    exchange_volume,
    local_collectives,
    modelled_seconds,
    one_tower_layout,
)
from repro.bench.train import TINY, flops_per_image
from repro.config import ModelConfig
from repro.net.model import AlexNet

ROOT = Path(__file__).resolve().parents[1]
PAPER = ModelConfig()

# PAPER.md §1, per tower and per image; forward: the share one rank sends (all_gather on 2
# ranks), backward: the whole gathered gradient one rank sends in a 2-rank all_reduce.
HAND = {
    "conv3": (128 * 13 * 13, 256 * 13 * 13),  # pool2 output, 13x13x128 per tower
    "fc6": (128 * 6 * 6, 256 * 6 * 6),  # pool5 output flattened: 4608 per tower, 9216 in all
    "fc7": (2048, 4096),
    "fc8": (2048, 4096),
    "logits": (500, 0),  # 1000 classes / 2; backward keeps the own slice, sends nothing
}
PRE_POOL2 = 128 * 27 * 27  # what conv3's link would carry if it exchanged before pool2


def test_exchange_volume_of_the_paper_net_is_the_hand_count():
    volume = exchange_volume(PAPER)
    assert [v["link"] for v in volume] == list(HAND)
    for v in volume:
        forward, backward = HAND[v["link"]]
        assert (v["forward_elements"], v["backward_elements"]) == (forward, backward)
        assert (v["forward_bytes"], v["backward_bytes"]) == (4 * forward, 4 * backward)
        assert v["backward_needed_elements"] == backward // 2  # a reduce_scatter's share
    assert volume[0]["forward_elements"] != PRE_POOL2
    assert sum(v["forward_bytes"] for v in volume) == 4 * 30_836  # 123,344 B per image
    assert sum(v["backward_bytes"] for v in volume) == 4 * 60_672
    bf16 = exchange_volume(PAPER, dtype_bytes=2)
    assert [v["forward_bytes"] for v in bf16] == [2 * f for f, _ in HAND.values()]


def test_variants_change_the_volume():
    assert exchange_volume(dataclasses.replace(PAPER, towers=1)) == []
    fc8_only = exchange_volume(dataclasses.replace(PAPER, exchange="fc8_only"))
    assert [v["link"] for v in fc8_only] == ["fc8", "logits"]
    odd = exchange_volume(dataclasses.replace(PAPER, num_classes=7))
    assert odd[-1]["forward_elements"] == 4  # 4 + 3 classes: the wider share is padded


def test_the_net_sends_what_the_volume_counts():
    """One tower of the paper's net, stand-in exchanges recording every collective."""
    model = AlexNet(PAPER, one_tower_layout())
    calls: list = []
    with local_collectives(calls):
        logits = model(torch.randn(2, 3, 224, 224))
        F.cross_entropy(logits, torch.tensor([1, 999])).backward()
    assert logits.shape == (2, 1000)
    gathers = [shape for op, shape, _, _ in calls if op == "all_gather"]
    reduces = [shape for op, shape, _, _ in calls if op == "all_reduce"]
    assert gathers[0] == (2, 128, 13, 13)  # after pool2, not (2, 128, 27, 27)
    per_image = lambda shape: torch.Size(shape[1:]).numel()  # noqa: E731
    volume = exchange_volume(PAPER)
    assert [per_image(s) for s in gathers] == [v["forward_elements"] for v in volume]
    summed = [v["backward_elements"] for v in volume if v["backward"] == "all_reduce"]
    assert [per_image(s) for s in reversed(reduces)] == summed
    assert model.towers["0"].conv1.weight.grad is not None


def test_link_model_and_call_attribution():
    volume = exchange_volume(PAPER)
    link = LinkModel("PCIe", 25.0, 10.0)
    expected = (4 * 30_836 + 4 * 60_672) * 128 / 25e9 + 9 * 10e-6  # 5 gathers + 4 reduces
    assert modelled_seconds(volume, 128, link, backward=True) == pytest.approx(expected)
    assert modelled_seconds(volume, 128, link, backward=False) == pytest.approx(
        4 * 30_836 * 128 / 25e9 + 5 * 10e-6
    )
    step = [("all_gather", (), 4, 0.1 * (i + 1)) for i in range(5)]
    step += [("all_reduce", (), 4, 1.0 + i) for i in range(4)]  # fc8, fc7, fc6, conv3
    totals = attribute_calls(volume, step * 2, steps=2, backward=True)
    assert totals[("conv3", "forward")] == pytest.approx(0.2)
    assert totals[("logits", "forward")] == pytest.approx(1.0)
    assert totals[("fc8", "backward")] == pytest.approx(2.0)
    assert totals[("conv3", "backward")] == pytest.approx(8.0)
    with pytest.raises(ValueError, match="collectives per step"):
        attribute_calls(volume, step[:-1], steps=1, backward=True)


# -- the sub-commands, end to end on the CPU ------------------------------------------------


def bench(*argv: str) -> None:
    spec = importlib.util.spec_from_file_location("bench_launcher", ROOT / "launch" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(list(argv)) == 0


def check_context(result: dict) -> None:
    ctx = result["context"]
    assert ctx["machine"]["cpu"] and ctx["machine"]["cores"] >= 1
    assert ctx["versions"]["torch"] == torch.__version__ and "dali" in ctx["versions"]
    assert ctx["git_revision"] is None or len(ctx["git_revision"]) >= 40
    assert len(ctx["load_average_start"]) == 3 and len(ctx["load_average_end"]) == 3


def check_row(row: dict, mode: str, peaks: dict, measurements: int = 2) -> None:
    st = row["step_s"]
    assert 0 < st["min"] <= st["median"] <= st["max"] and st["n"] == measurements
    assert row["images_per_s"] == pytest.approx(row["batch"] / st["median"])
    assert row["flop_s"] == pytest.approx(flops_per_image(TINY, mode) * row["images_per_s"])
    peak = peaks[row["precision"]]["flop_s"] * row["mfu_devices"]
    assert row["mfu"] == pytest.approx(row["flop_s"] / peak)


def test_bench_train_one_process_and_two_ranks(tmp_path, capsys):
    out = tmp_path / "train.json"
    argv = ["--tiny", "--layouts", "1", "2", "--threads", "2", "--rounds", "2"]
    bench("train", *argv, "--out", str(out))
    printed = capsys.readouterr().out
    assert "images/s" in printed and "2 ranks / 1 process" in printed
    result = json.loads(out.read_text())
    check_context(result)
    rows = result["rows"]
    assert [(r["world_size"], r["threads_per_rank"]) for r in rows] == [(1, 2), (2, 1)]
    for row in rows:
        check_row(row, "train", result["peaks"], measurements=2 * 2)  # repeats x rounds
    assert result["settings"]["flops_per_image"] == flops_per_image(TINY, "train")
    (check,) = result["checks"]
    ratio = rows[1]["step_s"]["median"] / rows[0]["step_s"]["median"]
    assert check["ratio_2_ranks_to_1_process"] == pytest.approx(ratio)
    assert check["met"] == (ratio <= 1.15)


def test_bench_infer_replicas_and_projection(tmp_path):
    out = tmp_path / "infer.json"
    bench(
        "infer", "--tiny", "--layouts", "4", "--project", "--bandwidth-gbs", "25", "--out", str(out)
    )
    result = json.loads(out.read_text())
    check_context(result)
    measured, projected = result["rows"]
    assert measured["world_size"] == 4 and "2 replicas" in measured["layout"]
    assert projected["layout"].startswith("PROJECTION") and projected["mfu_devices"] == 2
    for row in result["rows"]:
        check_row(row, "infer", result["peaks"])
    p = projected["projection"]
    modelled = modelled_seconds(exchange_volume(TINY), 4, LinkModel("", 25.0, 10.0), False)
    assert p["modelled_exchange_s"] == pytest.approx(modelled)
    assert projected["step_s"]["median"] == pytest.approx(
        p["one_tower_step_s"]["median"] + modelled
    )


def test_bench_exchange_volume_and_measured_times(tmp_path):
    out = tmp_path / "exchange.json"
    bench("exchange", "--tiny", "--batch", "4", "--out", str(out))
    result = json.loads(out.read_text())
    check_context(result)
    volume = {v["link"]: v for v in result["volume"]}
    assert volume["conv3"]["forward_elements"] == 12 * 3 * 3  # TINY: 12 channels, 3x3 pool2
    assert volume["conv3"]["step_bytes"] == 4 * (108 + 216) * 4
    m = result["measured"]
    assert m["step_s"]["n"] == m["standin_step_s"]["n"] == 2
    links = {(x["link"], x["direction"]) for x in m["links"]}
    assert links == {(k, "forward") for k in volume} | {
        (k, "backward") for k in ("conv3", "fc6", "fc7", "fc8")
    }
    assert m["exchange_s_timed_calls"]["median"] > 0


def test_bench_data_runs_tiny(tmp_path):
    out = tmp_path / "data.json"
    bench(
        "data",
        "--images",
        "8",
        "--size",
        "96",
        "80",
        "--workers",
        "1",
        "--batch",
        "2",
        "--batches",
        "2",
        "--out",
        str(out),
    )
    result = json.loads(out.read_text())
    assert result["dali"]["images"] == result["dataloader"]["images"] == 4
