"""The three schemes' traffic and step model (repro/bench/schemes.py), never asserting speed.

Proves: the bytes one rank sends per step under 'data', 'towers' and 'owt' equal the counts
worked out by hand from PAPER.md §1 and §7 (60,965,224 parameters, 2,334,080 of them in the
convolutions; pool5 9216 per image, fc6/fc7 4096 units, 1000 classes), with ring collectives;
the modelled step adds bytes / bandwidth and a latency per collective to the compute.
"""

from __future__ import annotations

import pytest

from repro.bench.schemes import modelled, parameters, traffic, traffic_table
from repro.bench.traffic import LinkModel
from repro.config import ModelConfig

PAPER = ModelConfig()
P, P_CONV = 60_965_224, 2_334_080


def by_link(rows: list[dict]) -> dict[tuple[str, str], int]:
    return {(r["link"], r["op"]): r["bytes"] for r in rows}


def test_parameter_split_is_the_paper_nets():
    assert parameters(PAPER) == (P_CONV, P - P_CONV)


def test_data_parallel_sends_every_gradient_twice_over_a_ring():
    for k in (2, 4, 8, 16):
        (row,) = traffic(PAPER, "data", k, 128)
        assert row["bytes"] == round(2 * (k - 1) / k * P) * 4
        assert row["bytes_per_image"] == row["bytes"] / 128
    assert traffic(PAPER, "data", 1, 128) == []


def test_owt_sends_activations_and_only_the_convolution_gradients():
    got = by_link(traffic(PAPER, "owt", 4, 128))
    assert got[("pool5 (fc6 input)", "all_gather")] == 3 * 128 * 9216 * 4
    assert got[("pool5 (fc6 input)", "reduce_scatter")] == 3 * 128 * 9216 * 4
    # A rank's 1024 of fc6's 4096 units for all 512 images go to the 3 others.
    assert got[("fc6 -> fc7", "all_gather")] == 3 * 512 * 1024 * 4
    assert got[("fc7 -> fc8", "reduce_scatter")] == 3 * 512 * 1024 * 4
    assert got[("logits", "all_gather")] == 3 * 512 * 250 * 4
    assert got[("labels", "all_gather")] == 3 * 128 * 8
    assert got[("conv gradients", "all_reduce")] == round(1.5 * P_CONV) * 4
    assert not any("fc" in link and "gradients" in link for link, _ in got)
    # 1000 classes on 16 ranks: shares of 63 and 62, padded to 63 for the gather.
    logits16 = by_link(traffic(PAPER, "owt", 16, 128))[("logits", "all_gather")]
    assert logits16 == 15 * 16 * 128 * 63 * 4


def test_towers_sends_the_five_links_for_its_replica_and_half_the_gradients():
    two = sum(r["bytes"] for r in traffic(PAPER, "towers", 2, 128))
    # README's per-image figures (123,344 forward all-gather + 121,344 backward reduce-scatter,
    # issue #12) for 2 x 128 images.
    assert two == (123_344 + 121_344) * 256
    four = by_link(traffic(PAPER, "towers", 4, 128))
    assert four[("gradients", "all_reduce")] == round(P / 2) * 4  # 2 replicas: 2 (R-1)/R = 1
    with pytest.raises(ValueError, match="multiple of 2"):
        traffic(PAPER, "towers", 3, 128)


def test_table_covers_every_scheme_and_rank_count():
    table = traffic_table(PAPER, 128)
    assert {(r["scheme"], r["ranks"]) for r in table} == {
        (s, k) for s in ("data", "towers", "owt") for k in (2, 4, 8, 16)
    }
    owt2 = next(r for r in table if r["scheme"] == "owt" and r["ranks"] == 2)
    data2 = next(r for r in table if r["scheme"] == "data" and r["ranks"] == 2)
    assert owt2["bytes_per_step"] < data2["bytes_per_step"] / 8  # the point of the trick


def test_modelled_step_is_compute_plus_bytes_over_the_link_plus_latency():
    link = LinkModel("test", 25.0, 10.0)
    rows = modelled(PAPER, {"conv_s": 1e-3, "fc_s": 0.0}, 128, links=(link,))
    row = next(r for r in rows if r["scheme"] == "data" and r["ranks"] == 2)
    comm = round(P) * 4 / 25e9 + 10e-6  # one all-reduce of every gradient, 2 (K-1)/K = 1
    assert row["step_s"] == pytest.approx(0.128 + comm, rel=1e-9)
    assert row["speedup"] == pytest.approx(2 * 0.128 / (0.128 + comm), rel=1e-9)


def test_measured_compute_runs_the_linked_fc_layers():
    """`bench.py train --schemes` times fc6-fc8 alone through the towers' linked layers (it
    called them with one tensor, as before issue #12, and crashed); both shares are positive."""
    from repro.bench.schemes import measure_compute
    from repro.bench.train import TINY

    compute = measure_compute(TINY, batch=2, repeats=1)
    assert compute["batch"] == 2 and compute["fc_s"] > 0 and compute["conv_s"] >= 0
