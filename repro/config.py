"""The run's configuration: frozen dataclasses, one per YAML section.

configs/*.yaml mirror these classes section by section. Precedence: command-line
`section.key=value` overrides > the YAML file > the defaults below (the paper's recipe).
Section references are to the paper (shared/PAPER.md).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


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
    max_pixels: int = 100_000_000
    """Images with more pixels (width x height, from the header) are skipped with their name:
    a guard against decompression bombs; 10,000 x 10,000 by default."""


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
    cpu_memory: str = "keep"
    """CPU runs: 'keep' (freed tensors' memory stays in the process for the next step: no page
    faults per step, 11-15% faster on 2 cores) or 'release' (glibc's default)."""
    overwrite: bool = False
    """A fresh run into a run_dir that holds another run: refused unless true; then the old run
    is moved aside to <run_dir>.replaced-<time> (never deleted)."""
    parallel: str = "towers"
    """How ranks share the work. 'towers': the paper's model parallel, one tower per rank (R
    replicas x 2 towers); 'data': every rank holds both towers, gradients averaged over all
    ranks; 'owt': "one weird trick" (PAPER.md §7): convolutions data parallel, fc6-fc8 split
    into 1/K of their units on each of K ranks, over all K ranks' images."""


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
    start_timeout_s: float = 30.0
    """Longest wait for wandb's server at start (online); past it the run is recorded offline.
    The other ranks wait this long plus train.dist_timeout_s for rank 0 to start wandb."""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


# ---------------------------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A config file, override or value that cannot run; the message says where and what is valid."""


class ReproWarning(UserWarning):
    """The category of every warning repro itself gives: the commands print these as one line
    (repro/cli.py), and only these, whichever file a warning is reported from."""


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
    "train.parallel": ("towers", "data", "owt"),
    "train.cpu_memory": ("keep", "release"),
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
    ("data.max_pixels", lambda v: v >= 1, ">= 1"),
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
    ("wandb.start_timeout_s", lambda v: v > 0, "> 0"),
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
      train.channels_last, train.compile, train.parallel, train.cpu_memory, wandb.mode must
      be one of their choices;
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
    (repro/net/layers.py spatial_sizes); the batch against the replica count is
    validate_for_layout's, at run time.
    """

    def where(key: str) -> str:
        return origins if isinstance(origins, str) else origins.get(key, "defaults")

    def set_where(key: str) -> str:  # the origin of a value another key's rule names
        origin = where(key)
        if origin == "defaults":
            return "the default"
        return f"set {'on the' if origin == COMMAND_LINE else 'in'} {origin}"

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
            f"must equal data.crop = {d.crop} ({set_where('data.crop')}): the net sees the crop",
        )
    if m.towers in (1, 2) and t.batch_size % m.towers:
        bad(
            "train.batch_size",
            f"must be divisible by model.towers = {m.towers} ({set_where('model.towers')}), "
            f"e.g. {batch_examples(t.batch_size, m.towers)}",
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


def batch_examples(b: int, unit: int) -> str:
    """'train.batch_size=X or train.batch_size=Y': the multiples of unit nearest to b."""
    nearest = sorted({max(unit, b - b % unit), b - b % unit + unit})
    return " or ".join(f"train.batch_size={n}" for n in nearest)


def batch_unit(towers: int, replicas: int, parallel: str) -> int:
    """What train.batch_size must be a multiple of: replicas x towers under 'towers' (each
    replica's share split over its tower ranks), else a multiple of both the K ranks (each
    its own share) and the towers (validate()'s rule)."""
    return replicas * towers if parallel == "towers" else math.lcm(replicas, towers)


def validate_for_layout(cfg: Config, replicas: int) -> None:
    """At run time: the global batch must split evenly over replicas and then over towers.

    Each replica takes batch_size / replicas images and each of its T tower ranks decodes 1/T
    of those (DESIGN "Data"), so batch_size must be a multiple of replicas * towers. Under
    train.parallel 'data' or 'owt' every rank is a replica of its own (`replicas` = K ranks).
    """
    if cfg.train.parallel != "towers":
        return _validate_per_rank_scheme(cfg, replicas)
    unit = batch_unit(cfg.model.towers, replicas, "towers")
    if cfg.train.batch_size % unit:
        b = cfg.train.batch_size
        raise ConfigError(
            f"train.batch_size = {b} cannot be split over {replicas} replica(s) x "
            f"{cfg.model.towers} tower(s): it must be a multiple of {unit}, e.g. "
            + batch_examples(b, unit)
        )


def _validate_per_rank_scheme(cfg: Config, ranks: int) -> None:
    """'data' and 'owt': each of the K ranks decodes and convolves its own batch_size / K images;
    'owt' also gives each rank 1/K of fc8's classes (and of fc6/fc7's units), at least one."""
    b, p = cfg.train.batch_size, cfg.train.parallel
    if b % ranks:
        unit = batch_unit(cfg.model.towers, ranks, p)  # a suggestion validate() takes too
        raise ConfigError(
            f"train.batch_size = {b} cannot be split over {ranks} ranks (train.parallel={p}: "
            f"each rank takes its own images): it must be a multiple of {ranks}, e.g. "
            + batch_examples(b, unit)
        )
    m = cfg.model
    units = min(m.num_classes, m.fc_width * m.towers)
    if p == "owt" and ranks > units:
        raise ConfigError(
            f"train.parallel=owt on {ranks} ranks splits fc8's {m.num_classes} classes and "
            f"fc6/fc7's {m.fc_width * m.towers} units {ranks} ways: use at most {units} ranks"
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


# ---------------------------------------------------------------------------------------------
# Config files: YAML in, YAML out, `section.key=value` overrides, `base:` chains.
#
# A config file mirrors repro/config.py: top-level keys are the sections (model, data, optim,
# train, wandb), nested keys their fields. One more top-level key, `base: other.yaml`, means
# "load that file first (relative to this file's folder), then apply mine"; chains are allowed,
# cycles are an error, and `base: null` (or `none`, or no `base`) means the defaults. Every value is checked against the field's type as it is read, so a
# mistake is reported with the file (or "command line") it came from:
#
# - int fields take ints; float fields take ints or floats (and strings such as `5e-4`, which
#   YAML 1.1 reads as a string); bool fields take only true/false; tuple fields take a list;
#   bools are never numbers and null is never a value.
# - str fields in a file take strings; `on`/`off` (which YAML 1.1 reads as booleans) are turned
#   back into 'on'/'off' for fields whose choices are 'auto'|'on'|'off'. On the command line a
#   str field takes the text as typed (`wandb.name=2012`, `train.compile=off`).
# - Duplicate keys in one mapping are an error (PyYAML would keep the last one silently).
# ---------------------------------------------------------------------------------------------

SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name] for f in fields(Config)}
"""Section name -> its dataclass."""

BASE_KEY = "base"
COMMAND_LINE = "command line"
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _field_types(section: str) -> dict[str, Any]:
    return typing.get_type_hints(SECTIONS[section])


def _closest(word: str, valid: Sequence[str]) -> str:
    match = difflib.get_close_matches(word, valid, n=1, cutoff=0.6)
    return f"did you mean {match[0]!r}? " if match else ""


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return f"a list of {typing.get_args(tp)[0].__name__}"
    return tp.__name__


def _describe(value: Any, limit: int = 60) -> str:
    """`type value` for a message; a long value is cut (a whole file read as one string)."""
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > limit:
        text = f"{text[: limit - 3]}... ({len(text)} characters)"
    return f"{type(value).__name__} {text}"


def _convert(section: str, key: str, value: Any, origin: str) -> Any:
    """The value as the field's type, or a ConfigError naming the key, origin and types."""
    tp = _field_types(section)[key]
    dotted = f"{section}.{key}"

    def wrong() -> ConfigError:
        hint = ""
        if tp is str and origin != COMMAND_LINE:
            hint = " (quote it in YAML: '...')"
        return ConfigError(
            f"{origin}: {dotted}: expected {_type_name(tp)}, got {_describe(value)}{hint}"
        )

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong()
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 5e-4 (no dot) as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{origin}: {dotted}: expected a finite float, got {value!r}")
            return float(value)
        raise wrong()
    if tp is str:
        if isinstance(value, bool) and "on" in CHOICES.get(dotted, ()):
            return "on" if value else "off"  # YAML 1.1 reads on/off as booleans
        if isinstance(value, str):
            return value
        raise wrong()
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise wrong()
        out = []
        for v in value:
            ok = isinstance(v, item) and not (item is int and isinstance(v, bool))
            if not ok:
                raise ConfigError(
                    f"{origin}: {dotted}: expected {_type_name(tp)}, got {_describe(v)} in {value!r}"
                )
            out.append(v)
        return tuple(out)
    raise TypeError(f"{dotted}: field type {tp!r} has no YAML conversion")  # a new field's type


def _check_section(section: Any, origin: str) -> None:
    if section not in SECTIONS:
        valid = list(SECTIONS)
        raise ConfigError(
            f"{origin}: unknown section {section!r}; {_closest(str(section), valid)}"
            f"valid sections: {', '.join(valid)} (and `{BASE_KEY}` in a file)"
        )


def _check_key(section: str, key: Any, origin: str) -> None:
    _check_section(section, origin)
    valid = list(_field_types(section))
    if key not in valid:
        raise ConfigError(
            f"{origin}: unknown key '{section}.{key}'; {_closest(f'{section}.{key}', [f'{section}.{k}' for k in valid])}"
            f"valid keys of {section}: {', '.join(valid)}"
        )


def _apply(
    values: dict[str, dict[str, Any]], origins: dict[str, str], data: Mapping[Any, Any], origin: str
) -> None:
    """Check and merge one layer ({section: {key: value}}) into `values`."""
    for section, body in data.items():
        _check_section(section, origin)
        if body is None:  # `model:` with nothing under it
            continue
        if not isinstance(body, Mapping):
            raise ConfigError(
                f"{origin}: section {section!r} must be a mapping of keys to values, got {_describe(body)}"
            )
        for key, value in body.items():
            _check_key(section, key, origin)
            values[section][key] = _convert(section, key, value, origin)
            origins[f"{section}.{key}"] = origin


def _read_yaml(path: Path, named_by: Path | None = None) -> dict[Any, Any]:
    """The mapping in a config file; `named_by`: the file whose `base:` names this one."""
    via = f" (named by `base:` in {named_by})" if named_by else ""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}{via}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a config file (not UTF-8 text){via}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        line = f", line {e.problem_mark.line + 1}" if e.problem_mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML: {e.problem or e}{via}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_describe(str(e))}{via}") from None
    if data is None:  # an empty file: all defaults
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: not a config file: it must be a mapping of sections "
            f"({', '.join(SECTIONS)}), got {_describe(data)}{via}"
        )
    return data


def _file_chain(
    path: Path, seen: tuple[Path, ...] = (), named_by: Path | None = None
) -> list[tuple[str, dict[Any, Any]]]:
    """[(origin, layer)] for `path` and its bases, the deepest base first."""
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise ConfigError(f"{path}: `base` chain loops back on itself: {chain}")
    data = _read_yaml(path, named_by)
    base = data.pop(BASE_KEY, None)
    layers: list[tuple[str, dict[Any, Any]]] = []
    if isinstance(base, str) and base.strip().lower() not in ("", "none"):
        layers = _file_chain(path.parent / base, (*seen, resolved), path)
    elif base is not None and not isinstance(base, str):
        raise ConfigError(
            f"{path}: base: expected a file name relative to this file, got {_describe(base)}"
        )
    return [*layers, (str(path), data)]


def _parse_override(item: str) -> tuple[str, str, Any]:
    """'section.key=value' -> (section, key, value): parsed as YAML, or the raw text for str fields."""
    dotted, sep, raw = item.partition("=")
    parts = dotted.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        owners = [f"{s}.{dotted.strip()}" for s in SECTIONS if dotted.strip() in _field_types(s)]
        hint = f"did you mean {owners[0]}={raw}? " if len(owners) == 1 and sep else ""
        raise ConfigError(
            f"{COMMAND_LINE}: override {item!r} must look like section.key=value "
            f"(e.g. optim.lr=0.02); {hint}sections: {', '.join(SECTIONS)}"
        )
    section, key = parts
    _check_key(section, key, COMMAND_LINE)
    if _field_types(section)[key] is str:
        try:
            parsed = yaml.safe_load(raw)
        except yaml.YAMLError:
            parsed = None
        # Quoted text loses its quotes; anything else stays exactly as typed.
        return section, key, parsed if isinstance(parsed, str) else raw.strip()
    try:
        return section, key, yaml.safe_load(raw)
    except yaml.YAMLError:
        return section, key, raw  # reported as a type error by _convert


def _build(values: dict[str, dict[str, Any]], origins: dict[str, str]) -> Config:
    cfg = Config(**{s: cls(**values[s]) for s, cls in SECTIONS.items()})
    validate(cfg, origins)
    return cfg


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- the `base` chain of `path` <- `path` <- overrides, then validate.

    `path` None means the defaults (the paper's recipe) plus overrides. Each override is
    `section.key=value`, the value read as YAML (`0.02`, `true`, `[25, 51, 79]`).
    """
    if isinstance(overrides, str):  # one override passed bare, not in a list
        overrides = [overrides]
    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    origins: dict[str, str] = {}
    if path is not None:
        for origin, layer in _file_chain(Path(path)):
            _apply(values, origins, layer, origin)
    for item in overrides:
        section, key, value = _parse_override(item)
        _apply(values, origins, {section: {key: value}}, COMMAND_LINE)
    return _build(values, origins)


def config_from_dict(data: Mapping[str, Any], origin: str = "checkpoint") -> Config:
    """A validated Config from a nested dict (config_to_dict's form); missing keys take defaults."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{origin}: config must be a mapping of sections, got {_describe(data)}")
    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    origins: dict[str, str] = {}
    _apply(values, origins, data, origin)
    return _build(values, {k: origin for k in origins})


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the whole resolved config (every field) as YAML; load_config reads it back equal."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(
        "# Resolved config of this run (repro/config.py); load with load_config.\n" + text
    )
    os.replace(tmp, path)  # a reader never sees half a file
    return path
