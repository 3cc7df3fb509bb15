"""Kernels of a run: torch.compile that cannot break it, determinism, and when each is on.

Proves, on the CPU: a compile backend that raises leaves the run eager with one warning
naming the cause, and a whole training run with such a backend completes; a working backend
compiles during the warm-up, before the first real step, and the warm-up leaves no trace
(gradients, dropout draw counters, random state); across ranks a compile failure is an error
naming the fix instead of a silent desync; `train.deterministic` sets CUBLAS_WORKSPACE_CONFIG,
deterministic algorithms and cuDNN's flags, and GPU runs otherwise autotune; 'auto' compiles
only a one-process GPU run.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repro.config import Config, DataConfig, ModelConfig, TrainConfig, WandbConfig
from repro.net.dist import Layout, single_process_layout
from repro.net.model import AlexNet
from repro.run import kernels
from repro.run.train import switches, train

SMALL = ModelConfig(num_classes=5, widths=(4, 4, 4, 4, 4), fc_width=8, image_size=64)


def no_autocast():
    return torch.autocast("cpu", enabled=False)


def draws(model: AlexNet) -> list[int]:
    return [t.dropout_draws for t in model.towers.values()]


def test_failing_backend_falls_back_to_eager_with_one_warning():
    def broken(gm, example_inputs):
        raise RuntimeError("no C compiler found (cc)")

    model = AlexNet(SMALL, seed=0).train()
    example = torch.zeros(2, 3, 64, 64)
    layout = single_process_layout()
    with pytest.warns(RuntimeWarning) as caught:
        forward, reason = kernels.compile_model(model, example, no_autocast, layout, broken)
    assert forward is model  # eager
    assert "no C compiler found (cc)" in reason
    assert len(caught) == 1 and "no C compiler found (cc)" in str(caught[0].message)
    assert "train.compile=off" in str(caught[0].message)
    assert draws(model) == [0, 0] and all(p.grad is None for p in model.parameters())


def test_working_backend_compiles_in_the_warm_up_and_leaves_no_trace():
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = AlexNet(SMALL, seed=0).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    rng = torch.get_rng_state()
    example = torch.zeros(2, 3, 64, 64)
    forward, reason = kernels.compile_model(
        model, example, no_autocast, single_process_layout(), counting
    )
    assert reason is None and forward is not model
    compiled_in_warm_up = len(graphs)
    assert compiled_in_warm_up > 0  # Dynamo traced the net before any real step
    assert draws(model) == [0, 0]  # the warm-up's dropout draw was undone
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k

    x = torch.randn(2, 3, 64, 64)
    out = forward(x)  # the first real step: no new compile
    assert len(graphs) == compiled_in_warm_up
    eager = AlexNet(SMALL, seed=0).train()
    torch.testing.assert_close(out, eager(x))  # the same dropout masks (draw 0), the same net


def test_compile_failure_across_ranks_names_the_fix():
    def broken(gm, example_inputs):
        raise RuntimeError("triton missing")

    model = AlexNet(SMALL, seed=0)
    two_ranks = dataclasses.replace(single_process_layout(), world_size=2, rank=1)
    with pytest.raises(kernels.CompileError, match="rank 1 .*triton missing.*train.compile=off"):
        kernels.compile_model(model, torch.zeros(2, 3, 64, 64), no_autocast, two_ranks, broken)


def test_training_run_with_a_broken_compiler_completes(tmp_path: Path, monkeypatch):
    """train.compile=on where Inductor cannot build: the run warns once and trains eagerly."""

    def broken(gm, example_inputs):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler")

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend=broken))
    cfg = Config(
        model=SMALL,
        data=DataConfig(source="synthetic", crop=64, synthetic_images=16),
        train=TrainConfig(
            epochs=1, batch_size=8, device="cpu", compile="on", run_dir=str(tmp_path / "run"),
            log_every=1, final_ten_patch=False, max_steps=1,
        ),
        wandb=WandbConfig(mode="disabled"),
    )  # fmt: skip
    with pytest.warns(RuntimeWarning, match="InvalidCxxCompiler"):
        last = train(cfg, single_process_layout(2, "cpu"))
    assert last["loss"] == last["loss"]  # trained (finite) eagerly
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()  # stopped mid-epoch


@pytest.fixture
def restore_flags(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[1:]


def test_deterministic_sets_what_cuda_needs(restore_flags):
    kernels.kernel_flags(True, torch.device("cuda", 0))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


def test_deterministic_keeps_a_users_cublas_setting(restore_flags, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    kernels.deterministic_env(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_otherwise_gpu_runs_autotune_and_cpu_runs_do_not(restore_flags):
    kernels.kernel_flags(False, torch.device("cuda", 0))
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    kernels.kernel_flags(False, torch.device("cpu"))
    assert not torch.backends.cudnn.benchmark


def test_eager_flags_do_not_import_the_compiler():
    """torch.use_deterministic_algorithms imports torch._inductor (1.4 s of each process's
    start on 2 cores): an eager run that keeps the default setting must not pay for it."""
    code = (
        "import sys, torch; from repro.run.kernels import kernel_flags; "
        "kernel_flags(False, torch.device('cpu')); print('torch._inductor' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"], out.stderr[-2000:]


def layout_on(device: str, world_size: int) -> Layout:
    return dataclasses.replace(single_process_layout(2, device), world_size=world_size)


def test_auto_compiles_only_a_one_process_gpu_run():
    cfg = Config()  # precision, channels_last and compile all 'auto'
    assert switches(cfg, layout_on("cuda", 1)) == (True, True, True)
    assert switches(cfg, layout_on("cuda", 2)) == (True, True, False)  # collectives: no
    assert switches(cfg, layout_on("cpu", 1)) == (False, False, False)
    forced = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile="on"))
    assert switches(forced, layout_on("cuda", 2))[2]


FAULTS_SCRIPT = """
import resource, sys, torch
from repro.run import kernels
took = kernels.cpu_memory(sys.argv[1], torch.device("cpu"))
def faults_of_one_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)  # 64 MiB, made and freed: one large activation of a step
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults = [faults_of_one_step() for _ in range(12)]
# The first steps fault in either way: under 'keep' the heap grows until a freed 64 MiB block
# stays whole for the next step (measured: 1 to 5 steps, as small allocations land in a freed
# block and split it); the last steps show the settled state.
print(took, min(faults[-4:]), max(faults[-4:]))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_cpu_memory_keep_stops_page_faults_of_every_step():
    """'keep': once the heap has grown to the step's peak, a freed 64 MiB tensor's pages are
    reused by the next one; 'release' (glibc's default) unmaps them and every allocation
    faults all 16,384 pages in again."""
    import subprocess
    import sys

    def run(mode: str) -> tuple[str, int, int]:
        out = subprocess.run(
            [sys.executable, "-c", FAULTS_SCRIPT, mode],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout.split()
        return out[0], int(out[1]), int(out[2])

    took, _, kept_faults = run("keep")
    released, released_faults, _ = run("release")
    assert (took, released) == ("True", "False")
    assert released_faults > 10_000  # each of the last 4 steps: 64 MiB / 4 KiB pages
    assert kept_faults < 1_000  # none of the last 4 steps


def test_cpu_memory_only_on_cpu_runs_and_names_bad_values():
    assert kernels.cpu_memory("keep", torch.device("cuda", 0)) is False  # CUDA caches itself
    with pytest.raises(ValueError, match="train.cpu_memory='lots'.*'keep' or 'release'"):
        kernels.cpu_memory("lots", torch.device("cpu"))
    from repro.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.cpu_memory = 'lots'.*'keep', 'release'"):
        load_config("configs/paper.yaml", ["train.cpu_memory=lots"])
