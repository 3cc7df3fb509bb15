"""Where this process sits in the replicas x towers grid, built from torchrun's environment.

The world is R data-parallel replicas of a T-tower model (T = 2 as in the paper, 1 for the
one-tower ablation). With one process all T towers live in it; with more, each rank holds one
tower: rank = replica * T + tower. Two kinds of process group come out of one 2-D device mesh:

- tower group: the T ranks of one replica; they exchange activations (repro/net/parallel.py);
- replica group: the R ranks holding the same tower; they all-reduce its gradients.

Devices (`choose_device`): one GPU per local rank (NCCL) when the node has one for each,
else the CPU (gloo) with a note. Several nodes meet by torchrun's c10d rendezvous, which
numbers the nodes itself; without `--rdzv-backend c10d` torchrun's static rendezvous makes
every node node 0 unless each is given its own `--node-rank` and `--master-addr`:

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id JOB launch/train.py ...

`train.parallel` 'data' and 'owt' (PAPER.md §7) use the same grid with one rank per replica:
every rank holds every tower (no tower group) and the replica group is all K ranks. Under
'owt' that group also splits fc6-fc8 and exchanges their activations (repro/net/hybrid.py).
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.rendezvous import rendezvous

PARALLEL = ("towers", "data", "owt")


class LayoutError(ValueError):
    """The world size, device or tower count cannot form a replicas x towers grid."""


@dataclass(frozen=True)
class Layout:
    """This process's place in the replicas x towers grid."""

    world_size: int
    rank: int
    towers: int
    """Towers in the model (2 in the paper)."""
    replicas: int
    replica: int
    """Index of this rank's replica: the data-parallel shard it reads."""
    local_towers: tuple[int, ...]
    """Towers computed here: all of them in one process, one per rank otherwise."""
    tower_group: ProcessGroup | None
    """The ranks of this replica (None when all towers are local)."""
    replica_group: ProcessGroup | None
    """The ranks holding the same tower across replicas (None when there is one replica)."""
    device: torch.device
    parallel: str = "towers"
    """The scheme (train.parallel): 'towers', 'data' or 'owt'."""

    @property
    def is_main(self) -> bool:
        """The one rank that prints, tracks and writes files."""
        return self.rank == 0

    @property
    def tower_size(self) -> int:
        """Ranks in the tower group (1 when all towers are local)."""
        return 1 if self.tower_group is None else self.towers

    @property
    def tower_rank(self) -> int:
        """This rank's index inside its tower group."""
        return 0 if self.tower_group is None else self.local_towers[0]

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        if not self.distributed:
            return f"1 process, towers {list(self.local_towers)} on {self.device}"
        if self.parallel != "towers":
            held = "both towers" if self.parallel == "data" else "both towers' conv1-conv5"
            split = f", fc6-fc8 split {self.world_size} ways" if self.parallel == "owt" else ""
            return (
                f"{self.world_size} ranks, parallel={self.parallel} ({held} on every rank"
                f"{split}); rank {self.rank} on {self.device}"
            )
        return (
            f"{self.world_size} ranks = {self.replicas} replica(s) x {self.towers} tower(s); "
            f"rank {self.rank}: replica {self.replica}, tower {self.local_towers[0]} on {self.device}"
        )


def single_process_layout(
    towers: int = 2, device: str | torch.device = "cpu", parallel: str = "towers"
) -> Layout:
    """All towers in this process: the reference form every multi-rank layout must equal."""
    return Layout(
        world_size=1,
        rank=0,
        towers=towers,
        replicas=1,
        replica=0,
        local_towers=tuple(range(towers)),
        tower_group=None,
        replica_group=None,
        device=torch.device(device),
        parallel=parallel,
    )


def choose_device(
    name: str, local_rank: int, local_world_size: int, gpus: int
) -> tuple[torch.device, str | None]:
    """(device for this rank, a note for the user or None) from the GPUs this node shows.

    - 'cpu': the CPU.
    - 'cuda': GPU `local_rank`; every local rank needs its own GPU, so fewer GPUs than local
      ranks is a LayoutError naming both counts.
    - 'auto': GPU `local_rank` when every local rank can have its own; otherwise the CPU for
      every rank (gloo), with a note saying why and how to use the GPU instead. Ranks never
      share a GPU: NCCL refuses two ranks on one device, and the decision must be the same on
      every rank of the node, which it is, being a function of the counts alone.
    """
    if name not in ("auto", "cpu", "cuda"):
        raise LayoutError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    if local_world_size < 1 or not 0 <= local_rank < local_world_size:
        raise LayoutError(f"local rank {local_rank} is outside 0..{local_world_size - 1}")
    if name == "cpu" or (name == "auto" and gpus == 0):
        return torch.device("cpu"), None
    if gpus >= local_world_size:
        return torch.device("cuda", local_rank), None
    ranks = f"{local_world_size} ranks on this node" if local_world_size > 1 else "1 process"
    if name == "cuda":
        if gpus == 0:
            raise LayoutError(
                "device 'cuda' was asked for but no CUDA GPU is visible "
                "(set train.device=auto or train.device=cpu to run on the CPU)"
            )
        raise LayoutError(
            f"device 'cuda' needs one GPU per local rank: {ranks} but {gpus} GPU(s) visible; "
            f"start at most {gpus} rank(s) per node (torchrun --nproc_per_node {gpus}), or run "
            "one process, `python launch/train.py ...`, which holds both towers on one GPU"
        )
    return torch.device("cpu"), (
        f"running on the CPU: {ranks} but {gpus} GPU(s) visible, and each rank needs its own; "
        "to use the GPU, run one process (`python launch/train.py ...`: both towers on one GPU)"
        + (f" or at most {gpus} ranks per node" if gpus >= 2 else "")
    )


def resolve_device(name: str, local_rank: int = 0, local_world_size: int = 1) -> torch.device:
    """`choose_device` with this machine's GPU count; local rank 0 prints the note, if any."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device, note = choose_device(name, local_rank, local_world_size, gpus)
    if note and local_rank == 0:
        print(f"repro: {note}", file=sys.stderr)
    return device


def grid_shape(world_size: int, towers: int, parallel: str = "towers") -> tuple[int, int]:
    """(replicas, ranks per replica) for a world size, or an error saying what would fit."""
    if parallel not in PARALLEL:
        raise LayoutError(f"parallel must be one of {', '.join(PARALLEL)}, got {parallel!r}")
    if towers not in (1, 2):
        raise LayoutError(f"towers must be 1 or 2, got {towers}")
    if world_size < 1:
        raise LayoutError(f"world size must be >= 1, got {world_size}")
    if world_size == 1:
        return 1, 1
    if parallel != "towers":  # 'data', 'owt': every rank holds every tower
        return world_size, 1
    if world_size % towers:
        raise LayoutError(
            f"world size {world_size} cannot hold {towers}-tower replicas: use 1 process "
            f"(both towers on one device) or a multiple of {towers} ranks (one tower per rank)"
        )
    return world_size // towers, towers


def init_distributed(
    towers: int = 2, device: str = "auto", timeout_s: float = 300.0, parallel: str = "towers"
) -> Layout:
    """Build the layout from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

    Without torchrun, or with WORLD_SIZE=1, this is the one-process layout and no process group
    is made. A collective that waits longer than `timeout_s` (a rank died) raises instead of
    hanging.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # torchrun sets LOCAL_WORLD_SIZE; a launcher that does not is taken to run every rank
    # here, so that all ranks decide the device alike.
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    replicas, per_replica = grid_shape(world_size, towers, parallel)
    dev = resolve_device(device, local_rank, local_world_size)
    if world_size == 1:
        return single_process_layout(towers, dev, parallel)

    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        store, _, _ = next(rendezvous("env://", timeout=timeout))
        # After `torchrun --max-restarts` restarts the workers, the store still holds the dead
        # attempt's gloo addresses under the same keys; a fresh prefix per attempt keeps the new
        # ranks from dialling them ("Connection refused").
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend=backend,
            store=dist.PrefixStore(f"repro/attempt{attempt}/", store),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=dev if dev.type == "cuda" else None,
        )
    return _layout_from_groups(world_size, rank, towers, replicas, per_replica, dev, parallel)


def _layout_from_groups(
    world_size: int,
    rank: int,
    towers: int,
    replicas: int,
    per_replica: int,
    dev: torch.device,
    parallel: str = "towers",
) -> Layout:
    from torch.distributed.device_mesh import init_device_mesh

    # Mesh rows are replicas, columns towers: rank = replica * towers + tower.
    mesh = init_device_mesh(dev.type, (replicas, per_replica), mesh_dim_names=("replica", "tower"))
    tower_group = mesh.get_group("tower") if per_replica > 1 else None
    replica_group = mesh.get_group("replica") if replicas > 1 else None
    replica, tower = divmod(rank, per_replica)
    local = (tower,) if per_replica > 1 else tuple(range(towers))
    return Layout(
        world_size=world_size,
        rank=rank,
        towers=towers,
        replicas=replicas,
        replica=replica,
        local_towers=local,
        tower_group=tower_group,
        replica_group=replica_group,
        device=dev,
        parallel=parallel,
    )


def teardown() -> None:
    """Destroy the process group if there is one; safe to call twice or without one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
