"""Runs that survive, as a user meets them: real launches of the demo on the digits set.

Proves:
- a stop (SIGTERM to torchrun, as a preemptible cluster sends it) during validation, during
  an epoch checkpoint's write and during the 10-patch evaluation each ends the run at once
  with a loadable checkpoint, and `resume=latest` goes on to the uninterrupted run's result;
- workers end within seconds when torchrun itself is killed (-9), keeping last.pt;
- a run folder has one owner: a fresh run into a used folder is refused (nothing touched),
  `train.overwrite=true` moves the old run aside intact, a second run is refused while the
  first lives, a dead run's lock is taken over with a warning and its `.tmp` leftovers go;
- resume refuses data whose class names differ from the checkpoint's;
- wandb with a key but no network cannot stall or end a 2-rank run whose ranks time out
  sooner than wandb gives up: the run completes, says so in one line, and records offline;
- faults are one line and an exit code: a run folder that is a file or not writable (2), a
  full disk during a checkpoint write (1, the previous checkpoint intact), out of memory
  (1, with the batch hint), a hung rank (1, naming the timeout: on 2 spawned gloo ranks);
- the ranks agree: rank 0's failure is raised on every rank, one rank's stop flag stops
  evaluation on all at the same batch even when their shards differ in length.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from spawn import run_ranks
from test_run_train import (
    KILLABLE,
    ROOT,
    TRAIN,
    args,
    env,
    losses,
    ok,
    start,
    wait_for,
    worker_pids,
)

from repro.config import Config, TrainConfig
from repro.net.dist import init_distributed
from repro.run import agree, faults
from repro.run.checkpoint import load_checkpoint
from repro.run.evaluate import evaluate
from repro.run.rundir import claim

INJECT = [str(ROOT / "tests" / "inject.py"), str(ROOT / "configs" / "demo.yaml")]
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def launch(*argv: str, inject: str = "", timeout: float = 300, **extra_env):
    """A command run to its end, with REPRO_INJECT (tests/inject.py) and more variables set."""
    return subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**env(), "REPRO_INJECT": inject, **extra_env},
    )


def said(result: subprocess.CompletedProcess, prefix: str) -> list[str]:
    """The lines of stdout and stderr starting with `prefix` (progress bars removed)."""
    text = (result.stdout + "\n" + result.stderr).replace("\r", "\n")
    return [ln.strip() for ln in text.splitlines() if ln.strip().startswith(prefix)]


def one_line(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    lines = said(result, "train: ")
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert len(set(lines)) == 1, lines  # ranks may each say it; the same line
    assert "Traceback" not in result.stderr.split("torch.distributed.elastic")[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory) -> Path:
    """A run folder after 3 steps of the demo (last.pt at step 3), to copy per test."""
    run = tmp_path_factory.mktemp("trained") / "run"
    ok(launch(*TRAIN, *args(run, digits, "train.max_steps=3")))
    return run


def test_stop_in_validation_checkpoint_write_and_ten_patch_resumes_to_the_same_result(
    digits, tmp_path
):
    """Two ranks, one epoch and the 10-patch evaluation, stopped three times and resumed."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run = ("train.epochs=1", "train.final_ten_patch=true", "train.log_every=5")
    ok(launch(*TORCHRUN, *TRAIN, *args(straight, digits, *run)))
    again = (*run, "train.resume=latest")
    for where, resumed, message in (
        ("validate", run, "stop requested during validation; checkpoint"),
        ("save", again, "stop requested; checkpoint"),
        ("10-patch", again, "stop requested during the 10-patch evaluation; checkpoint"),
    ):
        result = launch(
            *TORCHRUN, *INJECT, *args(stopped, digits, *resumed), inject=f"stop@{where}"
        )
        # torchrun SIGKILLs workers 30 s after forwarding SIGTERM: the line and a complete
        # checkpoint show they ended within that grace period.
        (line,) = said(result, "repro: stop requested")
        assert line.startswith(f"repro: {message}"), line
        latest = Path(line.split("checkpoint ")[1].split(" at step")[0])
        state = load_checkpoint(latest)  # complete and loadable, whatever was interrupted
        assert state["step"] == 22
        assert not list(stopped.rglob("*.tmp-*")), "no half-written file is left"
        if where == "validate":  # the epoch's steps done, its validation not: repeated later
            assert latest.name == "last.pt" and state["epoch"] == 0
        else:
            assert latest.name == "epoch0001_step000022.pt" and state["epoch"] == 1
    ok(launch(*TORCHRUN, *TRAIN, *args(stopped, digits, *again)))
    a, b = metrics(straight), metrics(stopped)
    assert losses(straight).keys() == losses(stopped).keys()
    for step, loss in losses(straight).items():
        assert abs(losses(stopped)[step] - loss) <= 1e-5 * abs(loss), step
    for key in ("top1_error", "top5_error", "ten_patch_top1_error", "ten_patch_top5_error"):
        assert [r[key] for r in a if key in r] == [r[key] for r in b if key in r] != [], key


def test_killed_launcher_ends_its_workers_with_last_pt(digits, tmp_path):
    """kill -9 of torchrun: the workers notice within a second, save and end."""
    run = tmp_path / "run"
    proc = start(*KILLABLE, *TRAIN, *args(run, digits, "train.max_steps=5000"))
    assert wait_for(lambda: len(losses_or_none(run)) >= 3, 120), "the run did not start"
    workers = worker_pids(proc.pid)
    proc.kill()
    ended = wait_for(lambda: not any(alive(pid) for pid in workers), 30)
    proc.communicate(timeout=30)
    assert ended, "workers outlived their launcher"
    saved = load_checkpoint(run / "checkpoints" / "last.pt")
    assert saved["step"] >= max(losses_or_none(run)) >= 3
    assert not (run / "run.lock").exists()  # released on the way out


def test_launcher_killed_during_the_rendezvous_ends_the_waiting_worker(digits, tmp_path):
    """A worker still waiting for the other ranks when its launcher dies ends at once: it does
    not wait out train.dist_timeout_s re-parented (it did: the watch started after the rendezvous).
    The launcher here is a shell that starts rank 1 of 2 (rank 0 never comes) and exits."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens: rank 1 waits for rank 0's store
    world = dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    world.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_RUN_ID="test")
    worker = [sys.executable, *TRAIN, *args(tmp_path / "run", digits, "train.dist_timeout_s=120")]
    command = " ".join(f"'{a}'" for a in worker) + " > /dev/null 2>&1 & echo $!; sleep 15"
    launcher = subprocess.run(
        ["bash", "-c", command], cwd=ROOT, env={**env(), **world}, text=True,
        capture_output=True, timeout=60,
    )  # fmt: skip
    pid = int(launcher.stdout.split()[0])
    assert alive(pid)  # still in the rendezvous when its launcher ended (after 15 s)
    assert wait_for(lambda: not alive(pid), 20), "the worker outlived its launcher"


def losses_or_none(run: Path) -> dict[int, float]:
    try:
        return losses(run)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its (dead) parent's reaper."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_bad_starts_and_faults_are_one_line_and_lose_nothing(trained, digits, tmp_path):
    """Each case is a real launch that must end at once with one line and its exit code:
    refusals of the run folder or the data (2), a fault (1); nothing in the run is changed."""
    copies = {}
    for name in ("used", "live", "classes", "oom"):
        copies[name] = tmp_path / name
        shutil.copytree(trained, copies[name])
    renamed = tmp_path / "digits"
    shutil.copytree(digits, renamed)
    for split in ("train", "val"):
        (renamed / split / "0").rename(renamed / split / "zero")  # same count, other names
    a_file = tmp_path / "a_file"
    a_file.write_text("notes")
    blocked = tmp_path / "ro" / "run"
    if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses even root
        blocked = Path("/sys/repro-test-run")
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
    owner = claim(copies["live"], continuing=True, overwrite=False)  # this process owns it
    again = ("train.max_steps=9", "train.resume=latest")
    cases = [
        (2, args(copies["used"], digits, "train.max_steps=2"),
         (f"train.run_dir={copies['used']} already holds a run", "train.resume=latest",
          "train.overwrite=true")),
        (2, args(copies["live"], digits, *again),
         (f"train.run_dir={copies['live']} is in use by PID {os.getpid()} on "
          f"{socket.gethostname()}",)),
        (2, args(copies["classes"], renamed, *again),
         ("trained on other classes than the data holds",
          "class 0 is '0' in the checkpoint but '1' in the data", "(and 7 more)")),
        (2, args(a_file, digits), (f"train.run_dir={a_file} is a file, not a folder",)),
        (2, args(blocked, digits), (f"train.run_dir={blocked} cannot be used:",)),
        (1, args(copies["oom"], digits, *again),
         ("train: stopped: out of memory at train.batch_size=64",
          "lower it (e.g. train.batch_size=32)", "last.pt (step 3) is intact")),
    ]  # fmt: skip
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    del before[copies["live"] / "run.lock"]  # ours, released below
    del before[copies["oom"] / "config.yaml"]  # the OOM run started: it saved its config

    def run(case):
        inject = "oom@1" if case is cases[-1] else ""
        return launch(*INJECT, *case[1], inject=inject)

    try:
        with ThreadPoolExecutor(2) as pool:  # two at a time: each is mostly start-up
            results = list(pool.map(run, cases))
    finally:
        owner.release()
    for (code, _, needles), result in zip(cases, results):
        one_line(result, code, *needles)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    # The data set's index cache (.repro-index-*, repro/data/index.py) is derived, and may
    # be rewritten by any start; everything else must be as it was.
    changed = [p for p in before if after.get(p) != before[p] and not p.name.startswith(".repro-")]
    assert changed == [], changed  # no checkpoint, metrics row or data file touched
    assert not blocked.exists()


def test_overwrite_moves_the_old_run_aside_whole(trained, digits, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = launch(*TRAIN, *args(run, digits, "train.max_steps=2", "train.overwrite=true"))
    ok(result)
    (aside,) = run.parent.glob("run.replaced-*")
    assert f"moved the previous run to {aside}" in result.stdout
    for path, data in before.items():  # the old run, whole, in its new place
        assert (aside / path.relative_to(run)).read_bytes() == data
    assert sorted(losses(run)) == [1, 2]  # the new run's rows only
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2


def test_a_dead_runs_lock_is_taken_over_and_its_leftovers_removed(trained, digits, tmp_path):
    """kill -9 leaves run.lock (held by no one) and maybe a half-written `.tmp` file."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    dead = {"host": socket.gethostname(), "pid": 999_999, "started": "yesterday", "command": "x"}
    (run / "run.lock").write_text(json.dumps(dead))
    leftover = run / "checkpoints" / ".last.pt.tmp-999999"
    leftover.write_bytes(b"PK\x03\x04 half")
    result = launch(*TRAIN, *args(run, digits, "train.max_steps=4", "train.resume=latest"))
    ok(result)
    assert f"taking over {run / 'run.lock'} from PID 999999 on {dead['host']}" in result.stdout
    removed = (
        "removed 1 unfinished file(s) of an interrupted write: checkpoints/.last.pt.tmp-999999"
    )
    assert removed in result.stdout
    assert not leftover.exists() and not (run / "run.lock").exists()
    assert sorted(losses(run)) == [1, 2, 3, 4]  # steps 1-3 kept, step 4 from the resume


def test_wandb_without_network_cannot_stall_a_two_rank_run(digits, tmp_path):
    """A key, a server that refuses connections, and wandb's start allowed longer (8 s) than
    the ranks wait for each other (dist_timeout_s=6): rank 1 must not time out meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    run = tmp_path / "run"
    limits = ("train.max_steps=4", "wandb.mode=auto", "wandb.start_timeout_s=8",
              "train.dist_timeout_s=6")  # fmt: skip
    result = launch(
        *TORCHRUN, *TRAIN, *args(run, digits, *limits),
        WANDB_API_KEY="x" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{port}",
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
    )  # fmt: skip
    ok(result)
    (line,) = said(result, "repro: wandb")
    assert f"could not start online with http://127.0.0.1:{port}" in line
    assert f"recording offline in {run}/wandb" in line and "wandb sync" in line
    assert sorted(losses(run)) == [1, 2, 3, 4]
    (offline,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    assert offline.stat().st_size > 0


def test_full_disk_during_a_checkpoint_write_keeps_the_previous_one(trained, digits, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = (run / "checkpoints" / "last.pt").read_bytes()
    result = launch(
        *INJECT, *args(run, digits, "train.max_steps=30", "train.resume=latest"),
        inject="enospc@epoch0001",
    )  # fmt: skip
    target = run / "checkpoints" / "epoch0001_step000022.pt"
    assert one_line(result, 1) == (
        f"train: stopped: cannot write {target}: No space left on device; free some space; the "
        f"latest checkpoint {run / 'checkpoints' / 'last.pt'} (step 3) is intact: continue "
        "with train.resume=latest"
    )
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    assert not target.exists() and not list(run.rglob("*.tmp-*"))


def _agreeing_rank(run_dir: str, timeout_s: float):
    """One of 2 gloo ranks: rank 0's failure reaches rank 1; a stop flag raised on one rank
    stops evaluation on both, at the same batch, though their shards differ in length; a
    collective that rank 1 never joins becomes rank 0's one-line fault."""
    layout = init_distributed(towers=2, device="cpu", timeout_s=timeout_s)
    rank = layout.rank

    def write():
        raise OSError(errno.ENOSPC, "No space left on device", "ckpt.pt")

    try:
        agree.on_main(write, layout)
        shared = None
    except OSError as e:
        shared = (e.errno, e.filename)
    flags = (agree.any_rank(rank == 1, layout), agree.any_rank(False, layout))

    model = torch.nn.Linear(4, 3)
    batches = [(torch.randn(2, 4), torch.tensor([0, 1])) for _ in range(5 - rank)]  # 5 and 4
    seen = []
    stop = lambda: rank == 1 and len(seen) == 2  # noqa: E731 (rank 1's flag, after 2 batches)
    progress = type("Bar", (), {"update": lambda self, n: seen.append(n)})()
    stopped = evaluate(model, batches, layout, 3, progress=progress, stop=stop)
    full = evaluate(model, batches[:4], layout, 3, stop=lambda: False)

    described = None
    if rank == 0:
        cfg = Config(train=TrainConfig(run_dir=run_dir, dist_timeout_s=timeout_s))
        try:
            dist.all_reduce(torch.ones(1))  # rank 1 is not there: a hung rank
        except RuntimeError as e:
            described = faults.describe(e, cfg, is_main=True)
    else:
        time.sleep(timeout_s + 2)
    return shared, flags, stopped, len(seen), full["images"], described


def test_ranks_agree_on_failures_and_stops_and_a_timeout_is_one_line(tmp_path):
    timeout = 3.0
    results = run_ranks(_agreeing_rank, 2, str(tmp_path), timeout)
    for rank, (shared, flags, stopped, seen, images, _) in enumerate(results):
        assert shared == (errno.ENOSPC, "ckpt.pt"), rank  # raised on rank 1 too
        assert flags == (True, False), rank
        assert stopped is None and seen == 2, rank  # both stopped before their third batch
        assert images == 8, rank
    assert results[0][5] == (
        f"no answer from another rank within train.dist_timeout_s={timeout:g} s (Timed out "
        f"waiting {timeout * 1000:.0f}ms for recv operation to complete); a rank hung or "
        "ended: see its messages; no checkpoint had been written yet: start the run again"
    )
