"""The training loop: one function for every layout, read top to bottom.

    torchrun --nproc_per_node 2 launch/train.py configs/paper.yaml   # one tower per GPU
    python launch/train.py configs/paper.yaml                        # both towers on one device
    torchrun --nnodes N --nproc_per_node 8 ... launch/train.py ...   # R replicas x 2 towers

Every rank runs the same code; the layout (repro/net/dist.py) decides which towers it holds and
the exchanges (repro/net/parallel.py) do the rest. Rank 0 alone prints, tracks and writes files;
all ranks take part in gathering a checkpoint. Data order, augmentation and dropout masks are
pure functions of (seed, epoch, position), so a resumed run, or the same run in another layout,
repeats the same steps.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import functional as F
from tqdm import tqdm

from repro.config import Config, config_to_dict, save_config, validate_for_layout
from repro.data.folders import DataError
from repro.data.loaders import build_eval_loader, build_train_loader
from repro.net.dist import Layout, grid_shape, init_distributed, teardown
from repro.net.model import AlexNet
from repro.net.schemes import (
    batch_labels,
    build_model,
    full_tensors,
    local_tensors,
    reduce_gradients,
)
from repro.run import checkpoint as ckpt
from repro.run.evaluate import evaluate
from repro.run.optim import (
    build_optimizer,
    build_schedule,
    current_lr,
    freeze,
    load_momentum_by_name,
    load_schedule_state,
    momentum_by_name,
    schedule_state,
    step_schedule,
)
from repro.run.plots import kernel_grid, plot_curves
from repro.run.tracking import make_tracker

KEEP_EPOCH_CHECKPOINTS = 3


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, data that does not fit the model)."""


@dataclass
class Position:
    """Where the run is: `epoch` in progress, batches of it done, optimizer steps in all."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step and exits."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self, layout: Layout) -> bool:
        """True on every rank if any rank was asked to stop (a collective when distributed)."""
        if not layout.distributed:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=layout.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def switches(cfg: Config, layout: Layout) -> tuple[bool, bool, bool]:
    """(bf16 autocast, channels_last, torch.compile): 'auto' turns each on only on a GPU."""
    gpu = layout.device.type == "cuda"
    t = cfg.train
    bf16 = t.precision == "bf16" or (t.precision == "auto" and gpu)
    on = {"on": True, "off": False, "auto": gpu}
    return bf16, on[t.channels_last], on[t.compile]


def main(cfg: Config) -> dict:
    """Train as configured; returns the final metrics. Process groups are always torn down."""
    world = int(os.environ.get("WORLD_SIZE", "1"))  # a batch the scheme cannot split: no group yet
    validate_for_layout(cfg, grid_shape(world, cfg.model.towers, cfg.train.parallel)[0])
    layout = init_distributed(
        cfg.model.towers, cfg.train.device, cfg.train.dist_timeout_s, cfg.train.parallel
    )
    try:
        return train(cfg, layout)
    finally:
        teardown()


@dataclass
class Run:
    """What one training run holds, built once by `start` and read by the steps below."""

    cfg: Config
    layout: Layout
    run_dir: Path
    model: AlexNet
    forward: Callable  # the model, compiled or not
    optimizer: torch.optim.Optimizer
    schedule: object
    train_data: object
    val_data: object
    autocast: Callable
    channels_last: bool
    per_replica: int  # images per replica per step
    tracker: object = None
    pos: Position = field(default_factory=Position)
    best_error: float = math.inf
    last: dict = field(default_factory=dict)  # the latest logged metrics

    def say(self, *args, **kwargs) -> None:
        if self.layout.is_main:
            print(*args, **kwargs)


def train(cfg: Config, layout: Layout) -> dict:
    """The run, top to bottom: start (or resume), epochs, the final 10-patch evaluation."""
    run = start(cfg, layout)
    resumed = resume(run)
    if layout.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.run_dir / "config.yaml")
    run.tracker = make_tracker(
        cfg, run.run_dir, layout.is_main, resume_step=run.pos.step if resumed else None
    )
    stop = StopRequest()
    try:
        while run.pos.epoch < cfg.train.epochs and not reached(cfg, run.pos):
            stopping = train_epoch(run, stop)
            if stopping:
                save(run, ckpt.last_path(run.run_dir))
                run.say(
                    f"repro: stop requested; checkpoint {ckpt.last_path(run.run_dir)} "
                    f"at step {run.pos.step}"
                )
                return run.last
            if run.pos.step_in_epoch < run.train_data.steps_per_epoch:  # max_steps mid-epoch
                save(run, ckpt.last_path(run.run_dir))
                break
            run.pos.epoch, run.pos.step_in_epoch = run.pos.epoch + 1, 0
            end_of_epoch(run)
        if cfg.train.final_ten_patch:
            ten_patch_evaluation(run)
        if layout.is_main and (run.run_dir / "metrics.jsonl").exists():
            plot_curves(run.run_dir / "metrics.jsonl", run.run_dir / "curves.png")
        return run.last
    finally:
        run.tracker.finish()


def start(cfg: Config, layout: Layout) -> Run:
    """Data, model, optimizer and schedule for this layout, at step 0."""
    validate_for_layout(cfg, layout.replicas)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    bf16, channels_last, compile_model = switches(cfg, layout)
    if layout.is_main:
        print(
            f"repro: {layout.describe()}; bf16={bf16} channels_last={channels_last} "
            f"compile={compile_model}"
        )

    # -- data: both towers of a replica see the same batch; replicas read disjoint shards ----
    per_replica = cfg.train.batch_size // layout.replicas
    train_data = build_train_loader(cfg.data, layout, per_replica, cfg.train.seed, channels_last)
    val_data = build_eval_loader(cfg.data, layout, per_replica, "center", channels_last)
    classes = train_data.class_names
    if len(classes) != cfg.model.num_classes:
        raise DataError(
            f"model.num_classes={cfg.model.num_classes} but {cfg.data.root or cfg.data.source} "
            f"has {len(classes)} training classes; set model.num_classes={len(classes)}"
        )

    # -- model and optimizer: the paper's init and SGD (§5) ------------------------------------
    model = build_model(cfg.model, layout, seed=cfg.train.seed).to(layout.device)  # by scheme
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    return Run(
        cfg=cfg,
        layout=layout,
        run_dir=Path(cfg.train.run_dir),
        model=model,
        forward=torch.compile(model) if compile_model else model,
        optimizer=optimizer,
        schedule=build_schedule(optimizer, cfg.optim),
        train_data=train_data,
        val_data=val_data,
        autocast=lambda: torch.autocast(layout.device.type, torch.bfloat16, enabled=bf16),
        channels_last=channels_last,
        per_replica=per_replica,
    )


def resume(run: Run) -> bool:
    """Continue from `train.resume` (a path or "latest"), or after a torchrun restart."""
    target = run.cfg.train.resume
    if not target and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        target = "latest"  # torchrun --max-restarts: carry on from the last checkpoint
    if not target:
        return False
    path = ckpt.latest_checkpoint(run.run_dir) if target == "latest" else Path(target)
    if path is None:
        run.say(f"repro: no checkpoint in {run.run_dir}/checkpoints yet; starting fresh")
    else:
        run.pos, run.best_error = restore(path, run.model, run.optimizer, run.schedule)
        run.say(f"repro: resumed from {path} at epoch {run.pos.epoch}, step {run.pos.step}")
    return True


def train_epoch(run: Run, stop: StopRequest) -> bool:
    """The steps of one epoch from where the run stands; True if a stop was requested."""
    cfg, pos, model = run.cfg, run.pos, run.model
    # Original code (configs/original_2012.yaml): late epochs freeze conv1, no colour noise.
    if cfg.train.freeze_conv1_from_epoch and pos.epoch >= cfg.train.freeze_conv1_from_epoch:
        for tower in model.towers.values():
            freeze(tower.conv1)
    lighting = not (
        cfg.train.lighting_off_from_epoch and pos.epoch >= cfg.train.lighting_off_from_epoch
    )
    model.train()
    steps = run.train_data.steps_per_epoch
    bar = progress_bar(
        run.layout, steps, f"epoch {pos.epoch + 1}/{cfg.train.epochs}", pos.step_in_epoch
    )
    window, t0, stopping = [], time.perf_counter(), False
    try:  # close the bar first, so an error is printed below it
        for images, labels in run.train_data.epoch(pos.epoch, pos.step_in_epoch, lighting):
            with run.autocast():
                logits = run.forward(images)
            loss = F.cross_entropy(logits.float(), batch_labels(labels, run.layout))
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            reduce_gradients(model, run.layout)  # over replicas (no-op if R == 1); see schemes.py
            run.optimizer.step()
            pos.step += 1
            pos.step_in_epoch += 1
            window.append(loss.detach())
            if len(window) == cfg.train.log_every or pos.step_in_epoch == steps:
                run.last = log_window(window, run, t0)
                bar.set_postfix(
                    loss=f"{run.last['loss']:.4f}",
                    lr=f"{run.last['lr']:.2g}",
                    img_s=f"{run.last['images_per_s']:.0f}",
                )
                window, t0 = [], time.perf_counter()
            bar.update(1)
            stopping = stop.agreed(run.layout)  # the same answer on every rank
            if stopping or reached(cfg, pos):
                break
    finally:
        bar.close()
    if window:  # flush a partial window so no step's loss goes unchecked
        run.last = log_window(window, run, t0)
    return stopping


def end_of_epoch(run: Run) -> None:
    """Evaluate (every `eval_every` epochs), keep the best, step the schedule, save, prune, plot."""
    cfg, pos = run.cfg, run.pos
    error = None
    if pos.epoch % cfg.train.eval_every == 0 or pos.epoch == cfg.train.epochs:
        with progress_bar(run.layout, run.val_data.num_images, "validate") as bar:
            result = evaluate(
                run.model, run.val_data, run.layout, cfg.model.num_classes, "center",
                run.autocast, bar,
            )  # fmt: skip
        error, top5 = result["top1_error"], result["top5_error"]
        run.last = {**run.last, "top1_error": error, "top5_error": top5}
        run.tracker.log({"epoch": pos.epoch, "top1_error": error, "top5_error": top5}, pos.step)
        run.say(f"repro: epoch {pos.epoch}: top-1 error {error:.2f}%, top-5 error {top5:.2f}%")
        figure3(run.model, run.tracker, pos.step)
        if error < run.best_error:
            run.best_error = error
            save(run, ckpt.best_path(run.run_dir))
    step_schedule(run.schedule, error)
    save(run, ckpt.checkpoint_path(run.run_dir, pos.epoch, pos.step))
    if run.layout.is_main:
        ckpt.prune_checkpoints(run.run_dir, KEEP_EPOCH_CHECKPOINTS)
        plot_curves(run.run_dir / "metrics.jsonl", run.run_dir / "curves.png")


def ten_patch_evaluation(run: Run) -> None:
    """§4.1: the final error averaged over the four corners, the centre and their mirrors."""
    cfg, layout = run.cfg, run.layout
    ten = build_eval_loader(cfg.data, layout, run.per_replica, "ten", run.channels_last)
    with progress_bar(layout, ten.num_images, "10-patch") as bar:
        result = evaluate(run.model, ten, layout, cfg.model.num_classes, "ten", run.autocast, bar)
    ten_patch = {
        "ten_patch_top1_error": result["top1_error"],
        "ten_patch_top5_error": result["top5_error"],
    }
    run.last = {**run.last, **ten_patch}
    run.tracker.log({"epoch": run.pos.epoch, **ten_patch}, run.pos.step)
    run.say(
        f"repro: 10-patch top-1 error {result['top1_error']:.2f}%, "
        f"top-5 {result['top5_error']:.2f}%"
    )


def checkpoint_state(run: Run) -> dict:
    """Every tower's state gathered into the one-process form (a collective on every rank)."""
    model = run.model
    return {
        "format_version": ckpt.FORMAT_VERSION,
        "model": model.full_state_dict(),
        "optimizer": {"momentum": full_tensors(model, momentum_by_name(model, run.optimizer))},
        "lr_scheduler": schedule_state(run.schedule),
        "epoch": run.pos.epoch,
        "step_in_epoch": run.pos.step_in_epoch,
        "step": run.pos.step,
        "config": config_to_dict(run.cfg),
        "class_names": list(run.train_data.class_names),
        "best_error": run.best_error,
        "rng": ckpt.rng_state(),
        "metrics": run.last,
    }


def save(run: Run, path: Path) -> None:
    """Gather the state (collective) and let rank 0 write it atomically."""
    state = checkpoint_state(run)
    if run.layout.is_main:
        ckpt.save_checkpoint(path, state)


def reached(cfg: Config, pos: Position) -> bool:
    return bool(cfg.train.max_steps) and pos.step >= cfg.train.max_steps


def log_window(window: list[torch.Tensor], run: Run, t0: float) -> dict:
    """Mean loss of the last steps over all replicas; stop on the first non-finite one."""
    pos, layout = run.pos, run.layout
    losses = torch.stack(window).float()
    if layout.replica_group is not None:
        dist.all_reduce(losses, group=layout.replica_group)
        losses /= layout.replicas
    losses = losses.cpu()
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        step = pos.step - len(window) + int(bad[0]) + 1
        raise TrainingError(
            f"loss became {losses[bad[0]].item()} at step {step} (epoch {pos.epoch + 1}); "
            "the last good checkpoint is kept; lower optim.lr or check the data"
        )
    seconds = time.perf_counter() - t0
    row = {
        "epoch": pos.epoch,
        "loss": float(losses.mean()),
        "lr": current_lr(run.optimizer),
        "images_per_s": len(window) * run.per_replica * layout.replicas / max(seconds, 1e-9),
    }
    run.tracker.log(row, pos.step)
    return row


def figure3(model: AlexNet, tracker, step: int) -> None:
    """§6.1, Figure 3: conv1's kernels, one block per tower, logged as an image."""
    conv1 = model.grouped_state_dict()["conv1.weight"]
    tracker.log_image(
        "conv1_kernels", kernel_grid(conv1, model.cfg.towers), step, "conv1 kernels per tower"
    )


def progress_bar(layout: Layout, total: int, desc: str, initial: int = 0):
    """A tqdm bar on rank 0 (ETA included); a silent stand-in elsewhere."""
    return tqdm(
        total=total,
        desc=desc,
        initial=initial,
        disable=not layout.is_main,
        dynamic_ncols=True,
        leave=False,
    )


def restore(path: Path, model: AlexNet, optimizer, schedule) -> tuple[Position, float]:
    """Load a checkpoint written by any layout into this one."""
    state = ckpt.load_checkpoint(path)
    try:
        model.load_full_state_dict(state["model"])
    except ValueError as err:
        raise ckpt.CheckpointError(f"{path}: {err}") from None
    momentum = state.get("optimizer", {}).get("momentum", {})
    load_momentum_by_name(model, optimizer, local_tensors(model, momentum))
    if "lr_scheduler" in state:
        load_schedule_state(schedule, state["lr_scheduler"])
    if "rng" in state:
        ckpt.set_rng_state(state["rng"])
    pos = Position(state["epoch"], state.get("step_in_epoch", 0), state["step"])
    return pos, float(state.get("best_error", math.inf))
