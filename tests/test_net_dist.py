"""Device choice never strands a user: the device every rank gets for each GPU count.

With the GPU count patched (0, 1, 2, 8 GPUs) and 1, 2 or 4 local ranks, proves: 'auto' gives
every local rank its own GPU when there are enough, and otherwise puts every rank on the CPU
with one line (printed once per node) saying why and how to use the GPU; 'cuda' with too few
GPUs is an error naming both counts; 'cpu' is the CPU whatever is visible; and
init_distributed reads torchrun's LOCAL_WORLD_SIZE to decide.
"""

from __future__ import annotations

import pytest
import torch

from repro.net import dist
from repro.net.dist import LayoutError


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine shows n GPUs (no CUDA call is made)."""

    def show(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return show


CASES = [(g, r) for g in (0, 1, 2, 8) for r in (1, 2, 4)]


@pytest.mark.parametrize("count, ranks", CASES, ids=[f"{g}gpu-{r}ranks" for g, r in CASES])
def test_auto_gives_each_rank_its_own_gpu_or_everyone_the_cpu(gpus, capsys, count, ranks):
    gpus(count)
    devices = [dist.resolve_device("auto", r, ranks) for r in range(ranks)]
    err = capsys.readouterr().err
    if count >= ranks:
        assert devices == [torch.device("cuda", r) for r in range(ranks)]
        assert err == ""
    else:
        assert devices == [torch.device("cpu")] * ranks  # the same backend (gloo) everywhere
        if count == 0:
            assert err == ""  # nothing to explain on a CPU-only machine
        else:
            lines = err.strip().splitlines()
            assert len(lines) == 1, lines  # local rank 0 alone says it
            assert f"{ranks} ranks on this node but {count} GPU(s) visible" in lines[0]
            assert "python launch/train.py" in lines[0]  # how to use the GPU after all


@pytest.mark.parametrize("count, ranks", CASES, ids=[f"{g}gpu-{r}ranks" for g, r in CASES])
def test_cuda_needs_a_gpu_per_local_rank(gpus, count, ranks):
    gpus(count)
    if count >= ranks:
        assert dist.resolve_device("cuda", ranks - 1, ranks) == torch.device("cuda", ranks - 1)
        return
    with pytest.raises(LayoutError) as caught:
        dist.resolve_device("cuda", 0, ranks)
    message = str(caught.value)
    assert "\n" not in message
    if count == 0:
        assert "no CUDA GPU is visible" in message
    else:
        assert f"{ranks} ranks on this node but {count} GPU(s) visible" in message
        assert f"--nproc_per_node {count}" in message


@pytest.mark.parametrize("count", [0, 1, 8])
def test_cpu_is_the_cpu(gpus, count):
    gpus(count)
    assert dist.resolve_device("cpu", 1, 2) == torch.device("cpu")


def test_bad_names_and_ranks_are_refused():
    with pytest.raises(LayoutError, match="'auto', 'cpu' or 'cuda'"):
        dist.choose_device("gpu", 0, 1, 1)
    with pytest.raises(LayoutError, match="outside 0..1"):
        dist.choose_device("auto", 2, 2, 8)


def test_one_gpu_quick_start_runs_one_process_on_the_gpu(gpus, monkeypatch):
    """`python launch/train.py` on a one-GPU machine: both towers on GPU 0, no process group."""
    gpus(1)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    layout = dist.init_distributed(towers=2, device="auto")
    assert layout.device == torch.device("cuda", 0) and layout.local_towers == (0, 1)
    assert not torch.distributed.is_initialized()


def test_init_distributed_decides_from_local_world_size(gpus, monkeypatch):
    """torchrun --nproc_per_node 2 on one GPU: the choice is made from LOCAL_WORLD_SIZE, and
    'cuda' fails before any process group forms."""
    gpus(1)
    monkeypatch.setenv("WORLD_SIZE", "4")  # 2 nodes x 2 ranks
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(LayoutError, match="2 ranks on this node but 1 GPU"):
        dist.init_distributed(towers=2, device="cuda")
    assert not torch.distributed.is_initialized()
