"""The training entry point run as users run it: real torchrun launches on gloo, on the demo set.

Proves: `torchrun --nproc_per_node 2 launch/train.py configs/demo.yaml` trains (finite,
decreasing loss) and writes metrics.jsonl, a checkpoint and an offline wandb run; one process
and two ranks log the same losses step by step; a run stopped by SIGTERM mid-epoch exits
with 143 and, resumed from "latest", continues exactly as the uninterrupted run; a two-rank checkpoint
resumes in one process; a killed rank ends the job with a message instead of a hang, and
torchrun's restart resumes from the last checkpoint; bad input ends with one line; the usage
asks for the config alone (the overrides are optional).
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [str(ROOT / "launch" / "train.py"), str(ROOT / "configs" / "demo.yaml")]


def env() -> dict:
    e = dict(os.environ, WANDB_SILENT="true", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    e.pop("WANDB_API_KEY", None)
    return e


def args(run_dir: Path, digits: Path, *extra: str) -> list[str]:
    return [
        f"train.run_dir={run_dir}",
        f"data.root={digits}",
        "train.log_every=1",
        "train.final_ten_patch=false",
        "wandb.mode=disabled",
        # The layouts are compared in fp32 on the CPU, on a GPU machine too ('auto' would pick
        # the GPU, bf16, channels_last and GPU decoding there); `extra` may override these.
        "train.device=cpu",
        "train.precision=fp32",
        "train.channels_last=off",
        "train.compile=off",
        *extra,
    ]


def python(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        env=env(),
        timeout=timeout,
        cwd=ROOT,
    )


def torchrun(*argv: str, nproc: int = 2, extra: tuple[str, ...] = (), timeout: float = 300):
    cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra]
    return python(*cmd, *argv, timeout=timeout)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (
        f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )


def test_torchrun_two_ranks_trains_and_writes_the_run_folder(digits, tmp_path):
    run = tmp_path / "run"
    result = torchrun(*TRAIN, *args(run, digits, "train.max_steps=12", "wandb.mode=offline"))
    ok(result)
    assert "2 ranks = 1 replica(s) x 2 tower(s)" in result.stdout
    seen = losses(run)
    assert sorted(seen) == list(range(1, 13))
    values = [seen[s] for s in sorted(seen)]
    assert all(v == v and abs(v) != float("inf") for v in values)
    assert sum(values[-4:]) / 4 < sum(values[:4]) / 4  # it learns
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.pt").is_file()  # max_steps mid-epoch
    offline = list((run / "wandb").glob("**/offline-run-*/run-*.wandb"))
    assert offline and offline[0].stat().st_size > 0


def test_one_process_and_two_ranks_log_the_same_losses(one_process_losses, digits, tmp_path):
    """Deterministic data, augmentation included, and dropout: the same 20 steps."""
    two = tmp_path / "two"
    ok(torchrun(*TRAIN, *args(two, digits, "train.max_steps=20")))
    a, b = one_process_losses, losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-4 * abs(a[step]), (step, a[step], b[step])


def test_sigterm_mid_epoch_then_resume_equals_uninterrupted(one_process_losses, digits, tmp_path):
    stopped = tmp_path / "stopped"
    proc = start(*TRAIN, *args(stopped, digits, "train.max_steps=16"))
    assert wait_for(lambda: logged_steps(stopped) >= 5, 120), "the run did not start"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]  # 128 + SIGTERM: stopped, not finished
    assert "stop requested" in out
    cut = max(losses(stopped))
    assert 5 <= cut < 16  # stopped mid-epoch (an epoch is 22 steps)
    ok(python(*TRAIN, *args(stopped, digits, "train.max_steps=16", "train.resume=latest")))
    a, b = one_process_losses, losses(stopped)
    assert sorted(b) == list(range(1, 17))
    for step in range(cut + 1, 17):
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])


def test_two_rank_checkpoint_resumes_in_one_process(one_process_losses, digits, tmp_path):
    moved = tmp_path / "moved"
    ok(torchrun(*TRAIN, *args(moved, digits, "train.max_steps=6")))
    ok(python(*TRAIN, *args(moved, digits, "train.max_steps=10", "train.resume=latest")))
    a, b = one_process_losses, losses(moved)
    for step in range(7, 11):
        assert abs(a[step] - b[step]) <= 1e-4 * abs(a[step]), (step, a[step], b[step])


def worker_pids(torchrun_pid: int) -> list[int]:
    """torchrun's worker processes (its children running train.py, not its helper processes)."""
    found = subprocess.run(
        ["pgrep", "-P", str(torchrun_pid), "-f", "launch/train.py"], capture_output=True, text=True
    )
    pids = [int(p) for p in found.stdout.split()]
    assert len(pids) == 2, f"expected 2 workers under torchrun, found {pids}"
    return pids


def start(*argv: str) -> subprocess.Popen:
    """A command in the background, as a user's terminal would run it."""
    return subprocess.Popen(
        [sys.executable, *argv], cwd=ROOT, env=env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def wait_for(condition, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline and not condition():
        time.sleep(0.1)
    return condition()


def logged_steps(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


KILLABLE = (
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node=2",
    "--monitor-interval=0.5",
)


def test_killed_rank_ends_the_job_and_restart_resumes(digits, tmp_path):
    """SIGKILL one worker after the first epoch's checkpoint: torchrun restarts both and the
    run resumes from that checkpoint instead of hanging or starting over."""
    run = tmp_path / "run"
    limits = ("train.max_steps=30", "train.dist_timeout_s=60")
    proc = start(*KILLABLE, "--max-restarts=1", *TRAIN, *args(run, digits, *limits))
    first_epoch = lambda: list((run / "checkpoints").glob("epoch0001_*.pt"))  # noqa: E731
    assert wait_for(first_epoch, 180), "no epoch checkpoint appeared"
    os.kill(worker_pids(proc.pid)[-1], signal.SIGKILL)
    out, err = proc.communicate(timeout=180)
    errors = [ln for ln in err.replace("\r", "\n").splitlines() if "Error" in ln]
    assert proc.returncode == 0, "\n".join(errors[-10:])
    assert "resumed from" in out and "epoch0001" in out
    assert max(losses(run)) == 30


def test_killed_rank_without_restart_exits_in_bounded_time(digits, tmp_path):
    run = tmp_path / "run"
    limits = ("train.max_steps=200", "train.dist_timeout_s=20")
    proc = start(*KILLABLE, *TRAIN, *args(run, digits, *limits))
    assert wait_for(lambda: logged_steps(run) >= 3, 120), "the run did not start"
    os.kill(worker_pids(proc.pid)[-1], signal.SIGKILL)
    begun = time.time()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.time() - begun < 60
    assert "Signals.SIGKILL" in err or "exitcode" in err  # torchrun names the failed rank


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(digits, tmp_path):
    run = tmp_path / "run"
    ok(python(*TRAIN, *args(run, digits, "train.max_steps=3")))
    before = (run / "checkpoints" / "last.pt").read_bytes()
    result = python(
        *TRAIN, *args(run, digits, "train.max_steps=30", "train.resume=latest", "optim.lr=1e12")
    )
    assert result.returncode == 1, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("train: stopped: loss became") and "at step" in line
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


BAD_INPUTS = {  # case -> (overrides, what the one line must name)
    "missing_root": (("data.source=folders", "data.root={tmp}/missing"), "missing"),
    "negative_lr": (("optim.lr=-1",), "optim.lr"),
    "odd_batch": (("train.batch_size=63",), "train.batch_size"),
    "unknown_key": (("model.wdths=[1]",), "model.wdths"),
    "no_gpu": (("train.device=cuda",), "no CUDA GPU"),
    "foreign_checkpoint": (("train.resume=/etc/hostname",), "/etc/hostname"),
    "class_count": (("model.num_classes=7",), "model.num_classes=7"),
    "root_is_a_file": (("data.root={tmp}/a_file",), "is a file, not a folder"),  # digits writes
}


def test_bad_input_is_one_line_and_exit_2(digits, tmp_path):
    """Each case a real launch, two at a time (each is mostly interpreter start-up)."""
    import torch

    cases = dict(BAD_INPUTS)
    if torch.cuda.is_available():
        del cases["no_gpu"]  # this machine has a GPU
    (tmp_path / "a_file").write_text("not a data set\n")

    def launch(case: str) -> subprocess.CompletedProcess:
        extra = tuple(e.replace("{tmp}", str(tmp_path)) for e in cases[case][0])
        return python(*TRAIN, *args(tmp_path / case, digits, "train.max_steps=2", *extra))

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(cases, pool.map(launch, cases)))
    for case, result in results.items():
        assert result.returncode == 2, (case, result.stdout[-1000:], result.stderr[-2000:])
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("train: error:") and cases[case][1] in last, (case, last)
        assert "Traceback" not in result.stderr, case


def test_usage_without_arguments_asks_for_the_config_alone(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train"])
    with pytest.raises(SystemExit) as ended:
        runpy.run_path(TRAIN[0])["main"]()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert ended.value.code == 2
    assert last == "train: error: the following arguments are required: config"
