"""Arrange image files already on disk into the class-folder layout training reads.

`split_folders` splits a class-folder photo collection (TensorFlow's `flower_photos/<class>/`)
into `train/<class>/` and `val/<class>/`; `arrange_imagenet_val` sorts ImageNet's flat
validation images into `<wnid>/` folders from the devkit's ground truth. Both link or move the
files (never re-encode them), check everything before changing anything, and can be re-run:
entries already in place are kept, and a different arrangement is refused unless asked for.

Also the pieces convert.py shares: the error type, the stratified split and the summary table.
"""

from __future__ import annotations

import filecmp
import json
import os
import random
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from repro.data import imagecheck

T = TypeVar("T")

SPLITS = ("train", "val")
LINK_MODES = ("auto", "hard", "symlink", "copy")
SPLIT_MARKER = ".split.json"

VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$", re.IGNORECASE)
WNID = re.compile(r"^n\d{8}$")


class PrepareError(ValueError):
    """Bad input to a data-preparation tool; the message says what, where and what is valid."""


def check_fraction(val_fraction: float) -> None:
    """Refuse a validation fraction outside (0, 1)."""
    if not 0.0 < val_fraction < 1.0:
        raise PrepareError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")


def split_class(
    items: Sequence[T], val_fraction: float, seed: int, key: str
) -> tuple[list[T], list[T]]:
    """Split one class's items into sorted (train, val) lists, seeded by (seed, key).

    Items are sorted before shuffling so the split depends on the set, not on directory order,
    and each class draws from its own generator so adding a class leaves the others' split as
    it was. A class of >= 2 items keeps at least one item on each side.
    """
    ordered = sorted(items)
    # A str seed is hashed with SHA-512 by `random`: stable across runs and PYTHONHASHSEED.
    random.Random(f"{seed}/{key}").shuffle(ordered)
    n = len(ordered)
    n_val = 0 if n < 2 else min(max(int(n * val_fraction + 0.5), 1), n - 1)
    return sorted(ordered[n_val:]), sorted(ordered[:n_val])


def print_counts(counts: dict[str, tuple[int, int]]) -> None:
    """Print a table of images per class (class, train, val, total) with a totals row."""
    width = max(len("class"), *(len(name) for name in counts))
    print(f"{'class':<{width}}  {'train':>7}  {'val':>7}  {'total':>7}")
    for name, (n_train, n_val) in counts.items():
        print(f"{name:<{width}}  {n_train:>7}  {n_val:>7}  {n_train + n_val:>7}")
    n_train = sum(t for t, _ in counts.values())
    n_val = sum(v for _, v in counts.values())
    print(f"{'total':<{width}}  {n_train:>7}  {n_val:>7}  {n_train + n_val:>7}")


def require_dir(path: Path, what: str) -> Path:
    """Return path if it is an existing folder, else raise a PrepareError naming it."""
    if not path.exists():
        raise PrepareError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise PrepareError(f"{what} {path} is not a folder")
    return path


def require_file(path: Path, what: str) -> Path:
    """Return path if it is an existing file, else raise a PrepareError naming it."""
    if not path.is_file():
        raise PrepareError(f"{what} {path} does not exist" + (" as a file" * path.exists()))
    return path


def output_problem(path: Path, beside: bool = False) -> str | None:
    """Why this process cannot write into the folder `path` (making it and any missing
    parents first), as words to follow the path; None when it can.

    beside: the writer also puts a staging folder next to path and renames it into place,
    so path's parent must take new entries too. Writing is tried, by making and removing a
    hidden folder: permission bits miss read-only mounts, /proc and /sys, and root's rights.
    """
    if os.path.lexists(path) and not os.path.isdir(path):
        return "exists and is not a folder"
    place = path.parent if beside else path
    existing = next(p for p in (place, *place.parents) if os.path.lexists(p))
    if not os.path.isdir(existing):
        return f"cannot be made: {existing} is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".repro-write-test-", dir=existing))
    except OSError as err:
        refused = f"takes no new entries ({err.strerror})"
        return refused if existing == path else f"cannot be written: {existing} {refused}"
    return None


def require_output(
    path: Path,
    what: str = "output folder",
    beside: bool = False,
    fix: str = "choose another folder",
) -> Path:
    """Return path if this process can write into it as a folder (`output_problem`), else
    raise a PrepareError naming `what`, the path, what is wrong and `fix`; creates nothing."""
    problem = output_problem(path, beside)
    if problem is not None:
        raise PrepareError(f"{what} {path} {problem}; {fix}")
    return path


def require_output_file(out: Path, example: str, kind: str = "a file") -> Path:
    """Return `out` (an --out FILE) if it is no folder and its folder can be written
    (`output_problem`), else a PrepareError naming --out and the fix; creates nothing."""
    if out.is_dir():
        raise PrepareError(f"--out {out} is a folder: name {kind}, e.g. {out / example}")
    return require_output(out.parent, f"--out {out}: its folder", fix="choose another file")


def copy_atomic(source: Path, target: Path) -> None:
    """Copy source to target through a hidden temporary name, so a cut copy is never mistaken
    for a finished one."""
    partial = target.with_name(f".{target.name}.partial")
    shutil.copy2(source, partial)
    os.replace(partial, target)


# --- split_folders ----------------------------------------------------------------------------


def _class_files(src: Path, verbose: bool = True) -> dict[str, list[str]]:
    """Map each class folder of src to its sorted image file names; skips top-level files
    (LICENSE.txt), hidden entries and empty folders. Images are the files the loaders read
    (repro.data.imagecheck.IMAGE_EXTENSIONS); the others are counted in one line."""
    classes, others = {}, Counter()
    for folder in sorted(src.iterdir()):
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        files = [f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")]
        names = sorted(f.name for f in files if imagecheck.is_image_name(f.name))
        others.update(f.suffix.lower() or "(no ending)" for f in files if f.name not in names)
        if names:
            classes[folder.name] = names
    if others and verbose:
        counts = ", ".join(f"{k} {n}" for k, n in sorted(others.items()))
        print(f"split: left out {sum(others.values())} file(s) the loaders do not read: {counts}")
    if not classes:
        hint = (
            " (it looks split already: pass its train/ folder)" if (src / "train").is_dir() else ""
        )
        raise PrepareError(
            f"{src} holds no class folders with images, expected {src}/<class>/*.jpg{hint}"
        )
    return classes


def _same_file(a: Path, b: Path) -> bool:
    """True if b is a hard link of a, a symlink to it, or a copy with the same contents."""
    try:
        # samefile follows symlinks; filecmp first compares (size, mtime), which copy2 keeps.
        return os.path.samefile(a, b) or filecmp.cmp(a, b, shallow=True)
    except OSError:  # a broken symlink, an unreadable file
        return False


def _survey(src: Path, dst: Path, plan: dict[tuple[str, str], str]):
    """Sort what dst/train and dst/val already hold into entries of the plan that are in place
    (a set of (class, name)) and conflicts (a list of (path, reason))."""
    keep: set[tuple[str, str]] = set()
    conflicts: list[tuple[Path, str]] = []
    classes = {cls for cls, _ in plan}
    for split in SPLITS:
        if not (dst / split).is_dir():
            continue
        for folder in sorted((dst / split).iterdir()):
            if folder.name not in classes or not folder.is_dir():
                conflicts.append((folder, f"{folder.name!r} is not a class folder of {src}"))
                continue
            for entry in sorted(folder.iterdir()):
                if entry.name.startswith(".") and entry.name.endswith(".partial"):
                    entry.unlink()  # left by an interrupted copy
                    continue
                key = (folder.name, entry.name)
                want = plan.get(key)
                if want is None:
                    conflicts.append((entry, f"is not in {src / folder.name}"))
                elif want != split:
                    conflicts.append((entry, f"is in {split}/, this split puts it in {want}/"))
                elif not _same_file(src / folder.name / entry.name, entry):
                    conflicts.append((entry, f"differs from {src / folder.name / entry.name}"))
                else:
                    keep.add(key)
    return keep, conflicts


def _place(source: Path, target: Path, modes: tuple[str, ...]) -> tuple[str, ...]:
    """Put source at target by the first of modes that works; return the modes from that one
    on, so a filesystem without hard links costs one failed call, not one per file."""
    for i, mode in enumerate(modes):
        try:
            if mode == "hard":
                os.link(source, target)
            elif mode == "symlink":
                os.symlink(source.resolve(), target)
            else:
                copy_atomic(source, target)
            return modes[i:]
        except OSError as err:
            if i == len(modes) - 1:
                verb = {"hard": "hard-link", "symlink": "symlink", "copy": "copy"}[mode]
                raise PrepareError(f"cannot {verb} {source} to {target}: {err}") from err
    raise AssertionError("unreachable: modes is never empty")


def split_folders(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    val_fraction: float = 0.2,
    seed: int = 0,
    link: str = "auto",
    overwrite: bool = False,
    verbose: bool = True,
) -> dict[str, tuple[int, int]]:
    """Split a class-folder collection src/<class>/* into dst/train/<class>/ and dst/val/<class>/.

    Each class is split on its own (stratified): sorted, shuffled by (seed, class), round(n *
    val_fraction) images to val, at least one when the class has two or more. Files are hard
    links where the filesystem allows (`link='auto'`; note a hard link shares the bytes, so
    editing one edits the source), else symlinks, else copies; 'hard', 'symlink' or 'copy'
    force one. Both splits get a folder for every class, so they list the same classes.

    Re-runnable: entries already in place are kept and missing ones added. If dst holds another
    split (other seed, fraction or source) the call changes nothing and names a conflicting
    file, unless `overwrite=True`, which removes the conflicting entries first.
    Returns {class: (n_train, n_val)} and, if verbose, prints it as a table.
    """
    src, dst = Path(src), Path(dst)
    check_fraction(val_fraction)
    if link not in LINK_MODES:
        raise PrepareError(f"link must be one of {', '.join(LINK_MODES)}, got {link!r}")
    require_dir(src, "source folder")
    if dst.resolve().is_relative_to(src.resolve()):
        raise PrepareError(f"destination {dst} lies inside source {src}; choose one outside it")
    require_output(dst)
    classes = _class_files(src, verbose)

    plan: dict[tuple[str, str], str] = {}
    counts: dict[str, tuple[int, int]] = {}
    for cls, names in classes.items():
        train, val = split_class(names, val_fraction, seed, cls)
        plan.update({(cls, name): "train" for name in train} | {(cls, n): "val" for n in val})
        counts[cls] = (len(train), len(val))

    keep, conflicts = _survey(src, dst, plan)
    if conflicts and not overwrite:
        path, reason = conflicts[0]
        more = f" (and {len(conflicts) - 1} more entries)" if len(conflicts) > 1 else ""
        before = _read_json(dst / SPLIT_MARKER)
        was = f"; dst was split with seed={before.get('seed')}, val_fraction={before.get('val_fraction')}"
        raise PrepareError(
            f"{dst} holds a different split: {path} {reason}{more}{was if before else ''}; "
            f"asked for seed={seed}, val_fraction={val_fraction}. "
            "Pass --overwrite to replace it, or choose another destination"
        )
    for path, _ in conflicts:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()

    for split in SPLITS:
        for cls in classes:
            (dst / split / cls).mkdir(parents=True, exist_ok=True)
    todo = sorted(key for key in plan if key not in keep)
    modes = ("hard", "symlink", "copy") if link == "auto" else (link,)
    for cls, name in tqdm(
        todo, desc=f"split -> {dst}", unit="file", disable=not (verbose and todo)
    ):
        modes = _place(src / cls / name, dst / plan[cls, name] / cls / name, modes)

    marker = {"src": str(src.resolve()), "seed": seed, "val_fraction": val_fraction}
    (dst / SPLIT_MARKER).write_text(json.dumps(marker | {"counts": counts}, indent=1))
    if verbose:
        print_counts(counts)
        how = {"hard": "hard links", "symlink": "symlinks", "copy": "copies"}[modes[0]]
        print(f"{dst}: {len(todo)} new entries ({how}), {len(keep)} already in place")
    return counts


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# --- arrange_imagenet_val ---------------------------------------------------------------------


def _val_name(index: int) -> str:
    return f"ILSVRC2012_val_{index:08d}.JPEG"


def _read_lines(path: Path, what: str) -> list[str]:
    """The file's lines, trailing blank lines dropped (a blank line inside is kept: it would
    shift every later line's meaning)."""
    lines = require_file(path, what).read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def read_synsets(path: Path) -> list[str]:
    """The ordered wnids of a synset list: one per line, optionally followed by a description
    (`n01440764 tench, Tinca tinca`); line i holds ILSVRC2012 class id i."""
    wnids: list[str] = []
    for lineno, line in enumerate(_read_lines(path, "synset list"), 1):
        wnid = line.split(maxsplit=1)[0] if line.strip() else ""
        if not WNID.match(wnid):
            raise PrepareError(
                f"{path} line {lineno}: expected a wnid like n01440764 first, got {line.strip()!r}"
            )
        wnids.append(wnid)
    duplicates = [w for w, n in Counter(wnids).items() if n > 1]
    if duplicates:
        raise PrepareError(f"{path}: wnid {duplicates[0]} is listed more than once")
    return wnids


def read_ground_truth(path: Path, n_classes: int) -> list[int]:
    """The 1-based class ids of the devkit's ILSVRC2012_validation_ground_truth.txt, one per
    line in file-name order, each checked against 1..n_classes."""
    ids: list[int] = []
    for lineno, line in enumerate(_read_lines(path, "ground-truth file"), 1):
        try:
            class_id = int(line)
        except ValueError:
            raise PrepareError(
                f"{path} line {lineno}: expected one class id (an integer 1..{n_classes}), got "
                f"{line.strip()!r}; pass the devkit's ILSVRC2012_validation_ground_truth.txt"
            ) from None
        if not 1 <= class_id <= n_classes:
            raise PrepareError(
                f"{path} line {lineno}: class id {class_id} is out of range 1..{n_classes} "
                f"(the synset list has {n_classes} entries)"
            )
        ids.append(class_id)
    return ids


def _scan_val(folder: Path) -> dict[int, Path]:
    """{index: path} of the ILSVRC2012_val_*.JPEG files directly in folder."""
    found = {}
    for entry in folder.iterdir():
        match = VAL_NAME.match(entry.name)
        if match and entry.is_file():
            found[int(match.group(1))] = entry
    return found


def arrange_imagenet_val(
    val_dir: str | os.PathLike,
    ground_truth: str | os.PathLike,
    synsets: str | os.PathLike,
    dst: str | os.PathLike | None = None,
    copy: bool = False,
    verbose: bool = True,
) -> dict[str, int]:
    """Move ImageNet's flat validation images into <dst or val_dir>/<wnid>/ class folders.

    `ground_truth` is the devkit's ILSVRC2012_validation_ground_truth.txt (one 1-based class id
    per line, in file-name order); `synsets` the ordered wnid list (line i = id i, a description
    may follow the wnid). Every class gets a folder, even one without images, so the class list
    matches train/. Copies instead of moving with `copy=True`. Idempotent: images already in
    their folder are kept. Everything is checked before any file moves: the image count against
    the ground truth, each id against the synset list, images filed in the wrong class.
    Returns {wnid: n_images} in synset order.
    """
    val_dir, gt = Path(val_dir), Path(ground_truth)
    dst = Path(dst) if dst is not None else val_dir
    require_dir(val_dir, "validation folder")
    wnids = read_synsets(Path(synsets))
    labels = read_ground_truth(gt, len(wnids))
    wnid_of = {i: wnids[c - 1] for i, c in enumerate(labels, 1)}

    flat = _scan_val(val_dir)
    placed: dict[int, Path] = {}
    for wnid in wnids:
        for index, path in _scan_val(dst / wnid).items() if (dst / wnid).is_dir() else ():
            if index in placed:
                raise PrepareError(
                    f"{_val_name(index)} is in both {placed[index].parent} and {path.parent}"
                )
            placed[index] = path

    present = flat.keys() | placed.keys()
    missing = sorted(set(wnid_of) - present)
    extra = sorted(present - set(wnid_of))
    if missing or extra:
        detail = []
        if missing:
            detail.append(
                f"missing {_val_name(missing[0])}"
                + f" and {len(missing) - 1} more" * (len(missing) > 1)
            )
        if extra:
            detail.append(
                f"no class id for {_val_name(extra[0])}"
                + f" and {len(extra) - 1} more" * (len(extra) > 1)
            )
        raise PrepareError(
            f"{val_dir} holds {len(present)} ILSVRC2012_val_*.JPEG images but {gt} has "
            f"{len(labels)} class ids: {'; '.join(detail)}"
        )
    for index, path in sorted(placed.items()):
        if path.parent.name != wnid_of[index]:
            raise PrepareError(
                f"{path} is filed under {path.parent.name} but {gt} line {index} says "
                f"{wnid_of[index]}; was it arranged with another ground truth?"
            )
    # An image both flat and in its folder: kept so by copy=True, or a move cut short.
    both = sorted(flat.keys() & placed.keys()) if not copy else []
    for index in both:
        if not filecmp.cmp(flat[index], placed[index], shallow=False):
            raise PrepareError(
                f"{flat[index]} and {placed[index]} both exist and differ; remove the wrong one"
            )

    todo = sorted(flat.keys() - placed.keys())
    if todo or both or not all((dst / wnid).is_dir() for wnid in wnids):  # else nothing to write
        require_output(dst, "validation folder" if dst == val_dir else "--dst folder")
    for wnid in wnids:
        (dst / wnid).mkdir(parents=True, exist_ok=True)
    verb = "copy" if copy else "move"
    for index in tqdm(todo, desc=f"{verb} -> {dst}", unit="img", disable=not (verbose and todo)):
        source, target = flat[index], dst / wnid_of[index] / flat[index].name
        if copy:
            copy_atomic(source, target)
            continue
        try:
            os.rename(source, target)
        except OSError:  # another filesystem: copy whole, then delete, so a cut is recoverable
            copy_atomic(source, target)
            source.unlink()
    for index in both:
        flat[index].unlink()

    counts = Counter(wnid_of.values())
    if verbose:
        print(
            f"{dst}: {len(labels)} images in {len(wnids)} class folders "
            f"({len(todo)} {'copied' if copy else 'moved'}, {len(placed)} already in place)"
        )
    return {wnid: counts.get(wnid, 0) for wnid in wnids}
