"""Finding image files that would crash the loader mid-epoch or feed it garbage.

Two checks, one cheap and one thorough:

- `quick_check(path)`: reads the first and last bytes of a file. It catches empty files,
  files that are not JPEG or PNG at all (a text file named .jpg, an HTML error page saved
  by a downloader) and most truncated downloads (no end-of-image marker near the end).
  The loaders run it on every file when they are built, in a thread pool (it is I/O bound).
- `find_bad_images(root_or_paths)`: fully decodes every file with PIL, which also catches
  corrupt data inside a well-formed file. Given a data set root it writes what it found to
  `<root>/bad_files.txt` ("relative/path<TAB>reason" per line); the loaders skip the files
  listed there, with a warning naming each.

Run it once on a new data set: `python -m repro.data.imagecheck /data/imagenet`.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
"""File name endings (any case) the loaders read as images; other files are ignored."""
BAD_FILES_NAME = "bad_files.txt"

_JPEG_START = b"\xff\xd8\xff"
_JPEG_END = b"\xff\xd9"
_PNG_START = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND"
# Some writers pad a file after its end marker; look for the marker in this many last bytes.
_TAIL = 1024
_WARN_LIST = 20


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def quick_check(path: str) -> str | None:
    """None if the file looks like a whole JPEG or PNG, else the reason it does not."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if not head:
                return "empty file"
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _TAIL))
            tail = f.read(_TAIL)
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    if head.startswith(_JPEG_START):
        return None if _JPEG_END in tail else "truncated JPEG (no end-of-image marker)"
    if head.startswith(_PNG_START):
        return None if _PNG_END in tail else "truncated PNG (no IEND chunk)"
    return f"not a JPEG or PNG (starts with {head[:4]!r})"


def full_check(path: str) -> str | None:
    """None if PIL decodes the whole file, else the reason it cannot."""
    from PIL import Image

    reason = quick_check(path)
    if reason is not None:
        return reason
    try:
        with Image.open(path) as im:
            im.load()  # decodes every pixel: truncated or corrupt data raises here
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        return f"does not decode: {type(e).__name__}: {e}"
    return None


def _check_all(
    paths: Sequence[str], check, progress: bool, desc: str, threads: int = 16
) -> list[tuple[str, str]]:
    bad = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        reasons = pool.map(check, paths, chunksize=64)
        for path, reason in tqdm(
            zip(paths, reasons), total=len(paths), desc=desc, disable=not progress, unit="file"
        ):
            if reason is not None:
                bad.append((path, reason))
    return bad


def list_image_files(root: str | Path) -> list[str]:
    """Every file under root whose name ends in a known image extension, sorted."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        found.extend(os.path.join(folder, f) for f in sorted(files) if is_image_name(f))
    return found


def find_bad_images(
    paths_or_root: str | Path | Iterable[str], progress: bool = True
) -> list[tuple[str, str]]:
    """Fully decode each image and return [(path, reason)] for those that fail.

    Given a folder, every .jpg/.jpeg/.png under it is checked and the list is written to
    `<folder>/bad_files.txt` (an empty file when all are good), which the loaders read.
    """
    root = None
    if isinstance(paths_or_root, (str, Path)):
        root = Path(paths_or_root)
        if not root.is_dir():
            raise FileNotFoundError(f"find_bad_images: {root} is not a folder")
        paths = list_image_files(root)
    else:
        paths = [str(p) for p in paths_or_root]
    bad = _check_all(paths, full_check, progress, desc="decoding images", threads=8)
    if root is not None:
        write_bad_files(root, bad)
    return bad


def write_bad_files(root: str | Path, bad: Sequence[tuple[str, str]]) -> Path:
    out = Path(root) / BAD_FILES_NAME
    lines = [f"# files the loaders skip: path relative to {Path(root).resolve()}<TAB>reason\n"]
    for path, reason in bad:
        rel = os.path.relpath(path, root)
        lines.append(f"{rel}\t{reason}\n")
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(lines))
    tmp.replace(out)  # atomic: a reader never sees half a list
    return out


def read_bad_files(root: str | Path) -> dict[str, str]:
    """{absolute path: reason} from `<root>/bad_files.txt`, or {} when there is none."""
    listing = Path(root) / BAD_FILES_NAME
    if not listing.is_file():
        return {}
    bad = {}
    for line in listing.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        rel, _, reason = line.partition("\t")
        bad[os.path.normpath(os.path.join(root, rel))] = reason or f"listed in {listing}"
    return bad


def screen(paths: Sequence[str], root: str | Path, progress: bool = False) -> list[tuple[str, str]]:
    """The files among `paths` a loader must skip: listed in bad_files.txt or failing quick_check."""
    listed = read_bad_files(root)
    skipped = []
    unlisted = []
    for p in paths:
        reason = listed.get(os.path.normpath(p))
        if reason is None:
            unlisted.append(p)
        else:
            skipped.append((p, reason))
    skipped += _check_all(unlisted, quick_check, progress, desc="checking image headers")
    return skipped


def warn_skipped(skipped: Sequence[tuple[str, str]], where: str) -> None:
    """One warning naming every skipped file (the first 20 and a count beyond that)."""
    if not skipped:
        return
    shown = [f"  {p}: {r}" for p, r in skipped[:_WARN_LIST]]
    more = len(skipped) - len(shown)
    if more:
        shown.append(f"  ... and {more} more")
    warnings.warn(
        f"skipping {len(skipped)} unreadable image file(s) in {where}:\n"
        + "\n".join(shown)
        + "\n(run `python -m repro.data.imagecheck ROOT` to fully decode every file and list the bad"
        " ones in ROOT/bad_files.txt)",
        stacklevel=3,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="data set folder; the list goes to ROOT/bad_files.txt")
    args = parser.parse_args(argv)
    bad = find_bad_images(args.root)
    for path, reason in bad:
        print(f"{path}\t{reason}")
    print(f"{len(bad)} bad file(s); list written to {Path(args.root) / BAD_FILES_NAME}")


if __name__ == "__main__":
    main()
