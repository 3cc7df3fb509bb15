"""A trained net back from its checkpoint, and images prepared for it the way evaluation does.

What the tools (evaluate, predict, visualize) share:

- `load_trained(path)`: the checkpoint's config rebuilt (config_from_dict), AlexNet built for
  this process's layout and filled with the checkpoint's full state dict. Checkpoints hold
  every tower's weights, so a checkpoint written by one process or by two ranks loads into
  either; tensors are mapped to the CPU and `data.decode` is reset to 'auto', so a
  checkpoint from a GPU run loads on a CPU-only machine. Every failure is one line: a
  CheckpointError naming the file.
- `eval_data_config(data, root)`: the run's data settings pointed at another data root,
  keeping the run's own mean image (§2: the statistics of the training set the net learnt
  from, not of the set it is tested on).
- `prepare_images(paths, data)`: single image files through the evaluation loader itself
  (repro/data/loaders.py EvalLoader, the DALI eval pipeline): shorter side to data.resize, central
  square, mean subtraction, then the centre patch or the 10 patches of §4.1. A prediction
  therefore sees exactly the pixels `evaluate` sees. Unreadable files come back with the
  reason instead of a tensor; the others still get prepared.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from repro.config import Config, ConfigError, DataConfig, ReproWarning, config_from_dict
from repro.data import imagecheck
from repro.data.folders import DataError, DecodeError, ImageSet
from repro.data.loaders import EvalLoader
from repro.data.stats import STATS_NAME
from repro.net.dist import Layout, LayoutError, single_process_layout
from repro.net.model import AlexNet
from repro.run.checkpoint import CheckpointError, load_checkpoint

VIEWS = {"center": 1, "ten": 10}
"""Views per image of each test-time scheme (§4.1)."""


class OutputError(ValueError):
    """An output path a command cannot write (not a folder, no permission, a read-only disk)."""


def check_device(device: str) -> None:
    """The tools' --device: 'cuda' where no GPU is visible is refused naming that option (the
    layout's own refusal names train.device, the option of training)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise LayoutError(
            "--device cuda was given but no CUDA GPU is visible; use --device auto (the GPU "
            "where there is one, else the CPU) or --device cpu"
        )


def read_trained(path: str | Path) -> tuple[dict, Config, list[str]]:
    """(checkpoint dict, its Config, class names) without building the model.

    The evaluate tool needs the tower count before it can form the process groups, so
    reading and building are two steps; `load_trained` does both.
    """
    state = load_checkpoint(path, map_location="cpu")
    try:
        cfg = config_from_dict(state["config"], origin=f"{path} (its config)")
    except ConfigError as err:
        raise CheckpointError(f"{path}: its config does not load: {err}") from None
    # Where images are decoded is this machine's choice, not part of the trained net: a run
    # that decoded on its GPU ('mixed') is evaluated on a CPU-only machine with CPU decode.
    cfg = replace(cfg, data=replace(cfg.data, decode="auto"))
    n = cfg.model.num_classes
    names = state.get("class_names") or [str(i) for i in range(n)]
    if len(names) != n:
        raise CheckpointError(
            f"{path}: holds {len(names)} class names for a net of {n} classes (model.num_classes)"
        )
    return state, cfg, [str(c) for c in names]


def check_classes(path: str | Path, cfg: Config, found: int, where: str) -> None:
    """A checkpoint can only score data with its own number of classes: say both numbers."""
    if found != cfg.model.num_classes:
        raise CheckpointError(
            f"{path} was trained for {cfg.model.num_classes} classes but {where} has {found}; "
            f"use a checkpoint trained on these {found} classes or point at its data set"
        )


def build_trained(
    path: str | Path, state: dict, cfg: Config, layout: Layout | None = None, device: str = "auto"
) -> AlexNet:
    """AlexNet for `layout` (default: all towers in this process on `device`) with the weights."""
    if layout is None:
        from repro.net.dist import resolve_device

        layout = single_process_layout(cfg.model.towers, resolve_device(device))
    if layout.towers != cfg.model.towers:
        raise CheckpointError(
            f"{path} holds a {cfg.model.towers}-tower net but the layout has {layout.towers} towers"
        )
    model = AlexNet(cfg.model, layout, seed=cfg.train.seed)
    try:
        model.load_full_state_dict(state["model"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: the weights do not fit its own config: {err}") from None
    return model.to(layout.device).eval()


def load_trained(
    path: str | Path,
    layout: Layout | None = None,
    device: str = "auto",
    num_classes: int | None = None,
    where: str = "the data",
) -> tuple[AlexNet, Config, list[str]]:
    """(model in eval mode on the layout's device, the run's Config, class names) of a checkpoint.

    `num_classes`, when given, is the class count the caller is about to use the net for
    (e.g. the data root's class folders, described by `where`); a different count is a
    CheckpointError naming both.
    """
    state, cfg, names = read_trained(path)
    if num_classes is not None:
        check_classes(path, cfg, num_classes, where)
    return build_trained(path, state, cfg, layout, device), cfg, names


def run_stats_path(data: DataConfig) -> str:
    """The statistics file the run normalised with: data.stats, else <root>/stats.npz ('' if none)."""
    if data.stats:
        return data.stats
    return str(Path(data.root) / STATS_NAME) if data.root else ""


def eval_data_config(data: DataConfig, root: str | Path | None = None) -> DataConfig:
    """The run's data settings for evaluating on `root` (default: the run's own data.root).

    The mean image stays the run's (§2: the training set's mean is part of the trained net);
    if its file is not found the new root's stats.npz (or the ImageNet constants, with
    repro.data.stats' warning) stands in, with a warning. A run on 'digits' or 'synthetic'
    data reads another root as plain class folders.
    """
    if root is None or str(root) == data.root:
        if data.source == "synthetic":
            raise DataError(
                "this checkpoint was trained on synthetic data: pass --data-root with "
                "class folders (ROOT/val/<class>/*.jpg)"
            )
        return data
    stats = run_stats_path(data)
    if stats and not Path(stats).is_file():
        if data.mean != "none":
            warnings.warn(
                f"the run's statistics file {stats} is not here; normalising with "
                f"{Path(root) / STATS_NAME} if it exists, else ImageNet's mean",
                ReproWarning,
                stacklevel=2,
            )
        stats = ""
    source = "folders" if data.source in ("digits", "synthetic") else data.source
    return replace(data, root=str(root), stats=stats, source=source)


def writable_dir(folder: str | Path) -> Path:
    """Make `folder` (and parents) and prove a file can be written there, or OutputError."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OutputError(
            f"cannot write to output folder {folder}: {err.strerror or err}"
        ) from None
    return folder


def image_files(inputs: Sequence[str | Path]) -> list[str]:
    """Files named directly (any name, in the given order), then each named folder's
    .jpg/.jpeg/.png files (recursively, sorted).

    A name that is neither a file nor a folder is kept: `prepare_images` reports it as missing,
    and the others are still predicted. If none exists, there is nothing to predict: an error.
    """
    found: list[str] = []
    for item in map(str, inputs):
        if os.path.isdir(item):
            inside = imagecheck.list_image_files(item)
            if not inside:
                raise DataError(
                    f"{item} holds no image files (*{', *'.join(imagecheck.IMAGE_EXTENSIONS)})"
                )
            found += inside
        else:
            found.append(item)
    if not any(os.path.exists(path) for path in found):
        raise DataError(f"no such image file or folder: {', '.join(found)}")
    return found


def unreadable(path: str) -> str | None:
    """Why `path` cannot be an input image (None if it decodes): missing, not an image, corrupt."""
    if not os.path.exists(path):
        return "no such file"
    if not os.path.isfile(path):
        return "not a file"
    return imagecheck.full_check(path)


def prepare_images(
    paths: Sequence[str],
    data: DataConfig,
    patches: str = "center",
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[str, Tensor | None, str | None]]:
    """(path, views (V, 3, crop, crop) float32 on `device`, or None; reason or None) per path.

    V is 1 ('center') or 10 ('ten', §4.1 order: 4 corners and centre, then their mirrors).
    Files PIL cannot decode are reported before DALI sees them; a batch DALI still fails on
    is retried one image at a time, so one bad file costs only itself.
    """
    if patches not in VIEWS:
        raise DataError(f"patches must be one of {sorted(VIEWS)}, got {patches!r}")
    reasons = {p: unreadable(p) for p in paths}
    decoded = _decode([p for p in paths if reasons[p] is None], data, patches, batch_size, device)
    for p in paths:
        if reasons[p] is not None:
            yield p, None, reasons[p]
            continue
        path, got = next(decoded)  # in input order: _decode keeps it
        assert path == p
        yield (p, None, got) if isinstance(got, str) else (p, got, None)


def _decode(
    paths: list[str], data: DataConfig, patches: str, batch_size: int, device: torch.device | str
) -> Iterator[tuple[str, Tensor | str]]:
    """(path, views) through the eval loader; (path, reason) for files DALI fails on."""
    views = VIEWS[patches]
    layout = single_process_layout(1, torch.device(device))  # decoding only: no towers involved

    def loader(chunk: list[str], batch: int) -> EvalLoader:
        labels = np.zeros(len(chunk), np.int64)  # unused: predictions have no labels
        images = ImageSet(Path("."), list(chunk), labels, [])
        return EvalLoader(data, layout, images, batch, patches, channels_last=False)

    pending = list(paths)
    while pending:
        done = 0
        try:
            for images, _ in loader(pending, batch_size):  # (n * views, 3, crop, crop)
                n = images.shape[0] // views
                for j in range(n):
                    yield pending[done + j], images[j * views : (j + 1) * views]
                done += n
            return
        except DecodeError:
            # The batch starting at `done` failed: retry its images alone, go on after it.
            for p in pending[done : done + batch_size]:
                try:
                    ((images, _),) = list(loader([p], 1))
                    yield p, images
                except DecodeError as err:
                    yield p, f"DALI cannot decode it ({str(err)[:200]})"
            pending = pending[done + batch_size :]
