"""The paper's 256x256 store (§2): every image's central square, resized once and saved.

"We down-sampled the images to a fixed resolution of 256 x 256": the paper rescaled the
shorter side to 256 and kept the central square, once for all of ImageNet. `resize_store(src,
dst)` does that to any tree of images (class folders, a prepared data root with train/ and
val/, ImageNet's layout with a flat val/): each image file under src is written to the same
relative path under dst as a size x size JPEG. The pixels are DALI's, from the same graph
the on-the-fly path uses (repro/data/pipelines.py `square_pipeline`), so training on the
store differs from training on the originals only by the JPEG encoding (about a grey level
at quality 90). The loaders, evaluation and statistics see that every image is already
size x size and skip the resize (`stored=True`).

- Names: a JPEG keeps its name (ImageNet's label files name the files); another format gets
  the ending .jpg. A JPEG already size x size is copied as it is.
- Re-runnable: an output is written under a hidden temporary name and renamed when whole,
  so an interrupted run leaves no half file under a real name. A rerun skips outputs that
  are whole JPEGs of the right size and redoes the rest (temporary leftovers are removed).
  The settings are kept in dst/.store.json; another size or quality into the same dst is
  refused.
- Never writes into src: dst may not be src, lie inside it or contain it.
- Bad files (as `check` names them: not an image, truncated, over the pixel limit, failing
  to decode, decoding with corrupt-data warnings) are skipped and returned with the reason.
- Top-level files that are not images (label files, meta.mat) are copied; bad_files.txt,
  stats.npz and the index caches are not (they describe the originals).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from repro.data import imagecheck
from repro.data.prepare import PrepareError, require_dir, require_output

MARKER = ".store.json"
JPEG_ENDINGS = (".jpg", ".jpeg", ".jpe")
_NOT_COPIED = {imagecheck.BAD_FILES_NAME, "stats.npz"}


def target_name(rel: str) -> str:
    """The store's name for a source file: a JPEG keeps it, another format ends in .jpg."""
    return rel if rel.lower().endswith(JPEG_ENDINGS) else os.path.splitext(rel)[0] + ".jpg"


def _partial(target: Path) -> Path:
    return target.with_name(f".{target.name}.partial")


def _check_places(src: Path, dst: Path) -> None:
    s, d = src.resolve(), dst.resolve()
    if s == d or d.is_relative_to(s) or s.is_relative_to(d):
        raise PrepareError(
            f"destination {dst} and source {src} overlap: the store is written beside the "
            "originals, never into them; choose a folder outside the source"
        )


def _check_marker(dst: Path, settings: dict) -> None:
    marker = dst / MARKER
    try:
        before = json.loads(marker.read_text())
    except (OSError, ValueError):
        before = None
    if before is not None and (before["size"], before["quality"]) != (
        settings["size"],
        settings["quality"],
    ):
        raise PrepareError(
            f"{dst} holds a store of size {before['size']} at quality {before['quality']}; "
            f"asked for size {settings['size']} at quality {settings['quality']}: choose "
            "another destination (or delete that one)"
        )
    dst.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(settings, indent=1))


def _done(target: Path, size: int) -> bool:
    """True when target is a whole JPEG of size x size (a finished output)."""
    reason, hw = imagecheck.inspect(str(target))
    return reason is None and hw == (size, size) and target.suffix.lower() in JPEG_ENDINGS


def resize_store(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    size: int = 256,
    quality: int = 90,
    threads: int = 0,
    max_pixels: int = imagecheck.MAX_PIXELS,
    progress: bool = True,
) -> dict:
    """Write the size x size store of every image under src to dst (see the module docstring).

    Returns {"written", "copied", "kept", "bad": [(source path, reason)], "others"}.
    """
    src, dst = Path(src), Path(dst)
    require_dir(src, "source folder")
    if size < 1 or not 1 <= quality <= 100:
        raise PrepareError(f"need size >= 1 and quality in 1..100, got {size} and {quality}")
    _check_places(src, dst)
    require_output(dst)
    threads = threads or os.cpu_count() or 1
    _check_marker(dst, {"src": str(src.resolve()), "size": size, "quality": quality})

    files, others = imagecheck.walk(src)
    rels = [os.path.relpath(p, src) for p in files]
    targets: dict[str, str] = {}
    for rel in rels:
        name = target_name(rel)
        if name in targets:
            raise PrepareError(
                f"{src / targets[name]} and {src / rel} would both be stored as {dst / name}; "
                "rename one of them"
            )
        targets[name] = rel
    others -= _copy_top_level(src, dst)  # label files are copied, not "left out"

    many = progress and len(rels) > 20000
    done = imagecheck.map_threads(
        lambda r: _done(dst / target_name(r), size), rels, many, "outputs done", threads * 4
    )
    kept = {rel for rel, whole in zip(rels, done) if whole}
    todo = [r for r in rels if r not in kept]
    screened = imagecheck.map_threads(
        lambda r: imagecheck.inspect(str(src / r), max_pixels), todo, many, "headers", threads * 4
    )
    bad: list[tuple[str, str]] = []
    copy, decode = [], []
    for rel, (reason, hw) in zip(todo, screened):
        if reason is not None:
            bad.append((str(src / rel), reason))
        elif hw == (size, size) and rel.lower().endswith(JPEG_ENDINGS):
            copy.append(rel)  # already a size x size JPEG: re-encoding would only lose
        else:
            decode.append(rel)
    for folder, _, names in os.walk(dst):  # temporary files left by a cut run
        for name in names:
            if name.startswith(".") and name.endswith(".partial"):
                os.unlink(os.path.join(folder, name))

    desc = f"store {size}x{size} -> {dst}"
    bar = tqdm(total=len(todo), desc=desc, unit="img", disable=not progress)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        copies = [pool.submit(_save_copy, src / r, dst / target_name(r)) for r in copy]
        for future in copies:
            future.add_done_callback(lambda _: bar.update(1))
        failed = _decode_and_save(src, dst, decode, size, quality, threads, pool, bar)
        for future in copies:
            future.result()  # a copy error surfaces here
    bar.update(len(bad))
    bar.close()
    return {
        "written": len(decode) - len(failed),
        "copied": len(copy),
        "kept": len(kept),
        "bad": sorted(bad + failed),
        "others": dict(others),
    }


def _decode_and_save(src, dst, rels, size, quality, threads, pool, bar) -> list[tuple[str, str]]:
    """Decode the central squares with DALI (bad files named, repro/data/check.py) and hand
    each to the pool to encode; returns the bad ones."""
    from repro.data.check import decode_named

    bad, futures = [], []
    paths = [str(src / r) for r in rels]
    args = {"decode": "cpu", "resize": size}
    for rel, (path, square, reason) in zip(
        rels, decode_named("square_pipeline", args, paths, threads)
    ):
        if reason is not None:
            bad.append((path, reason))
            bar.update(1)
            continue
        pixels = square.numpy().copy()  # (size, size, 3) uint8, apart from DALI's buffer
        future = pool.submit(_save_jpeg, pixels, dst / target_name(rel), quality)
        future.add_done_callback(lambda _: bar.update(1))
        futures.append(future)
        if len(futures) > 4 * threads:  # bound the squares waiting in memory
            futures.pop(0).result()
    for future in futures:
        future.result()  # an encoding error surfaces here
    return bad


def _save_jpeg(pixels: np.ndarray, target: Path, quality: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial(target)
    Image.fromarray(pixels).save(partial, "JPEG", quality=quality)
    os.replace(partial, target)  # whole or absent under the real name


def _save_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial(target)
    shutil.copyfile(source, partial)
    os.replace(partial, target)


def _copy_top_level(src: Path, dst: Path) -> Counter:
    """Label files and the like beside the images: copied, so the store is a data root too.
    Returns the endings of the top-level files handled here."""
    handled = Counter()
    for entry in os.scandir(src):
        name = entry.name
        if entry.is_file() and not name.startswith(".") and not imagecheck.is_image_name(name):
            handled[os.path.splitext(name)[1].lower() or "(no ending)"] += 1
            if name not in _NOT_COPIED and not (dst / name).exists():
                shutil.copy2(entry.path, dst / name)
    return handled


def summary(result: dict, dst: Path) -> Sequence[str]:
    """The lines the command prints: bad files by name, then the counts."""
    lines = [f"{path}: {reason}" for path, reason in result["bad"]]
    others = ", ".join(f"{k} {n}" for k, n in sorted(result["others"].items()))
    lines.append(
        f"{dst}: {result['written']} written, {result['copied']} copied as they were, "
        f"{result['kept']} already done, {len(result['bad'])} bad file(s) skipped"
        + (f"; not images DALI decodes, left out: {others}" if others else "")
    )
    return lines
