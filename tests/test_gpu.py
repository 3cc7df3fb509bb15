"""The GPU-only paths: CUDA towers, bf16 autocast, channels_last, DALI's mixed decode.

Skipped on a machine without a CUDA device (tests/conftest.py). Proves: the net on the GPU
computes what it computes on the CPU (fp32); a bf16 channels_last training step is finite and
close to fp32; the DALI loader with GPU decode hands CUDA tensors close to the CPU decode.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from repro.config import DataConfig, ModelConfig
from repro.data.loaders import build_train_loader
from repro.net.dist import single_process_layout
from repro.net.model import AlexNet

pytestmark = pytest.mark.gpu
SMALL = ModelConfig(num_classes=5, widths=(16, 16, 16, 16, 16), fc_width=64, image_size=64)


def test_cuda_logits_equal_cpu_logits():
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = AlexNet(ModelConfig(), seed=3).eval()
    gpu = AlexNet(ModelConfig(), single_process_layout(2, "cuda"), seed=3).cuda().eval()
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-4, atol=1e-4)


def test_bf16_channels_last_step_is_finite_and_close_to_fp32():
    model = AlexNet(SMALL, single_process_layout(2, "cuda"), seed=1).cuda().train()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(32, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (32,), device="cuda")
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model.eval()(x), y)
        with torch.autocast("cuda", torch.bfloat16):
            low = torch.nn.functional.cross_entropy(model(x).float(), y)
    assert abs(low.item() - ref.item()) < 0.05 * abs(ref.item())
    model.train()
    with torch.autocast("cuda", torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_dali_mixed_decode_matches_cpu_decode(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            folder = tmp_path / split / c
            folder.mkdir(parents=True)
            for i in range(8):
                pixels = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=95)
    cfg = DataConfig(root=str(tmp_path), resize=36, crop=32, mean="none", threads=2)
    batches = {}
    for decode, device in (("cpu", "cpu"), ("mixed", "cuda")):
        layout = single_process_layout(2, device)
        loader = build_train_loader(dataclasses.replace(cfg, decode=decode), layout, 8, seed=0)
        images, labels = next(iter(loader.epoch(0)))
        assert images.device.type == device
        batches[decode] = (images.float().cpu(), labels.cpu())
    assert torch.equal(batches["cpu"][1], batches["mixed"][1])
    # nvJPEG and libjpeg round differently: a few grey levels at most.
    assert (batches["cpu"][0] - batches["mixed"][0]).abs().mean() < 3.0
