"""SGD and the learning-rate schedule of §5, with state that moves between layouts.

§5's update, v <- 0.9 v - 0.0005 lr w - lr grad; w <- w + v, is exactly
`torch.optim.SGD(momentum=0.9, weight_decay=5e-4, dampening=0)`. Two parameter groups,
weights and biases, carry the original code's bias learning-rate multiplier and its choice to
spare biases from weight decay. The schedule is torch's own: ReduceLROnPlateau ('plateau':
/10 when validation error stops improving, at most `max_drops` times) or MultiStepLR ('steps').

The momentum buffers are saved by parameter name, not by optimizer index, so a checkpoint
written with one tower per rank resumes in one process (both towers) and back.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from repro.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.SGD:
    """SGD over two groups: weights (lr, decay) and biases (lr * bias_lr_mult, decay if asked)."""
    weights = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    bias_decay = cfg.weight_decay if cfg.bias_weight_decay else 0.0
    return torch.optim.SGD(
        [
            {"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "weights"},
            {
                "params": biases,
                "lr": cfg.lr * cfg.bias_lr_mult,
                "weight_decay": bias_decay,
                "name": "biases",
            },
        ],
        lr=cfg.lr,
        momentum=cfg.momentum,
        dampening=0.0,
        # One pass over weights, gradients and momentum per step instead of four: 61M
        # parameters make the update memory-bound (docs/performance.md). Same formula.
        fused=True,
    )


def build_schedule(optimizer: torch.optim.SGD, cfg: OptimConfig):
    """The epoch-level learning-rate schedule; `step_schedule` advances it."""
    if cfg.schedule == "plateau":
        # min_lr stops after max_drops divisions (§5: three); eps keeps float noise from
        # counting as a drop below it.
        floors = [g["lr"] * cfg.lr_factor**cfg.max_drops for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode="min",
            factor=cfg.lr_factor,
            patience=cfg.plateau_patience,
            threshold=1e-4,
            min_lr=floors,
            eps=0.0,
        )
    return torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(cfg.drop_epochs), gamma=cfg.lr_factor
    )


def step_schedule(schedule, val_error: float | None) -> None:
    """Advance the schedule at the end of an epoch; plateau needs the validation error."""
    if isinstance(schedule, torch.optim.lr_scheduler.ReduceLROnPlateau):
        if val_error is not None:
            schedule.step(val_error)
    else:
        schedule.step()


def current_lr(optimizer: torch.optim.SGD) -> float:
    """The weight learning rate (the biases' is bias_lr_mult times it)."""
    return float(optimizer.param_groups[0]["lr"])


def momentum_by_name(model: nn.Module, optimizer: torch.optim.SGD) -> dict[str, Tensor]:
    """This process's momentum buffers keyed by parameter name (absent before the first step)."""
    out = {}
    for name, p in model.named_parameters():
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            out[name] = buf
    return out


def load_momentum_by_name(
    model: nn.Module, optimizer: torch.optim.SGD, buffers: dict[str, Tensor]
) -> None:
    """Restore the buffers of this process's parameters from a full (all towers) dict."""
    for name, p in model.named_parameters():
        if name in buffers:
            if buffers[name].shape != p.shape:
                raise ValueError(
                    f"momentum buffer {name} has shape {tuple(buffers[name].shape)}, "
                    f"parameter has {tuple(p.shape)}"
                )
            # Laid out as the weight is, not as it was saved (a CPU run's NCHW buffer resumed
            # channels_last on a GPU): fused SGD needs the two alike.
            optimizer.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(buffers[name])


def freeze(module: nn.Module) -> None:
    """Original code: conv1 stops learning in the last epochs (no gradient, no update)."""
    for p in module.parameters():
        p.requires_grad_(False)
        p.grad = None


def schedule_state(schedule) -> dict:
    """The schedule's state as plain numbers and lists (checkpoints load with weights_only)."""
    state = dict(schedule.state_dict())
    if "milestones" in state:
        state["milestones"] = {int(k): int(v) for k, v in state["milestones"].items()}
    return state


def load_schedule_state(schedule, state: dict) -> None:
    schedule.load_state_dict(dict(state))
    if hasattr(schedule, "milestones"):
        from collections import Counter

        schedule.milestones = Counter({int(k): int(v) for k, v in state["milestones"].items()})
