"""The training loop: one function for every layout, read top to bottom.

    torchrun --nproc_per_node 2 launch/train.py configs/paper.yaml   # one tower per GPU
    python launch/train.py configs/paper.yaml                        # both towers on one device
    # R replicas x 2 towers; the same line on every node, HOST = node 0's address:
    torchrun --nnodes N --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id JOB launch/train.py ...

Every rank runs the same code; the layout (repro/net/dist.py) decides which towers it holds and
the exchanges (repro/net/parallel.py) do the rest. Rank 0 alone prints, tracks and writes files;
all ranks take part in gathering a checkpoint, and rank 0 alone reads one to resume (the state
reaches the others over the process group, so run folders may be node-local). Data order, augmentation and dropout masks are
pure functions of (seed, epoch, position), so a resumed run, or the same run in another layout,
repeats the same steps.

What the run holds and its checkpoints (`Run`, `save`, `resume`) are repro/run/state.py's; the
host side of a step (log windows, the stop request, progress bars) is repro/run/window.py's.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path

import torch
from torch.nn import functional as F

from repro.config import Config, save_config, validate_for_layout
from repro.data.folders import DataError
from repro.data.loaders import build_eval_loader, build_train_loader
from repro.net.dist import Layout, grid_shape, init_distributed, teardown
from repro.net.replicas import GradientAverage
from repro.net.schemes import batch_labels, build_model, gradient_reduction
from repro.run import agree, faults, kernels
from repro.run import checkpoint as ckpt
from repro.run.evaluate import evaluate
from repro.run.optim import build_optimizer, build_schedule, freeze, step_schedule
from repro.run.plots import figure3_image, plot_curves
from repro.run.state import Position, Run, resume, save
from repro.run.tracking import TEN_TOP1, make_tracker, read_rows, run_name
from repro.run.window import StopRequest, launch_window, log_window, progress_bar

KEEP_EPOCH_CHECKPOINTS = 3


def switches(cfg: Config, layout: Layout) -> tuple[bool, bool, bool]:
    """(bf16 autocast, channels_last, torch.compile): 'auto' turns each on only on a GPU.

    compile 'auto' also needs one process: across ranks the compile would run inside the
    first collective step (repro/run/kernels.py), its time counted against the timeout.
    """
    gpu = layout.device.type == "cuda"
    t = cfg.train
    bf16 = t.precision == "bf16" or (t.precision == "auto" and gpu)
    on = {"on": True, "off": False, "auto": gpu}
    compile_auto = gpu and not layout.distributed
    return bf16, on[t.channels_last], {**on, "auto": compile_auto}[t.compile]


def main(cfg: Config) -> dict:
    """Train as configured; returns the final metrics, or raises faults.Stopped when asked
    to stop. Process groups are always torn down."""
    kernels.deterministic_env(cfg.train.deterministic)  # before anything starts CUDA
    world = int(os.environ.get("WORLD_SIZE", "1"))  # a batch the scheme cannot split: no group yet
    validate_for_layout(cfg, grid_shape(world, cfg.model.towers, cfg.train.parallel)[0])
    # Watched from before the rendezvous: a launcher killed while the ranks still wait for each
    # other would leave them waiting out dist_timeout_s (SIGTERM ends them at once there).
    faults.watch_launcher()
    layout = init_distributed(
        cfg.model.towers, cfg.train.device, cfg.train.dist_timeout_s, cfg.train.parallel
    )
    try:
        return train(cfg, layout)
    finally:
        teardown()


def train(cfg: Config, layout: Layout) -> dict:
    """The run in its folder (claimed for it, rank 0's lock held throughout), with a dead
    launcher turned into a stop and faults of the machine into one line (faults.guarded)."""
    return faults.guarded(cfg, layout, lambda: run_epochs(cfg, layout))


def run_epochs(cfg: Config, layout: Layout) -> dict:
    """The run, top to bottom: start (or resume), epochs, the final 10-patch evaluation.

    A stop request (SIGTERM/SIGINT, or the launcher's death) is honoured wherever it
    arrives: during training steps (train_epoch checks it), during validation and the
    10-patch evaluation (checked between batches), and during a checkpoint write (which
    completes; the run stops after it). Every exit leaves a checkpoint from which
    `train.resume=latest` goes on to the result the uninterrupted run would have reached;
    a stopped run then raises faults.Stopped, so that it does not end as a finished one.
    """
    run = start(cfg, layout)
    resumed = resume(run)
    if resumed and complete(run):  # nothing to train or evaluate: no row is added
        limit = "train.max_steps" if reached(cfg, run.pos) else "train.epochs"
        run.say(
            f"repro: the run in {run.run_dir} is already complete at step {run.pos.step} "
            f"({run.pos.epoch} full epoch(s), {limit} reached); raise {limit} to train on"
        )
        return run.last
    compile_forward(run)  # only now: a complete run has nothing to compile for
    if layout.is_main:
        save_config(cfg, run.run_dir / "config.yaml")
    # Rank 0 may wait up to wandb.start_timeout_s for wandb; the others wait for it here.
    with agree.main_may_take(layout, cfg.wandb.start_timeout_s + cfg.train.dist_timeout_s):
        run.tracker = make_tracker(
            cfg, run.run_dir, layout.is_main, resume_step=run.pos.step if resumed else None
        )
    stop = StopRequest()
    try:
        steps = run.train_data.steps_per_epoch
        while run.pos.epoch < cfg.train.epochs and (
            not reached(cfg, run.pos) or validation_due(run)
        ):
            if run.pos.step_in_epoch < steps:  # not when resumed between steps and validation
                if train_epoch(run, stop):
                    raise stopped(run, stop, "", save_last=True)
                if run.pos.step_in_epoch < steps:  # max_steps mid-epoch
                    save(run, ckpt.last_path(run.run_dir))
                    break
            if not end_of_epoch(run, stop):  # stopped in validation: resume repeats it
                raise stopped(run, stop, " during validation", save_last=True)
            if agree.any_rank(stop.requested, layout):  # came during the checkpoint write
                raise stopped(run, stop, "", save_last=False)
        if cfg.train.final_ten_patch and not ten_patch_evaluation(run, stop):
            raise stopped(run, stop, " during the 10-patch evaluation", save_last=False)
        if layout.is_main and (run.run_dir / "metrics.jsonl").exists():
            draw_curves(run)
        return run.last
    finally:
        run.tracker.finish()


def stopped(run: Run, stop: StopRequest, when: str, save_last: bool) -> faults.Stopped:
    """End on a stop request: write last.pt if the latest checkpoint is behind, say which;
    returns the exception to raise (faults.Stopped: the command's exit code, 0 under torchrun)."""
    if save_last:
        save(run, ckpt.last_path(run.run_dir))
    if run.layout.is_main:
        latest = ckpt.latest_checkpoint(run.run_dir)
        run.say(
            f"repro: stop requested{when}; checkpoint {latest} at step {run.pos.step}; "
            "continue with train.resume=latest"
        )
    return faults.Stopped(stop.signum)


def start(cfg: Config, layout: Layout) -> Run:
    """Data, model, optimizer and schedule for this layout, at step 0."""
    validate_for_layout(cfg, layout.replicas)
    kernels.kernel_flags(cfg.train.deterministic, layout.device)
    kept = kernels.cpu_memory(cfg.train.cpu_memory, layout.device)
    bf16, channels_last, compile_model = switches(cfg, layout)
    if layout.is_main:
        print(
            f"repro: {layout.describe()}; bf16={bf16} channels_last={channels_last} "
            f"compile={compile_model}" + (" cpu_memory=keep" if kept else "")
        )

    # -- data: both towers of a replica see the same batch; replicas read disjoint shards ----
    per_replica = cfg.train.batch_size // layout.replicas
    n = cfg.model.num_classes  # the synthetic source draws labels in 0..n-1
    train_data = build_train_loader(
        cfg.data, layout, per_replica, cfg.train.seed, channels_last, num_classes=n
    )
    val_data = build_eval_loader(cfg.data, layout, per_replica, "center", channels_last, n)
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
    autocast = lambda: torch.autocast(layout.device.type, torch.bfloat16, enabled=bf16)  # noqa: E731
    return Run(
        cfg=cfg,
        layout=layout,
        run_dir=Path(cfg.train.run_dir),
        model=model,
        forward=model,  # compile_forward replaces it once the run is known to train
        optimizer=optimizer,
        schedule=build_schedule(optimizer, cfg.optim),
        train_data=train_data,
        val_data=val_data,
        autocast=autocast,
        channels_last=channels_last,
        per_replica=per_replica,
    )


def compile_forward(run: Run) -> None:
    """torch.compile the model if the run's switches say so (train.compile): compiled now, on
    a stand-in batch laid out as the loaders lay batches out; a failure falls back to eager
    with one warning (one process) or is an error naming the fix (ranks)."""
    if not switches(run.cfg, run.layout)[2]:
        return
    s = run.cfg.model.image_size
    memory = torch.channels_last if run.channels_last else torch.contiguous_format
    example = torch.zeros(run.per_replica, 3, s, s, device=run.layout.device)
    example = example.contiguous(memory_format=memory)
    run.forward, _ = kernels.compile_model(run.model, example, run.autocast, run.layout)


def train_epoch(run: Run, stop: StopRequest) -> bool:
    """The steps of one epoch from where the run stands; True if a stop was requested.

    No step waits for the device: the losses and the stop flags of each `log_every` window
    leave in one async all_reduce at the window's last step and are read after the next step
    has been launched (`launch_window`, `log_window`). So a stop request or a non-finite loss
    is acted on at most one window and one step after it happened, on every rank at once.
    """
    cfg, pos, model = run.cfg, run.pos, run.model
    # Original code (configs/original_2012.yaml): late epochs freeze conv1, no colour noise.
    if cfg.train.freeze_conv1_from_epoch and pos.epoch >= cfg.train.freeze_conv1_from_epoch:
        for tower in model.towers.values():
            freeze(tower.conv1)
    lighting = not (
        cfg.train.lighting_off_from_epoch and pos.epoch >= cfg.train.lighting_off_from_epoch
    )
    model.train()
    # Data parallel over replicas (nothing with one): buckets all_reduced during backward;
    # under 'owt' only the convolutions, summed (repro/net/schemes.py).
    params, divisor = gradient_reduction(model, run.layout)
    replicas = GradientAverage(params, run.layout, summed=divisor == 1)
    steps = run.train_data.steps_per_epoch
    bar = progress_bar(
        run.layout, steps, f"epoch {pos.epoch + 1}/{cfg.train.epochs}", pos.step_in_epoch
    )
    window, t0, stopping, pending = [], time.perf_counter(), False, None
    try:  # close the bar first, so an error is printed below it
        for images, labels in run.train_data.epoch(pos.epoch, pos.step_in_epoch, lighting):
            with run.autocast():
                logits = run.forward(images)
            loss = F.cross_entropy(logits.float(), batch_labels(labels, run.layout))
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            replicas.finish()
            run.optimizer.step()
            pos.step += 1
            pos.step_in_epoch += 1
            window.append(loss.detach())
            bar.update(1)
            if pending is not None:  # the last window's figures, now that this step is queued
                stopping = log_window(pending, run, bar)
                pending = None
            if len(window) == cfg.train.log_every or pos.step_in_epoch == steps:
                pending = launch_window(window, stop, run, t0)
                window, t0 = [], time.perf_counter()
            if stopping or reached(cfg, pos):
                break
        # What is still in flight or not yet sent: every rank leaves the loop at the same step.
        if pending is not None:
            stopping = log_window(pending, run, bar) or stopping
        if window:  # a partial window, so no step's loss goes unchecked
            stopping = log_window(launch_window(window, stop, run, t0), run, bar) or stopping
    finally:
        bar.close()
        replicas.remove()
    return stopping


def end_of_epoch(run: Run, stop: StopRequest) -> bool:
    """Close the epoch whose steps are done: evaluate (every `eval_every` epochs), keep the
    best, step the schedule, save, prune, plot. False if a stop request came during the
    validation: the run is then left as it was, the epoch's steps done and nothing closed."""
    cfg, pos = run.cfg, run.pos
    done = pos.epoch + 1  # epochs completed once this one is closed
    error, result = None, None
    if done % cfg.train.eval_every == 0 or done == cfg.train.epochs:
        with progress_bar(run.layout, run.val_data.num_images, "validate") as bar:
            result = evaluate(
                run.model, run.val_data, run.layout, cfg.model.num_classes, "center",
                run.autocast, bar, stop=lambda: stop.requested,
            )  # fmt: skip
        if result is None:
            return False
    pos.epoch, pos.step_in_epoch = done, 0
    if result is not None:
        error, top5 = result["top1_error"], result["top5_error"]
        run.last = {**run.last, "top1_error": error, "top5_error": top5}
        run.tracker.log({"epoch": pos.epoch, "top1_error": error, "top5_error": top5}, pos.step)
        run.say(f"repro: epoch {pos.epoch}: top-1 error {error:.2f}%, top-5 error {top5:.2f}%")
        figure3(run, pos.step)
        if error < run.best_error:
            run.best_error = error
            save(run, ckpt.best_path(run.run_dir))
    with warnings.catch_warnings():
        # A run resumed between an epoch's last step and its validation steps the schedule
        # before its first optimizer step in this process; across the run the order is right.
        warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"))
        step_schedule(run.schedule, error)
    save(run, ckpt.checkpoint_path(run.run_dir, pos.epoch, pos.step))
    if run.layout.is_main:
        ckpt.prune_checkpoints(run.run_dir, KEEP_EPOCH_CHECKPOINTS)
        draw_curves(run)
    return True


def ten_patch_evaluation(run: Run, stop: StopRequest) -> bool:
    """§4.1: the final error averaged over the four corners, the centre and their mirrors.

    False if a stop request came during it (nothing is logged; a resumed run repeats it).
    """
    cfg, layout = run.cfg, run.layout
    n = cfg.model.num_classes  # the synthetic source draws labels in 0..n-1
    ten = build_eval_loader(cfg.data, layout, run.per_replica, "ten", run.channels_last, n)
    with progress_bar(layout, ten.num_images, "10-patch") as bar:
        result = evaluate(
            run.model, ten, layout, cfg.model.num_classes, "ten", run.autocast, bar,
            stop=lambda: stop.requested,
        )  # fmt: skip
    if result is None:
        return False
    ten_patch = {
        "ten_patch_top1_error": result["top1_error"],
        "ten_patch_top5_error": result["top5_error"],
    }
    run.last = {**run.last, **ten_patch}
    run.tracker.log({"epoch": run.pos.last_epoch, **ten_patch}, run.pos.step)
    run.say(
        f"repro: 10-patch top-1 error {result['top1_error']:.2f}%, "
        f"top-5 {result['top5_error']:.2f}%"
    )
    return True


def draw_curves(run: Run) -> None:
    """curves.png of the run so far, titled with the run's name (rank 0 only)."""
    plot_curves(
        run.run_dir / "metrics.jsonl",
        run.run_dir / "curves.png",
        title=run_name(run.cfg.wandb, run.run_dir),
    )


def reached(cfg: Config, pos: Position) -> bool:
    return bool(cfg.train.max_steps) and pos.step >= cfg.train.max_steps


def validation_due(run: Run) -> bool:
    """The epoch's steps are done and its validation is not (a run stopped during it, which
    resume repeats even when the steps reached train.max_steps)."""
    return run.pos.step_in_epoch >= run.train_data.steps_per_epoch


def complete(run: Run) -> bool:
    """Is there nothing left to do: the epochs (or max_steps) done and, if asked for, the
    10-patch evaluation logged at this step? (Rank 0 reads metrics.jsonl and tells the rest.)"""
    cfg, pos = run.cfg, run.pos
    if pos.epoch < cfg.train.epochs and (not reached(cfg, pos) or validation_due(run)):
        return False
    if not cfg.train.final_ten_patch:
        return True

    def ten_patch_logged() -> bool:
        metrics = run.run_dir / "metrics.jsonl"
        rows = read_rows(metrics) if metrics.exists() else []
        return any(TEN_TOP1 in row and row.get("step") == pos.step for row in rows)

    return agree.any_rank(bool(agree.on_main(ten_patch_logged, run.layout)), run.layout)


def figure3(run: Run, step: int) -> None:
    """§6.1, Figure 3: conv1's kernels, one labelled block per tower, logged as an image
    (drawn by rank 0 alone: the other ranks' trackers record nothing)."""
    conv1 = run.model.grouped_state_dict()["conv1.weight"]  # a collective: every rank calls it
    if not run.layout.is_main:
        return
    title = f"run {run_name(run.cfg.wandb, run.run_dir)}, step {step}"
    run.tracker.log_image(
        "conv1_kernels", figure3_image(conv1, run.cfg.model.towers, title), step, title
    )
