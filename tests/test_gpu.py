"""The GPU paths against the CPU reference: what a first run on real hardware exercises.

Marked `gpu` and skipped without a CUDA device (tests/conftest.py); the 2-GPU tests also
skip with one GPU, the DALI test without DALI. Proves, with the tolerance stated per mode:
- the net on the GPU computes the CPU's logits (fp32, TF32 off);
- training steps on the GPU (§5's SGD) follow the CPU fp32 run in fp32, bf16,
  bf16 + channels_last, and bf16 + channels_last + torch.compile (what `auto` picks for a
  one-process GPU run, compiled by the run's own warm-up in repro/run/kernels.py);
- `train.deterministic=true` runs on a GPU (CUBLAS_WORKSPACE_CONFIG is set in time) and
  repeats its losses bit for bit;
- DALI's GPU ("mixed") decode gives the CPU decode's pixels on natural-looking images, to a
  tolerance the hardware JPEG decoder is expected to meet;
- with 2+ GPUs: the NCCL exchanges and the whole net against one process, the NCCL gradient
  average, the checkpoint gather and rank-0 load over NCCL, and the 2-rank training run
  against one process.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter
from spawn import run_ranks
from torch.nn import functional as F

from repro.config import DataConfig, ModelConfig, OptimConfig
from repro.net import dist
from repro.net.dist import single_process_layout
from repro.net.model import AlexNet
from repro.net.parallel import average_gradients
from repro.run.optim import build_optimizer

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]
two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 GPUs (one per tower rank)"
)
# Device random generators differ from the CPU's, so the CPU comparisons run without dropout.
SMALL = ModelConfig(num_classes=10, widths=(16, 24, 32, 32, 24), fc_width=64, image_size=64)
NO_DROPOUT = dataclasses.replace(SMALL, dropout=0.0)


@pytest.fixture
def no_tf32():
    """fp32 means fp32: PyTorch lets cuDNN convolutions use TF32 (10-bit mantissa) by default."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_cuda_logits_equal_cpu_logits(no_tf32):
    cpu = AlexNet(ModelConfig(), seed=3).eval()
    gpu = AlexNet(ModelConfig(), single_process_layout(2, "cuda"), seed=3).cuda().eval()
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-4, atol=1e-4)


def test_bf16_channels_last_step_is_finite_and_close_to_fp32():
    cfg = ModelConfig(num_classes=5, widths=(16, 16, 16, 16, 16), fc_width=64, image_size=64)
    model = AlexNet(cfg, single_process_layout(2, "cuda"), seed=1).cuda().train()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(32, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (32,), device="cuda")
    with torch.no_grad():
        ref = F.cross_entropy(model.eval()(x), y)
        with torch.autocast("cuda", torch.bfloat16):
            low = F.cross_entropy(model(x).float(), y)
    assert abs(low.item() - ref.item()) < 0.05 * abs(ref.item())
    model.train()
    with torch.autocast("cuda", torch.bfloat16):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# -- training steps: GPU modes against the CPU fp32 reference ---------------------------------

STEPS = 3
# mode: (bf16, channels_last, compile, loss rtol, update rtol). The update is every
# parameter's change over the steps, all layers in one vector: its relative error measures
# the gradients (per layer it is meaningless where a bias barely moves). bf16 on this CPU
# measured 5e-5 (losses) and 7e-3 (update) against fp32; the bounds leave room for the GPU.
MODES = {
    "fp32": (False, False, False, 1e-4, 1e-3),
    "bf16": (True, False, False, 2e-2, 5e-2),
    "bf16_channels_last": (True, True, False, 2e-2, 5e-2),
    "bf16_channels_last_compile": (True, True, True, 2e-2, 5e-2),
}


def train_steps(device: str, bf16: bool, channels_last: bool, compiled: bool):
    """(losses, parameter updates) of STEPS SGD steps (§5) on fixed batches."""
    layout = single_process_layout(2, device)
    model = AlexNet(NO_DROPOUT, layout, seed=7).to(device).train()
    memory = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, OptimConfig())
    autocast = lambda: torch.autocast(layout.device.type, torch.bfloat16, enabled=bf16)  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(32, 3, 64, 64, generator=gen) * 58, torch.randint(0, 10, (32,), generator=gen))
        for _ in range(STEPS)
    ]
    forward = model
    if compiled:
        from repro.run.kernels import compile_model

        example = torch.zeros(32, 3, 64, 64, device=device).contiguous(memory_format=memory)
        forward, reason = compile_model(model, example, autocast, layout)
        assert reason is None, f"torch.compile failed on this GPU machine: {reason}"
    losses = []
    for x, y in batches:
        x, y = x.to(device).contiguous(memory_format=memory), y.to(device)
        with autocast():
            logits = forward(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    updates = {n: (p.detach() - start[n]).float().cpu() for n, p in model.named_parameters()}
    return losses, updates


@pytest.mark.parametrize("mode", list(MODES))
def test_training_steps_on_cuda_match_cpu_fp32(mode, no_tf32):
    bf16, channels_last, compiled, loss_tol, update_tol = MODES[mode]
    ref_losses, ref_updates = train_steps("cpu", False, False, False)
    losses, updates = train_steps("cuda", bf16, channels_last, compiled)
    for step, (a, b) in enumerate(zip(losses, ref_losses)):
        assert abs(a - b) <= loss_tol * abs(b), (mode, step, a, b)
    names = sorted(ref_updates)
    every = rel_err(
        torch.cat([updates[n].flatten() for n in names]),
        torch.cat([ref_updates[n].flatten() for n in names]),
    )
    assert every <= update_tol, (mode, every)


def test_deterministic_run_on_cuda_repeats_bit_for_bit(tmp_path):
    """A fresh process each time, so CUBLAS_WORKSPACE_CONFIG is set before CUDA starts."""
    runs = []
    for name in ("a", "b"):
        run = tmp_path / name
        result = subprocess.run(
            [sys.executable, "launch/train.py", "configs/demo.yaml", *synthetic_args(run),
             "train.device=cuda", "train.deterministic=true", "train.max_steps=3"],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(logged_losses(run))
    assert runs[0] == runs[1] and len(runs[0]) == 3


def synthetic_args(run: Path) -> list[str]:
    """The demo on the synthetic source (no DALI needed), fp32, no compile, every step logged."""
    return [
        f"train.run_dir={run}", "data.source=synthetic", "data.synthetic_images=640",
        "train.log_every=1", "train.final_ten_patch=false", "wandb.mode=disabled",
        "train.precision=fp32", "train.channels_last=off", "train.compile=off",
    ]  # fmt: skip


def logged_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


# -- DALI's GPU decode ---------------------------------------------------------------------------


def natural_image(rng: np.random.Generator, h: int = 150, w: int = 200) -> Image.Image:
    """Smooth shading, a few soft-edged shapes and fine grain, like a photograph (not noise,
    whose every 8x8 block would be the JPEG worst case)."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([120 + 80 * x, 90 + 60 * y, 160 - 70 * x * y], axis=-1)
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        size = int(rng.integers(20, 60))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse((x0, y0, x0 + size, y0 + size), fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    grain = rng.normal(0, 4, (h, w, 3))
    return Image.fromarray((np.asarray(img, np.float64) + grain).clip(0, 255).astype(np.uint8))


def test_dali_mixed_decode_matches_cpu_decode(tmp_path):
    pytest.importorskip("nvidia.dali", reason="DALI is not installed on this machine")
    from repro.data.loaders import build_train_loader

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            folder = tmp_path / split / c
            folder.mkdir(parents=True)
            for i in range(8):
                natural_image(rng).save(folder / f"{i}.jpg", quality=90)
    cfg = DataConfig(root=str(tmp_path), resize=72, crop=64, mean="none", threads=2)
    batches = {}
    for decode, device in (("cpu", "cpu"), ("mixed", "cuda")):
        layout = single_process_layout(2, device)
        loader = build_train_loader(dataclasses.replace(cfg, decode=decode), layout, 8, seed=0)
        images, labels = next(iter(loader.epoch(0)))
        assert images.device.type == device
        batches[decode] = (images.float().cpu(), labels.cpu())
    assert torch.equal(batches["cpu"][1], batches["mixed"][1])
    diff = (batches["cpu"][0] - batches["mixed"][0]).abs()
    # nvJPEG (and the hardware decoder) round the IDCT and upsample chroma differently from
    # libjpeg: about a grey level on average, a few near sharp colour edges.
    assert diff.mean() < 2.0, float(diff.mean())
    assert torch.quantile(diff.flatten()[::7], 0.99) < 12.0


# -- two GPUs: NCCL ------------------------------------------------------------------------------


def _net_rank(device: str) -> dict:
    """The whole net on 2 NCCL ranks against one process on this rank's GPU: logits, grads."""
    layout = dist.init_distributed(towers=2, device=device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model = AlexNet(SMALL, layout, seed=5).to(layout.device).train()
    ref = AlexNet(SMALL, single_process_layout(2, layout.device), seed=5).to(layout.device).train()
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(8, 3, 64, 64, generator=gen) * 58).to(layout.device)
    y = torch.randint(0, 10, (8,), generator=gen).to(layout.device)
    logits, ref_logits = model(x), ref(x)  # dropout: the same masks in both layouts
    F.cross_entropy(logits, y).backward()
    F.cross_entropy(ref_logits, y).backward()
    refs = dict(ref.named_parameters())
    errs = {"logits": rel_err(logits, ref_logits)}
    errs.update({n: rel_err(p.grad, refs[n].grad) for n, p in model.named_parameters()})
    return errs


@two_gpus
def test_nccl_exchanges_and_the_net_equal_one_process():
    for rank, errs in enumerate(run_ranks(_net_rank, 2, "cuda")):
        assert len(errs) == 1 + 8 * 2  # logits, then this rank's tower's 16 tensors
        for name, err in errs.items():
            assert err <= 1e-4, (rank, name, err)


def _average_rank(device: str) -> dict:
    """2 replicas of a one-tower net average their gradients (NCCL): one process, whole batch."""
    one_tower = dataclasses.replace(NO_DROPOUT, towers=1)
    layout = dist.init_distributed(towers=1, device=device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model = AlexNet(one_tower, layout, seed=2).to(layout.device)
    ref = AlexNet(one_tower, single_process_layout(1, layout.device), seed=2).to(layout.device)
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(8, 3, 64, 64, generator=gen) * 58).to(layout.device)
    y = torch.randint(0, 10, (8,), generator=gen).to(layout.device)
    mine = slice(4 * layout.replica, 4 * layout.replica + 4)
    F.cross_entropy(model(x[mine]), y[mine]).backward()
    params = list(model.parameters())
    average_gradients(params, layout)
    F.cross_entropy(ref(x), y).backward()
    refs = dict(ref.named_parameters())
    return {n: rel_err(p.grad, refs[n].grad) for n, p in model.named_parameters()}


@two_gpus
def test_nccl_gradient_average_equals_the_whole_batch():
    for rank, errs in enumerate(run_ranks(_average_rank, 2, "cuda")):
        for name, err in errs.items():
            assert err <= 1e-4, (rank, name, err)


def _checkpoint_rank(device: str, folder: str) -> dict:
    """Gather the full state over NCCL, rank 0 saves it, rank 0 alone loads it for everyone."""
    from repro.run import checkpoint as ckpt

    layout = dist.init_distributed(towers=2, device=device)
    model = AlexNet(SMALL, layout, seed=4).to(layout.device)
    full = model.full_state_dict()
    path = Path(folder) / "full.pt"
    if layout.is_main:
        ckpt.save_checkpoint(path, {"model": full, "epoch": 0, "step": 0, "config": {}})
    _, state = ckpt.load_on_rank0(lambda: path, layout)
    ref = AlexNet(SMALL, seed=4).state_dict()  # the one-process net, on the CPU
    return {
        "gathered": all(torch.equal(full[k], v) for k, v in ref.items() if torch.is_tensor(v)),
        "loaded": all(
            torch.equal(state["model"][k], full[k]) for k in full if torch.is_tensor(full[k])
        ),
        "keys": sorted(state["model"]) == sorted(ref),
    }


@two_gpus
def test_nccl_checkpoint_gather_and_rank0_load(tmp_path):
    for got in run_ranks(_checkpoint_rank, 2, "cuda", str(tmp_path)):
        assert got == {"gathered": True, "loaded": True, "keys": True}


@two_gpus
def test_two_rank_run_on_gpus_equals_one_process(tmp_path):
    """torchrun on 2 GPUs against `python launch/train.py` on one GPU: the same 5 losses.
    fp32 with cuDNN's default TF32 convolutions, hence 5e-3."""
    launch = ["launch/train.py", "configs/demo.yaml", "train.device=cuda", "train.max_steps=5"]
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for command, run in (([sys.executable], one), (torchrun, two)):
        result = subprocess.run(
            [*command, *launch, *synthetic_args(run)],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    a, b = logged_losses(one), logged_losses(two)
    assert len(a) == len(b) == 5
    for step, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= 5e-3 * abs(x), (step, x, y)
