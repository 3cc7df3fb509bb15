"""The run's configuration: frozen dataclasses, one per YAML section.

configs/*.yaml mirror these classes section by section. Precedence: command-line
`section.key=value` overrides > the YAML file > the defaults below (the paper's recipe).
Section references are to the paper (shared/PAPER.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
