"""Multi-node runs as documented, with node-local run folders.

Proves:
- the README's multi-node command works: two torchrun agents on this host (`--nnodes 2
  --nproc_per_node 2 --rdzv-backend c10d`), 2 replicas x 2 towers, log the losses of one
  process fed the same global batch, within the tolerance of the layout tests in
  tests/test_run_train.py;
- checkpoints need no shared disk: each "node" has its own run folder and only node 0's holds
  checkpoints; `train.resume=latest` continues at node 0's step on every rank, and the
  resumed run ends equal to an uninterrupted one;
- `load_on_rank0`: only rank 0 picks and opens the file (the other ranks would fail if they
  tried); every rank gets the same state, the same "nothing to resume" and the same error.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import torch
from spawn import run_ranks
from test_run_train import TRAIN, args, env, losses

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_agents(run_dirs: tuple[Path, Path], digits: Path, *extra: str) -> None:
    """Two torchrun agents ("nodes") of 2 ranks each, meeting by c10d rendezvous on this host."""
    port = _free_port()
    agents = []
    for run_dir in run_dirs:
        command = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "2", "--nproc_per_node", "2",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", "multinode-test", *TRAIN, *args(run_dir, digits, *extra),
        ]  # fmt: skip
        agents.append(
            subprocess.Popen(
                command,
                cwd=ROOT,
                env=env(),
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )  # fmt: skip
        )
    for node, agent in enumerate(agents):
        out, err = agent.communicate(timeout=300)
        assert agent.returncode == 0, (
            f"node {node} exit {agent.returncode}\n{out[-2000:]}\n{err[-3000:]}"
        )
        if node == 0:
            assert "4 ranks = 2 replica(s) x 2 tower(s)" in out
            if "train.resume=latest" in extra:
                assert "resumed from" in out and "step 2" in out and "all 4 rank(s)" in out


def test_two_nodes_with_local_run_folders_train_and_resume_as_one_process(
    one_process_losses, digits, tmp_path
):
    """Steps 1-2 on 2 nodes, then resumed to step 4 from node 0's checkpoint alone."""
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    two_agents((node0, node1), digits, "train.max_steps=2")
    assert (node0 / "checkpoints" / "last.pt").is_file()
    assert not node1.exists()  # rank 0 alone writes: node 1 has nothing to resume from
    two_agents((node0, node1), digits, "train.max_steps=4", "train.resume=latest")
    a = {step: loss for step, loss in one_process_losses.items() if step <= 4}
    b = losses(node0)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-4 * abs(a[step]), (step, a[step], b[step])


# -- load_on_rank0, in-process on 2 gloo ranks -----------------------------------------------


def _load_rank(folders: list[str]) -> dict:
    """What load_on_rank0 gives this rank when rank 0 picks the latest, nothing, a corrupt file."""
    from repro.net.dist import init_distributed
    from repro.run import checkpoint as ckpt

    layout = init_distributed(towers=2, device="cpu")
    mine = Path(folders[layout.rank])
    if layout.rank != 0:  # no rank but 0 may look at a disk for a checkpoint

        def forbidden(*a, **k):
            raise AssertionError(f"rank {layout.rank} opened a checkpoint")

        ckpt.load_checkpoint = ckpt.latest_checkpoint = forbidden
    picks = {
        "latest": lambda: ckpt.latest_checkpoint(mine),
        "none": lambda: None,
        "corrupt": lambda: mine / "corrupt.pt",
    }
    got = {}
    for case, pick in picks.items():
        try:
            path, state = ckpt.load_on_rank0(pick, layout)
        except ckpt.CheckpointError as err:
            got[case] = {"error": str(err)}
            continue
        got[case] = {"path": path}
        if state is not None:
            got[case].update(step=state["step"], weight=state["model"]["w"])
    return got


def test_only_rank0_reads_and_every_rank_gets_its_state(tmp_path):
    from repro.run.checkpoint import checkpoint_path, save_checkpoint

    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node1.mkdir()
    weight = torch.randn(3, 4)
    state = {"model": {"w": weight}, "epoch": 1, "step": 7, "config": {}}
    saved = save_checkpoint(checkpoint_path(node0, 1, 7), state)
    (node0 / "corrupt.pt").write_bytes(b"PK\x03\x04 truncated")

    ranks = run_ranks(_load_rank, 2, [str(node0), str(node1)])
    for got in ranks:  # node 1's folder is empty: it resumes from node 0's file all the same
        assert got["latest"]["path"] == saved and got["latest"]["step"] == 7
        assert torch.equal(got["latest"]["weight"], weight)
        assert got["none"] == {"path": None}
        assert "corrupt.pt" in got["corrupt"]["error"]
    assert ranks[0]["corrupt"] == ranks[1]["corrupt"]  # rank 0's reason, on every rank


def test_documented_multinode_command_names_a_rendezvous_backend():
    """README, launch/train.py --help and the train module's docstring give a working command:
    without a rendezvous backend torchrun's static rendezvous makes every node node 0."""
    from repro.run import train as train_module

    help_text = subprocess.run(
        [sys.executable, "launch/train.py", "--help"], cwd=ROOT, env=env(),
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    readme = (ROOT / "README.md").read_text()
    for where, text in (
        ("README", readme),
        ("--help", help_text),
        ("docstring", train_module.__doc__),
    ):
        lines = [ln for ln in text.splitlines() if "--nnodes" in ln]
        assert lines, f"{where} gives no multi-node command"
        for line in lines:
            assert "--rdzv-backend c10d" in line or "--rdzv_backend c10d" in line, (where, line)
