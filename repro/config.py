"""The run's configuration: frozen dataclasses, one per YAML section.

configs/*.yaml mirror these classes section by section. Precedence: command-line
`section.key=value` overrides > the YAML file > the defaults below (the paper's recipe).
Section references are to the paper (shared/PAPER.md).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """The network (§3, Figure 2). Defaults are the paper's two-tower net."""

    num_classes: int = 1000
    towers: int = 2
    """Towers in the net: 2 as in the paper; 1 for the one-tower ablation (layers-145-half)."""
    widths: tuple[int, ...] = (48, 128, 192, 192, 128)
    """Output channels per tower of conv1..conv5 (§3.5, Figure 2)."""
    fc_width: int = 2048
    """Units per tower of fc6 and fc7 (§3.5: 4096 over both towers)."""
    image_size: int = 224
    """Side of the square input patch (§4.1: 224)."""
    pad_right_bottom: int = 3
    """Zero pad on the right and bottom before conv1: the original code's 224 -> 227 (0 for 227 crops)."""
    exchange: str = "paper"
    """'paper': towers exchange at conv3, fc6, fc7, fc8 (§3.5); 'fc8_only': never before fc8 (layers-150)."""
    pool: str = "overlapping"
    """'overlapping': max-pool 3/2 (§3.4); 'non_overlapping': 2/2 (layers-147)."""
    lrn: bool = True
    """Local response normalization after conv1 and conv2 (§3.3); False for layers-148."""
    lrn_alpha: str = "per_window"
    """'per_window': alpha/n per element as the original code and PyTorch (alpha=1e-4 gives the
    paper's numbers); 'per_sum': alpha multiplies the window sum as the printed formula."""
    lrn_before_relu_conv1: bool = False
    """Original code: conv1's LRN acts before its ReLU."""
    cnorm2: bool = False
    """Original code: a same-map 5x5 contrast normalization after LRN2 (scale 0.001/25, pow 0.75)."""
    init_std: float = 0.01
    """§5: weights drawn from N(0, 0.01)."""
    conv345_init_std: float = 0.01
    """std for conv3-conv5 weights; the original code used 0.03."""
    bias_one: float = 1.0
    """§5: bias of conv2, conv4, conv5, fc6, fc7 (Caffe used 0.1); other biases are 0."""
    dropout: float = 0.5
    """§4.2: dropout probability on the outputs of fc6 and fc7."""


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are prepared (§2, §4.1)."""

    source: str = "folders"
    """'folders': root/train/<class>/*, root/val/<class>/*; 'imagenet': root/train/<class>/* and a
    flat root/val/ with `val_labels`; 'digits': scikit-learn's digits written once as JPEG class
    folders under root; 'synthetic': random tensors on the device (benchmarks)."""
    root: str = ""
    val_labels: str = ""
    """ImageNet's validation ground-truth file (one label per line or 'file label'), for source 'imagenet'."""
    resize: int = 256
    """§2: shorter side rescaled to this, then the central square is kept."""
    crop: int = 224
    """§4.1: side of the random training patch (and of the eval patches)."""
    flip: bool = True
    """§4.1: random horizontal reflection at training time."""
    lighting_std: float = 0.1
    """§4.1: sigma of the PCA colour noise coefficients; 0 turns it off."""
    mean: str = "image"
    """§2: 'image' subtracts the per-pixel mean image; 'channel' a per-channel mean; 'none' nothing."""
    stats: str = ""
    """PCA and mean statistics file; '' means <root>/stats.npz, else the ImageNet constants."""
    threads: int = 4
    """DALI worker threads per rank."""
    decode: str = "auto"
    """'auto': GPU ('mixed') decode where a GPU is present, CPU otherwise; 'cpu'; 'mixed'."""
    synthetic_images: int = 1281167
    """Images per epoch of the synthetic source (ImageNet's training-set size)."""
    val_fraction: float = 0.2
    """For source 'digits': the fraction of each class written to val/."""


@dataclass(frozen=True)
class OptimConfig:
    """SGD as in §5: v <- 0.9 v - 0.0005 lr w - lr grad; w <- w + v."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    bias_lr_mult: float = 1.0
    """Original code: biases learn at twice the weight rate (2.0)."""
    bias_weight_decay: bool = True
    """The paper's update rule decays every weight; the original code spared the biases."""
    schedule: str = "plateau"
    """'plateau': lr / 10 when validation error stops improving (§5); 'steps': at `drop_epochs`."""
    lr_factor: float = 0.1
    plateau_patience: int = 1
    """Epochs without a better validation error before a drop ('plateau')."""
    max_drops: int = 3
    """§5: the learning rate was reduced three times."""
    drop_epochs: tuple[int, ...] = ()
    """Epochs at whose start lr is multiplied by `lr_factor` ('steps'); original code: 25, 51, 79."""


@dataclass(frozen=True)
class TrainConfig:
    """The loop, the run folder and checkpoints."""

    epochs: int = 90
    batch_size: int = 128
    """Global batch: split over replicas; both towers of a replica see the same images (§5: 128)."""
    seed: int = 0
    device: str = "auto"
    """'auto' (GPU if present, else CPU), 'cuda' (error without one), 'cpu'."""
    precision: str = "auto"
    """'auto' (bf16 on GPU, fp32 on CPU), 'fp32', 'bf16' (autocast)."""
    channels_last: str = "auto"
    """'auto' (on for GPU), 'on', 'off'."""
    compile: str = "auto"
    """torch.compile: 'auto' (on for GPU), 'on', 'off'."""
    run_dir: str = "runs/paper"
    resume: str = ""
    """'' (fresh run), 'latest' (this run folder's last checkpoint), or a checkpoint path."""
    log_every: int = 20
    """Steps between metrics.jsonl rows."""
    eval_every: int = 1
    """Epochs between validation passes (centre patch)."""
    final_ten_patch: bool = True
    """§4.1: a last evaluation averaging the softmax of 10 patches."""
    max_steps: int = 0
    """Stop after this many optimizer steps in all (0: no limit); for smoke tests."""
    dist_timeout_s: float = 300.0
    """A collective waiting longer than this (a rank died) ends the run with an error."""
    freeze_conv1_from_epoch: int = 0
    """Original code: conv1 frozen from this epoch on (0: never)."""
    lighting_off_from_epoch: int = 0
    """Original code: colour noise switched off from this epoch on (0: never)."""
    deterministic: bool = False
    """Deterministic kernels (for step-by-step comparisons between layouts)."""


@dataclass(frozen=True)
class WandbConfig:
    """Run tracking; the WANDB_* environment variables fill what is left empty."""

    mode: str = "auto"
    """'auto' (online with an API key, else offline), 'online', 'offline', 'disabled'."""
    project: str = "repro-alexnet"
    entity: str = ""
    name: str = ""
    """Run name; '' uses the run folder's name."""
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


# ---------------------------------------------------------------------------------------------
# Validation. Reading and writing YAML lives in repro/configfile.py; the wrappers at the end of
# this file re-export it so that `from repro.config import load_config` is the one entry point.
# ---------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A config file, override or value that cannot run; the message says where and what is valid."""


CHOICES: dict[str, tuple[object, ...]] = {
    "model.towers": (1, 2),
    "model.exchange": ("paper", "fc8_only"),
    "model.pool": ("overlapping", "non_overlapping"),
    "model.lrn_alpha": ("per_window", "per_sum"),
    "data.source": ("folders", "imagenet", "digits", "synthetic"),
    "data.mean": ("image", "channel", "none"),
    "data.decode": ("auto", "cpu", "mixed"),
    "optim.schedule": ("plateau", "steps"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.channels_last": ("auto", "on", "off"),
    "train.compile": ("auto", "on", "off"),
    "wandb.mode": ("auto", "online", "offline", "disabled"),
}
"""The fields that take one of a fixed set of values."""

# (key, test, what a valid value is); each test gets the field's (type-checked) value.
_RANGES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("model.num_classes", lambda v: v >= 2, ">= 2"),
    (
        "model.widths",
        lambda v: len(v) == 5 and all(w >= 1 for w in v),
        "5 positive ints (conv1..conv5)",
    ),
    ("model.fc_width", lambda v: v >= 1, ">= 1"),
    ("model.image_size", lambda v: v >= 1, ">= 1"),
    ("model.pad_right_bottom", lambda v: v >= 0, ">= 0"),
    ("model.init_std", lambda v: v > 0, "> 0"),
    ("model.conv345_init_std", lambda v: v > 0, "> 0"),
    ("model.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("data.resize", lambda v: v >= 1, ">= 1"),
    ("data.crop", lambda v: v >= 1, ">= 1"),
    ("data.lighting_std", lambda v: v >= 0, ">= 0 (0 turns colour noise off)"),
    ("data.threads", lambda v: v >= 1, ">= 1"),
    ("data.synthetic_images", lambda v: v >= 1, ">= 1"),
    ("data.val_fraction", lambda v: 0 < v < 1, "in (0, 1)"),
    ("optim.lr", lambda v: v > 0, "> 0"),
    ("optim.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.bias_lr_mult", lambda v: v >= 0, ">= 0"),
    ("optim.lr_factor", lambda v: 0 < v < 1, "in (0, 1)"),
    ("optim.plateau_patience", lambda v: v >= 0, ">= 0"),
    ("optim.max_drops", lambda v: v >= 0, ">= 0"),
    (
        "optim.drop_epochs",
        lambda v: all(e >= 1 for e in v) and list(v) == sorted(set(v)),
        "increasing epochs >= 1",
    ),
    ("train.epochs", lambda v: v >= 1, ">= 1"),
    ("train.batch_size", lambda v: v >= 1, ">= 1"),
    ("train.seed", lambda v: v >= 0, ">= 0"),
    ("train.run_dir", lambda v: v != "", "a folder (not empty)"),
    ("train.log_every", lambda v: v >= 1, ">= 1"),
    ("train.eval_every", lambda v: v >= 1, ">= 1"),
    ("train.max_steps", lambda v: v >= 0, ">= 0 (0: no limit)"),
    ("train.dist_timeout_s", lambda v: v > 0, "> 0"),
    ("train.freeze_conv1_from_epoch", lambda v: v >= 0, ">= 0 (0: never)"),
    ("train.lighting_off_from_epoch", lambda v: v >= 0, ">= 0 (0: never)"),
    ("wandb.tags", lambda v: all(t != "" for t in v), "non-empty strings"),
)


def get_value(cfg: Config, key: str) -> object:
    """The value of a dotted key such as 'optim.lr'."""
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def validate(cfg: Config, origins: dict[str, str] | str = "defaults") -> None:
    """Raise ConfigError listing every value this config cannot run with.

    `origins` maps dotted keys to where each value was set (a file path, "command line",
    "checkpoint"); a key missing from it is reported as from "defaults". The rules:

    - choice fields (CHOICES): model.towers 1|2, model.exchange, model.pool, model.lrn_alpha,
      data.source, data.mean, data.decode, optim.schedule, train.device, train.precision,
      train.channels_last, train.compile, wandb.mode must be one of their choices;
    - the ranges in _RANGES: num_classes >= 2; widths are 5 positive ints; fc_width,
      image_size >= 1; pad_right_bottom >= 0; init stds > 0; dropout in [0, 1); resize,
      crop, threads, synthetic_images >= 1; lighting_std >= 0; val_fraction in (0, 1);
      lr > 0; momentum in [0, 1); weight_decay, bias_lr_mult >= 0; lr_factor in (0, 1);
      plateau_patience, max_drops >= 0; drop_epochs increasing and >= 1; epochs,
      batch_size, log_every, eval_every >= 1; seed, max_steps, freeze/lighting-off epochs
      >= 0; dist_timeout_s > 0; run_dir not empty; wandb tags not empty strings;
    - across fields: data.crop <= data.resize; model.image_size == data.crop (the net sees
      the crop); train.batch_size divisible by model.towers (each tower's rank decodes 1/T
      of the batch, DESIGN "Data"); data.root set unless data.source is 'synthetic' or
      'digits'; data.val_labels set for source 'imagenet'; optim.drop_epochs not empty for
      schedule 'steps'.

    Whether the input is large enough for conv1 and three poolings is the model's check
    (repro/layers.py spatial_sizes); the batch against the replica count is
    validate_for_layout's, at run time.
    """

    def where(key: str) -> str:
        return origins if isinstance(origins, str) else origins.get(key, "defaults")

    problems: list[str] = []

    def bad(key: str, rule: str) -> None:
        problems.append(f"{where(key)}: {key} = {get_value(cfg, key)!r}: {rule}")

    for key, choices in CHOICES.items():
        value = get_value(cfg, key)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            bad(key, "must be one of " + ", ".join(repr(c) for c in choices) + hint)
    for key, test, rule in _RANGES:
        if not test(get_value(cfg, key)):
            bad(key, "must be " + rule)

    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    if d.crop > d.resize:
        bad(
            "data.crop",
            f"must be <= data.resize = {d.resize} (the patch is cut from the resized image)",
        )
    if m.image_size != d.crop:
        bad(
            "model.image_size",
            f"must equal data.crop = {d.crop} ({where('data.crop')}): the net sees the crop",
        )
    if m.towers in (1, 2) and t.batch_size % m.towers:
        bad(
            "train.batch_size",
            f"must be divisible by model.towers = {m.towers} ({where('model.towers')})",
        )
    if d.root == "" and d.source in ("folders", "imagenet"):
        bad("data.root", f"must name the data folder for data.source = {d.source!r}")
    if d.val_labels == "" and d.source == "imagenet":
        bad(
            "data.val_labels",
            "must name ImageNet's validation ground-truth file for data.source = 'imagenet'",
        )
    if o.schedule == "steps" and not o.drop_epochs:
        bad(
            "optim.drop_epochs", "must list the epochs of the lr drops for optim.schedule = 'steps'"
        )

    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems in the config:\n  " + "\n  ".join(problems))


def validate_for_layout(cfg: Config, replicas: int) -> None:
    """At run time: the global batch must split evenly over replicas and then over towers.

    Each replica takes batch_size / replicas images and each of its T tower ranks decodes 1/T
    of those (DESIGN "Data"), so batch_size must be a multiple of replicas * towers.
    """
    unit = replicas * cfg.model.towers
    if cfg.train.batch_size % unit:
        b = cfg.train.batch_size
        nearest = sorted({max(unit, b - b % unit), b - b % unit + unit})
        raise ConfigError(
            f"train.batch_size = {b} cannot be split over {replicas} replica(s) x "
            f"{cfg.model.towers} tower(s): it must be a multiple of {unit}, e.g. "
            + " or ".join(f"train.batch_size={n}" for n in nearest)
        )


def config_to_dict(cfg: Config) -> dict[str, dict[str, object]]:
    """Plain nested dict (tuples as lists): what YAML files, checkpoints and wandb store."""
    return {
        f.name: {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in asdict(getattr(cfg, f.name)).items()
        }
        for f in fields(cfg)
    }


# Re-exports of repro/configfile.py, imported at call time because configfile imports this
# module (a top-level import here would be circular).


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """The config of `path` (and its `base` chain), then `section.key=value` overrides, validated."""
    from repro import configfile

    return configfile.load_config(path, overrides)


def config_from_dict(data: Mapping[str, object], origin: str = "checkpoint") -> Config:
    """A validated Config from a nested dict such as a checkpoint's `config`."""
    from repro import configfile

    return configfile.config_from_dict(data, origin)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write `cfg` as YAML that load_config reads back to an equal Config."""
    from repro import configfile

    return configfile.save_config(cfg, path)
