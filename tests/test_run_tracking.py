"""Tracking: metrics.jsonl gets one flushed JSON row per log call; an offline wandb run records
the logged keys under run_dir/wandb; a wandb that fails warns once and the run goes on; only
the main rank tracks; 'auto' mode picks online only when an API key is configured."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from repro.config import Config, WandbConfig
from repro.run.tracking import (
    LOSS,
    LR,
    TOP1,
    MetricsFile,
    NullTracker,
    TrackerWarning,
    WandbTracker,
    make_tracker,
    resolve_mode,
)


@pytest.fixture(autouse=True)
def quiet_wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No key, no WANDB_MODE, wandb's own files in tmp: the outcome depends on the test only."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED", "WANDB_NAME", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_metrics_file_writes_flushed_rows(tmp_path: Path) -> None:
    m = MetricsFile(tmp_path)
    m.log({LOSS: torch.tensor(2.5), LR: np.float32(0.01), "epoch": 1}, step=20)
    # readable before finish(): a killed run keeps what it logged
    assert rows(tmp_path) == [{"step": 20, LOSS: 2.5, LR: pytest.approx(0.01), "epoch": 1}]
    m.log({LOSS: 2.0}, step=40)
    m.log_image("conv1/kernels", np.zeros((4, 5, 3), np.uint8), step=40)
    m.finish()
    m.finish()
    assert [r["step"] for r in rows(tmp_path)] == [20, 40]
    assert (tmp_path / "images" / "conv1_kernels_step000040.png").stat().st_size > 0


def test_resume_drops_rows_after_the_checkpoint(tmp_path: Path) -> None:
    m = MetricsFile(tmp_path)
    for step in (10, 20, 30, 40):
        m.log({LOSS: float(step)}, step)
    m.finish()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 50, "train/lo')  # cut short by a kill
    m = MetricsFile(tmp_path, resume_step=20)
    m.log({LOSS: 30.5}, 30)
    m.finish()
    assert [(r["step"], r[LOSS]) for r in rows(tmp_path)] == [(10, 10.0), (20, 20.0), (30, 30.5)]


def test_wandb_offline_run_records_keys_under_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    t = WandbTracker(WandbConfig(mode="offline", tags=("test",)), run_dir, {"optim": {"lr": 0.01}})
    assert t._run is not None, "wandb failed to start offline"
    t.log({LOSS: 2.25, LR: 0.01}, step=1)
    t.log({TOP1: 50.0, "probe/distinctive_key": 1.0}, step=2)
    t.log_image("conv1/kernels", np.full((8, 8, 3), 200, np.uint8), step=2, caption="c")
    t.log_config({"train": {"epochs": 3}})
    t.finish()
    t.finish()  # safe twice; the offline file is complete when finish() returns
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = list(runs[0].glob("*.wandb"))
    assert len(records) == 1
    data = records[0].read_bytes()
    for key in (TOP1, "probe/distinctive_key", "conv1/kernels"):
        assert key.encode() in data, key
    assert (run_dir / "wandb" / "run_id").read_text().strip() in runs[0].name


def test_wandb_that_fails_to_start_warns_once(tmp_path: Path, monkeypatch) -> None:
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("network is unreachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    cfg = Config(wandb=WandbConfig(mode="online"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = make_tracker(cfg, tmp_path, is_main=True)
        for step in range(3):
            tracker.log({LOSS: 1.0}, step)
        tracker.log_image("k", np.zeros((2, 2, 3), np.uint8), 3)
        tracker.log_config({"a": 1})
        tracker.finish()
        tracker.finish()
    ours = [w for w in caught if issubclass(w.category, TrackerWarning)]
    assert len(ours) == 1 and "network is unreachable" in str(ours[0].message)
    assert len(rows(tmp_path)) == 3  # metrics.jsonl kept everything


def test_wandb_that_fails_to_log_warns_once_then_goes_quiet(tmp_path: Path, monkeypatch) -> None:
    import wandb

    class Run:
        calls = 0

        def log(self, *args, **kwargs):
            Run.calls += 1
            raise OSError("disk full")

        def finish(self):
            raise AssertionError("a failed run is not finished again")

    monkeypatch.setattr(wandb, "init", lambda *a, **k: Run())
    t = WandbTracker(WandbConfig(mode="offline"), tmp_path, {})
    with pytest.warns(TrackerWarning, match="disk full") as caught:
        for step in range(5):
            t.log({LOSS: 1.0}, step)
        t.finish()
    assert len(caught) == 1 and Run.calls == 1


def test_other_ranks_get_the_null_tracker(tmp_path: Path) -> None:
    tracker = make_tracker(Config(), tmp_path / "run", is_main=False)
    assert type(tracker) is NullTracker
    tracker.log({LOSS: 1.0}, 1)
    tracker.log_image("k", np.zeros((2, 2, 3), np.uint8), 1)
    tracker.finish()
    assert not (tmp_path / "run").exists()


def test_disabled_wandb_leaves_metrics_file_only(tmp_path: Path) -> None:
    tracker = make_tracker(Config(wandb=WandbConfig(mode="disabled")), tmp_path, is_main=True)
    tracker.log({LOSS: 1.0}, 1)
    tracker.finish()
    assert len(rows(tmp_path)) == 1 and not (tmp_path / "wandb").exists()


def test_auto_mode_needs_a_key_for_online(tmp_path: Path, monkeypatch) -> None:
    assert resolve_mode("auto") == "offline"
    assert resolve_mode("disabled") == "disabled"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"
    assert resolve_mode("offline") == "offline"  # the config's explicit choice wins
