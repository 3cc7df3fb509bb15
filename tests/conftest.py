"""Tests marked `gpu` need a CUDA device; on a CPU-only machine they are skipped, nothing else.

Also the demo's data set, shared by the modules that launch real runs on it.
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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
