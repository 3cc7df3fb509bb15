"""One tracker interface: metrics.jsonl in the run folder and wandb, from rank 0 only.

The loop calls `tracker.log(...)` on every rank; make_tracker gives rank 0 the real trackers
and every other rank the null one, so there is no `if rank == 0` in the loop. wandb is
optional at run time: if it fails to start or to log, the run goes on with ONE warning and
metrics.jsonl still records everything. An online start waits at most `wandb.start_timeout_s`
for the server; past it (no network, a server that does not answer) the run is recorded
offline instead, with one line saying so.

wandb mode 'auto' is online when an API key is configured (WANDB_API_KEY, or a netrc entry for
the wandb host; checked without network), else offline: the run is recorded under
run_dir/wandb/ for a later `wandb sync run_dir/wandb/offline-run-*`. WANDB_MODE, when set,
decides 'auto' instead.
"""

from __future__ import annotations

import json
import netrc
import os
import re
import secrets
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from repro.config import Config, ReproWarning, WandbConfig, config_to_dict

# The names the training loop logs (repro/run/train.py, its log windows repro/run/window.py)
# and plots.py reads.
EPOCH = "epoch"
"""Counted from 1: a training row's is the epoch its step belongs to (the progress bar's
"epoch 1/30"), an evaluation's the epoch it closed, so both rows of an epoch's last step agree."""
LOSS = "loss"
LR = "lr"
IMAGES_PER_S = "images_per_s"
TOP1 = "top1_error"
"""Validation top-1 error in percent (the paper's unit: 40.7)."""
TOP5 = "top5_error"
TEN_TOP1 = "ten_patch_top1_error"
"""The final 10-patch evaluation's top-1 error in percent (§4.1)."""
TEN_TOP5 = "ten_patch_top5_error"


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) uint8 array as a PNG (folders made as needed)."""
    array = np.asarray(array)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {array.shape} {array.dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def read_rows(metrics_jsonl: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl (MetricsFile), in order."""
    rows = []
    for line in Path(metrics_jsonl).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short when the run was killed
            continue
    return rows


class TrackerWarning(ReproWarning):
    """A tracker stopped working; the run goes on without it."""


def _plain(value: Any) -> Any:
    """A JSON-ready number from a Python, numpy or one-element torch value."""
    if isinstance(value, torch.Tensor):
        return value.detach().item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _as_image(image: np.ndarray | torch.Tensor) -> np.ndarray:
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {array.shape} {array.dtype}")
    return array


class Tracker:
    """The interface, and the null tracker: every call does nothing."""

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record numbers (floats, ints, 0-d tensors) at an optimizer step."""

    def log_image(
        self, key: str, image: np.ndarray | torch.Tensor, step: int, caption: str = ""
    ) -> None:
        """Record an (H, W, 3) uint8 image at a step."""

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Record the run's resolved config (config_to_dict form)."""

    def finish(self) -> None:
        """Flush and close; safe to call more than once."""


NullTracker = Tracker


class MetricsFile(Tracker):
    """run_dir/metrics.jsonl: one JSON object per log call, `{"step": ..., **metrics}`.

    Each line is flushed as it is written, so a killed run keeps every row it logged. Images
    go to run_dir/images/<key>_step<step>.png. The config is not written here: the run folder's
    config.yaml (repro.config.save_config) holds it.
    """

    def __init__(self, run_dir: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self.truncate_after(resume_step)
        self._file = open(self.path, "a")  # closed by finish()

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step`: on resume the run repeats them from the checkpoint."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines(keepends=True):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short when the run was killed
                continue
            if row.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, self.path)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if self._file.closed:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row, default=str) + "\n")
        self._file.flush()

    def log_image(
        self, key: str, image: np.ndarray | torch.Tensor, step: int, caption: str = ""
    ) -> None:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)
        save_png(_as_image(image), self.path.parent / "images" / f"{name}_step{step:06d}.png")

    def finish(self) -> None:
        self._file.close()


def has_api_key() -> bool:
    """Is a wandb API key configured here? Environment and netrc only; no network."""
    if os.environ.get("WANDB_API_KEY", "").strip():
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host or "api.wandb.ai")
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_mode(mode: str) -> str:
    """'auto' -> WANDB_MODE if set, else 'online' with an API key, else 'offline'."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    env = {"dryrun": "offline", "run": "online"}.get(env, env)
    if env in ("online", "offline", "disabled"):
        return env
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes"):
        return "disabled"
    return "online" if has_api_key() else "offline"


def run_name(cfg: WandbConfig, run_dir: str | Path) -> str:
    """The run's name: wandb.name, else WANDB_NAME, else the run folder's name."""
    return cfg.name or os.environ.get("WANDB_NAME") or Path(run_dir).resolve().name


class WandbTracker(Tracker):
    """A wandb run writing under run_dir/wandb; after any failure, a null tracker.

    project, entity and tags left empty in the config are filled by wandb from WANDB_PROJECT,
    WANDB_ENTITY and WANDB_TAGS; an empty name becomes WANDB_NAME or the run folder's name.
    On resume the run id saved in run_dir/wandb/run_id continues the same wandb run.
    """

    def __init__(
        self,
        cfg: WandbConfig,
        run_dir: str | Path,
        config: Mapping[str, Any],
        resume: bool = False,
    ) -> None:
        self._run: Any = None
        self._failed = False
        self.mode = resolve_mode(cfg.mode)
        if self.mode == "disabled":
            return
        run_dir = Path(run_dir)
        try:
            import wandb

            self._wandb = wandb
            (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
            start = dict(
                project=cfg.project or None,
                entity=cfg.entity or None,
                name=run_name(cfg, run_dir),
                tags=list(cfg.tags) or None,
                dir=str(run_dir),
                config=dict(config),
                id=self._run_id(run_dir, resume),
                resume="allow" if resume else None,
            )
            # wandb's banners and hints would fill the console of every run; init_timeout
            # bounds the wait for its server (wandb's own default is 90 s).
            settings = dict(silent=True, quiet=True, init_timeout=cfg.start_timeout_s)
        except Exception as e:  # no wandb, a full disk: the run must go on
            self._fail("start", e)
            return
        began = time.monotonic()
        try:
            self._run = wandb.init(mode=self.mode, settings=wandb.Settings(**settings), **start)
        except Exception as e:  # no network, bad key: record offline, for a later `wandb sync`
            if self.mode != "online":
                self._fail("start", e)
                return
            try:
                wandb.teardown()  # its service still holds the failed run's id ("in use")
                self._run = wandb.init(mode="offline", settings=wandb.Settings(**settings), **start)
            except Exception:
                self._fail("start", e)
                return
            self.mode = "offline"
            host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
            print(
                f"repro: wandb could not start online with {host} (gave up after "
                f"{time.monotonic() - began:.0f} s, wandb.start_timeout_s="
                f"{cfg.start_timeout_s:g}: {type(e).__name__}: "
                f"{str(e).strip().splitlines()[0][:160]}); recording offline in {run_dir}/wandb: "
                f"upload it later with `wandb sync {run_dir}/wandb/offline-run-*`",
                file=sys.stderr,
                flush=True,
            )

    @staticmethod
    def _run_id(run_dir: Path, resume: bool) -> str:
        path = run_dir / "wandb" / "run_id"
        if resume and path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        run_id = secrets.token_hex(4)  # wandb ids: 8 lowercase alphanumerics
        path.write_text(run_id + "\n")
        return run_id

    def _fail(self, what: str, error: Exception) -> None:
        self._run = None
        if not self._failed:
            self._failed = True
            warnings.warn(
                f"wandb failed to {what} ({type(error).__name__}: {error}); the run goes on "
                "without it and metrics.jsonl still records everything",
                TrackerWarning,
                stacklevel=3,
            )

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if self._run is None:
            return
        try:
            self._run.log({k: _plain(v) for k, v in metrics.items()}, step=int(step))
        except Exception as e:
            self._fail("log", e)

    def log_image(
        self, key: str, image: np.ndarray | torch.Tensor, step: int, caption: str = ""
    ) -> None:
        if self._run is None:
            return
        array = _as_image(image)  # a wrong shape is the caller's bug, not wandb's
        try:
            self._run.log({key: self._wandb.Image(array, caption=caption or None)}, step=int(step))
        except Exception as e:
            self._fail("log an image", e)

    def log_config(self, config: Mapping[str, Any]) -> None:
        if self._run is None:
            return
        try:
            self._run.config.update(dict(config), allow_val_change=True)
        except Exception as e:
            self._fail("log the config", e)

    def finish(self) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        try:
            run.finish()
            # run.finish() can return before wandb's service has written the last records;
            # teardown waits for it. The atexit hook would too, but not in a process that
            # ends with os._exit (multiprocessing children, such as spawned test ranks).
            self._wandb.teardown()
        except Exception as e:
            self._fail("finish", e)


class Trackers(Tracker):
    """Several trackers behind one interface: each call goes to each, in order."""

    def __init__(self, trackers: Sequence[Tracker]) -> None:
        self.trackers = list(trackers)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        for t in self.trackers:
            t.log(metrics, step)

    def log_image(
        self, key: str, image: np.ndarray | torch.Tensor, step: int, caption: str = ""
    ) -> None:
        for t in self.trackers:
            t.log_image(key, image, step, caption)

    def log_config(self, config: Mapping[str, Any]) -> None:
        for t in self.trackers:
            t.log_config(config)

    def finish(self) -> None:
        for t in self.trackers:
            t.finish()


def make_tracker(
    cfg: Config, run_dir: str | Path, is_main: bool, resume_step: int | None = None
) -> Tracker:
    """metrics.jsonl + wandb (unless disabled) on the main rank; the null tracker elsewhere.

    `resume_step`: the step of the checkpoint a resumed run starts from; metrics.jsonl rows
    after it are dropped (the run logs them again) and the wandb run continues.
    """
    if not is_main:
        return NullTracker()
    trackers: list[Tracker] = [MetricsFile(run_dir, resume_step)]
    if resolve_mode(cfg.wandb.mode) != "disabled":
        trackers.append(
            WandbTracker(cfg.wandb, run_dir, config_to_dict(cfg), resume=resume_step is not None)
        )
    return Trackers(trackers)
