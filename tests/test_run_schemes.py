"""train.parallel=owt launched as users launch it: a real 4-rank torchrun run of the demo.

Proves: `torchrun --nproc_per_node 4 launch/train.py configs/demo.yaml train.parallel=owt`
logs the losses one process logs with the same global batch (64 images, 16 per rank) for a
whole epoch (22 steps), evaluates to the same top-1/top-5 error at its end, and its epoch
checkpoint resumes in one process, whose next steps log the uninterrupted run's losses; a
world size the batch cannot be split over ends with one line naming what fits, exit code 2,
before any process group is formed.

The runs use `optim.momentum=0` and `optim.lr=0.001` (dropout stays on). One process sums
the batch gradient in one pass, K replicas in K partial sums: the weights differ by ~1e-7
after the first step, and the paper's init leaves conv5's maps nearly flat, so sooner or later
a near-tie (a max-pool window, a ReLU near zero; issue #12's first pass traced one to conv5's
pooling) resolves differently and the runs part by 1e-4-1e-2 in one step. The step at which
that happens depends on the rounding of every operation, not on the layout's logic: with the
demo's momentum 0.9 and lr 0.01 it is step 9-12; at momentum 0 and lr 0.002 it did not come
in 24 steps until the LRN's power became rsqrt * sqrt (a different last bit), after which it
is step 11 (1e-4); lr 0.0015 parts too, and lr 0.001 agrees to 2e-7 in all 24 steps, as lr
0.002 did before. The split runs agree with each other to 1e-7, and an in-process replay of
one process summing its gradient in 2 halves reproduces them.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from test_run_train import ROOT, TRAIN, args, env, losses, ok, python, torchrun

STEADY = ("optim.momentum=0.0", "optim.lr=0.001", "data.threads=1")
"""See the module docstring: momentum 0 and a tenth of the demo's lr keep the 1e-7 difference
between one sum of the batch gradient and K partial sums from tipping a near-tie in the first
epoch (measured: lr 0.0015 and 0.002 tip one at step 11 with this tree's rounding)."""


def evaluations(run_dir) -> list[tuple[float, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["top1_error"], r["top5_error"]) for r in rows if "top1_error" in r]


def test_torchrun_four_ranks_owt_equals_one_process_and_resumes_there(digits, tmp_path):
    one, owt = tmp_path / "one", tmp_path / "owt"
    ok(python(*TRAIN, *args(one, digits, "train.max_steps=24", *STEADY)))
    four = ("train.parallel=owt", "train.max_steps=22", *STEADY)
    result = torchrun(*TRAIN, *args(owt, digits, *four), nproc=4)
    ok(result)
    assert "4 ranks, parallel=owt" in result.stdout
    assert (owt / "checkpoints" / "epoch0001_step000022.pt").is_file()
    assert evaluations(owt) == evaluations(one) and len(evaluations(one)) == 1
    resumed = python(
        *TRAIN, *args(owt, digits, "train.max_steps=24", "train.resume=latest", *STEADY)
    )
    ok(resumed)
    assert "resumed from" in resumed.stdout and "step 22" in resumed.stdout
    a, b = losses(one), losses(owt)
    assert sorted(a) == sorted(b) == list(range(1, 25))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])


def test_batch_the_ranks_cannot_split_is_one_line_and_exit_2(digits, tmp_path):
    """WORLD_SIZE=3 as torchrun would set it: refused before waiting for the other ranks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = dict(WORLD_SIZE="3", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    extra = ("train.parallel=owt", "train.dist_timeout_s=10")
    result = subprocess.run(
        [sys.executable, *TRAIN, *args(tmp_path / "run", digits, *extra)],
        capture_output=True,
        text=True,
        env={**env(), **world, "MASTER_PORT": str(port)},
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train: error: train.batch_size = 64 cannot be split over 3 ranks")
    assert "train.batch_size=60 or train.batch_size=66" in last  # both split over 2 towers too
    assert "Traceback" not in result.stderr
