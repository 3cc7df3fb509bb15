"""The training loop: one function for every layout, read top to bottom.

    torchrun --nproc_per_node 2 launch/train.py configs/paper.yaml   # one tower per GPU
    python launch/train.py configs/paper.yaml                        # both towers on one device
    torchrun --nnodes N --nproc_per_node 8 ... launch/train.py ...   # R replicas x 2 towers

Every rank runs the same code; the layout (repro/dist.py) decides which towers it holds and
the exchanges (repro/parallel.py) do the rest. Rank 0 alone prints, tracks and writes files;
all ranks take part in gathering a checkpoint. Data order, augmentation and dropout masks are
pure functions of (seed, epoch, position), so a resumed run, or the same run in another layout,
repeats the same steps.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import functional as F
from tqdm import tqdm

from repro import checkpoint as ckpt
from repro.config import Config, config_to_dict, save_config, validate_for_layout
from repro.data import DataError, build_eval_loader, build_train_loader
from repro.dist import Layout, init_distributed, teardown
from repro.evaluate import evaluate
from repro.model import AlexNet
from repro.optim import (
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
from repro.parallel import average_gradients, gather_named_tensors
from repro.plots import kernel_grid, plot_curves
from repro.tracking import make_tracker

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
    layout = init_distributed(cfg.model.towers, cfg.train.device, cfg.train.dist_timeout_s)
    try:
        return train(cfg, layout)
    finally:
        teardown()


def train(cfg: Config, layout: Layout) -> dict:
    validate_for_layout(cfg, layout.replicas)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    run_dir = Path(cfg.train.run_dir)
    bf16, channels_last, compile_model = switches(cfg, layout)
    autocast = lambda: torch.autocast(layout.device.type, torch.bfloat16, enabled=bf16)  # noqa: E731
    say = print if layout.is_main else (lambda *a, **k: None)
    say(
        f"repro: {layout.describe()}; bf16={bf16} channels_last={channels_last} compile={compile_model}"
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
    model = AlexNet(cfg.model, layout, seed=cfg.train.seed).to(layout.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    schedule = build_schedule(optimizer, cfg.optim)
    forward = torch.compile(model) if compile_model else model

    # -- resume: from a path, from "latest", or automatically after a torchrun restart -------
    pos, best_error = Position(), math.inf
    resume = cfg.train.resume
    if not resume and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        resume = "latest"  # torchrun --max-restarts: carry on from the last checkpoint
    if resume:
        path = ckpt.latest_checkpoint(run_dir) if resume == "latest" else Path(resume)
        if path is None:
            say(f"repro: no checkpoint in {run_dir}/checkpoints yet; starting fresh")
        else:
            pos, best_error = restore(path, model, optimizer, schedule)
            say(f"repro: resumed from {path} at epoch {pos.epoch}, step {pos.step}")

    if layout.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    tracker = make_tracker(cfg, run_dir, layout.is_main, resume_step=pos.step if resume else None)
    stop = StopRequest()
    last: dict = {}

    def save(path: Path) -> None:
        """Gather every tower's state (collective) and let rank 0 write it atomically."""
        state = {
            "format_version": ckpt.FORMAT_VERSION,
            "model": model.full_state_dict(),
            "optimizer": {
                "momentum": gather_named_tensors(momentum_by_name(model, optimizer), layout)
            },
            "lr_scheduler": schedule_state(schedule),
            "epoch": pos.epoch,
            "step_in_epoch": pos.step_in_epoch,
            "step": pos.step,
            "config": config_to_dict(cfg),
            "class_names": list(classes),
            "best_error": best_error,
            "rng": ckpt.rng_state(),
            "metrics": last,
        }
        if layout.is_main:
            ckpt.save_checkpoint(path, state)

    def validate() -> dict:
        with progress_bar(layout, val_data.num_images, "validate") as bar:
            return evaluate(model, val_data, layout, cfg.model.num_classes, "center", autocast, bar)

    params = [p for p in model.parameters()]
    try:
        while pos.epoch < cfg.train.epochs and not reached(cfg, pos):
            # Original code (configs/original_2012.yaml): late epochs freeze conv1, no colour noise.
            if cfg.train.freeze_conv1_from_epoch and pos.epoch >= cfg.train.freeze_conv1_from_epoch:
                for tower in model.towers.values():
                    freeze(tower.conv1)
            lighting = not (
                cfg.train.lighting_off_from_epoch and pos.epoch >= cfg.train.lighting_off_from_epoch
            )
            model.train()
            steps = train_data.steps_per_epoch
            bar = progress_bar(
                layout, steps, f"epoch {pos.epoch + 1}/{cfg.train.epochs}", pos.step_in_epoch
            )
            window, t0, stopping = [], time.perf_counter(), False
            try:  # close the bar first, so an error is printed below it
                for images, labels in train_data.epoch(pos.epoch, pos.step_in_epoch, lighting):
                    with autocast():
                        logits = forward(images)
                    loss = F.cross_entropy(logits.float(), labels)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    average_gradients(
                        params, layout
                    )  # data parallel over replicas (no-op if R == 1)
                    optimizer.step()
                    pos.step += 1
                    pos.step_in_epoch += 1
                    window.append(loss.detach())
                    if len(window) == cfg.train.log_every or pos.step_in_epoch == steps:
                        last = log_window(window, pos, optimizer, layout, tracker, t0, per_replica)
                        bar.set_postfix(
                            loss=f"{last['loss']:.4f}",
                            lr=f"{last['lr']:.2g}",
                            img_s=f"{last['images_per_s']:.0f}",
                        )
                        window, t0 = [], time.perf_counter()
                    bar.update(1)
                    stopping = stop.agreed(layout)  # the same answer on every rank
                    if stopping or reached(cfg, pos):
                        break
            finally:
                bar.close()
            if window:  # flush a partial window so no step's loss goes unchecked
                last = log_window(window, pos, optimizer, layout, tracker, t0, per_replica)
            if stopping:
                save(ckpt.last_path(run_dir))
                say(
                    f"repro: stop requested; checkpoint {ckpt.last_path(run_dir)} at step {pos.step}"
                )
                return last
            if pos.step_in_epoch < steps:  # max_steps reached mid-epoch
                save(ckpt.last_path(run_dir))
                break
            pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0

            error = None
            if pos.epoch % cfg.train.eval_every == 0 or pos.epoch == cfg.train.epochs:
                result = validate()
                error = result["top1_error"]
                last = {**last, "top1_error": error, "top5_error": result["top5_error"]}
                tracker.log(
                    {"epoch": pos.epoch, "top1_error": error, "top5_error": result["top5_error"]},
                    pos.step,
                )
                say(
                    f"repro: epoch {pos.epoch}: top-1 error {error:.2f}%, top-5 error {result['top5_error']:.2f}%"
                )
                figure3(model, tracker, pos.step)
                if error < best_error:
                    best_error = error
                    save(ckpt.best_path(run_dir))
            step_schedule(schedule, error)
            save(ckpt.checkpoint_path(run_dir, pos.epoch, pos.step))
            if layout.is_main:
                ckpt.prune_checkpoints(run_dir, KEEP_EPOCH_CHECKPOINTS)
                plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")

        if cfg.train.final_ten_patch:
            ten = build_eval_loader(cfg.data, layout, per_replica, "ten", channels_last)
            with progress_bar(layout, ten.num_images, "10-patch") as bar_:
                result = evaluate(model, ten, layout, cfg.model.num_classes, "ten", autocast, bar_)
            last = {
                **last,
                "ten_patch_top1_error": result["top1_error"],
                "ten_patch_top5_error": result["top5_error"],
            }
            tracker.log(
                {
                    "epoch": pos.epoch,
                    **{k: last[k] for k in ("ten_patch_top1_error", "ten_patch_top5_error")},
                },
                pos.step,
            )
            say(
                f"repro: 10-patch top-1 error {result['top1_error']:.2f}%, top-5 {result['top5_error']:.2f}%"
            )
        if layout.is_main and (run_dir / "metrics.jsonl").exists():
            plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
        return last
    finally:
        tracker.finish()


def reached(cfg: Config, pos: Position) -> bool:
    return bool(cfg.train.max_steps) and pos.step >= cfg.train.max_steps


def log_window(
    window, pos: Position, optimizer, layout: Layout, tracker, t0: float, per_replica: int
) -> dict:
    """Mean loss of the last steps over all replicas; stop on the first non-finite one."""
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
        "lr": current_lr(optimizer),
        "images_per_s": len(window) * per_replica * layout.replicas / max(seconds, 1e-9),
    }
    tracker.log(row, pos.step)
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
    load_momentum_by_name(model, optimizer, state.get("optimizer", {}).get("momentum", {}))
    if "lr_scheduler" in state:
        load_schedule_state(schedule, state["lr_scheduler"])
    if "rng" in state:
        ckpt.set_rng_state(state["rng"])
    pos = Position(state["epoch"], state.get("step_in_epoch", 0), state["step"])
    return pos, float(state.get("best_error", math.inf))
