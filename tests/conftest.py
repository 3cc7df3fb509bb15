"""Tests marked `gpu` need a CUDA device; on a CPU-only machine they are skipped, nothing else.

Also the demo's data set, shared by the modules that launch real runs on it, and the losses
of one 20-step one-process run of it, which several of them compare with.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """The demo's data set, written once per session (scikit-learn's bundled digits)."""
    from repro.config import DataConfig
    from repro.data.convert import write_digits
    from repro.data.stats import compute_stats

    root = tmp_path_factory.mktemp("digits")
    write_digits(root, val_fraction=DataConfig().val_fraction, seed=0, progress=False)
    compute_stats(root, resize=72, progress=False)
    return root


@pytest.fixture(scope="session")
def one_process_losses(digits, tmp_path_factory) -> dict[int, float]:
    """step -> loss of the demo trained 20 steps in one process, with tests/test_run_train.py's
    settings: the reference the layout, resume and multi-node tests compare with, run once.
    The steps lie in the first epoch (22 steps), so a run ended by train.max_steps=N <= 20
    logs the same first N losses (nothing before a step depends on max_steps)."""
    from test_run_train import TRAIN, args, losses, ok, python

    run = tmp_path_factory.mktemp("one_process") / "run"
    ok(python(*TRAIN, *args(run, digits, "train.max_steps=20")))
    return losses(run)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
