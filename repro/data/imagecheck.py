"""Finding image files that would crash the loader mid-epoch or feed it garbage.

One list of file name endings, `IMAGE_EXTENSIONS`: every format DALI decodes (JPEG, PNG, BMP,
TIFF, WebP, JPEG 2000, PNM), any case. The split command, `check`, the loaders and the store
all use it; a file with another ending (a GIF: DALI cannot decode it) is skipped and counted
in the one warning a scan gives. Hidden files and folders (".name") are ignored everywhere.

Two checks, one cheap and one thorough:

- `inspect(path, max_pixels)`: reads the file's first and last bytes and its header. It
  catches empty files, files that are not images at all (a text file named .jpg, an HTML
  error page saved by a downloader), most truncated downloads (no end marker), and images
  over the pixel limit (decompression bombs); it returns the image's (height, width). The
  start-up index (repro/data/index.py) runs it on every file once and caches the result.
- `repro.data.check.find_bad_images(root_or_paths)`: also decodes every file with DALI, the
  decoder training uses, and names any file DALI fails on or decodes with a corrupt-data
  warning. Given a data set root it writes what it found to `<root>/bad_files.txt`; the
  loaders skip the files listed there.

`bad_files.txt` holds one JSON array per line, ["path relative to root", "reason"], so any
file name (a tab or a newline in it) survives; the older "path<TAB>reason" lines still read.
Run it once on a new data set: `python launch/prepare_data.py check /data/imagenet`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from repro.config import ReproWarning

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".tif", ".tiff", ".webp")
IMAGE_EXTENSIONS += (".jp2", ".j2k", ".pnm", ".ppm", ".pgm", ".pbm")
"""File name endings (any case) read as images: the formats DALI decodes; others are skipped."""
BAD_FILES_NAME = "bad_files.txt"
MAX_PIXELS = 100_000_000
"""Default pixel limit (data.max_pixels): a 10,000 x 10,000 image; larger ones are skipped."""

# (magic bytes at offset 0, format name); RIFF....WEBP is checked apart.
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
)
_ENDS = {"JPEG": (b"\xff\xd9", "no end-of-image marker"), "PNG": (b"IEND", "no IEND chunk")}
# Some writers pad a file after its end marker; look for the marker in this many last bytes.
_TAIL = 1024
_WARN_LIST = 20


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def category(reason: str) -> str:
    """The kind of a reason, for counts: 'truncated JPEG (no ...)' -> 'truncated JPEG'."""
    return reason.split(":")[0].split(" (")[0]


def _format(head: bytes) -> str | None:
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if len(head) > 1 and head[:1] == b"P" and head[1:2] in b"123456":
        return "PNM"
    return None


def quick_check(path: str) -> str | None:
    """None if the file starts like an image DALI decodes (and a JPEG or PNG ends like one)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if not head:
                return "empty file"
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _TAIL))
            tail = f.read(_TAIL)
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    kind = _format(head)
    if kind is None:
        what = "GIF, which DALI cannot decode" if head.startswith(b"GIF8") else f"{head[:4]!r}"
        return f"not an image DALI decodes (starts like {what})"
    marker, missing = _ENDS.get(kind, (b"", ""))
    return None if marker in tail else f"truncated {kind} ({missing})"


def inspect(path: str, max_pixels: int = MAX_PIXELS) -> tuple[str | None, tuple[int, int]]:
    """(None or the reason to skip the file, (height, width) from its header or (0, 0))."""
    from PIL import Image

    reason = quick_check(path)
    if reason is not None:
        return reason, (0, 0)
    _quiet_pil_bomb_warning()
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Image.DecompressionBombError as e:
        return f"over the pixel limit: {e}", (0, 0)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        return f"unreadable header: {type(e).__name__}: {e}", (0, 0)
    if w * h > max_pixels:  # a decompression bomb decodes to gigabytes: skip it, named
        limit = f"{w}x{h} = {w * h:,} pixels > data.max_pixels {max_pixels:,}"
        return f"over the pixel limit: {limit}", (h, w)
    return None, (h, w)


_QUIET = []


def _quiet_pil_bomb_warning() -> None:
    """Ignore PIL's DecompressionBombWarning (the pixel limit is judged here), once per process.

    Not `warnings.catch_warnings()` around each open: it is not thread-safe, and screening
    runs in a thread pool.
    """
    from PIL import Image

    if not _QUIET:
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        _QUIET.append(True)


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


def map_threads(
    fn: Callable, items: Sequence, progress: bool, desc: str, threads: int = 16
) -> list:
    """fn over items in a thread pool (the checks wait on I/O), in order, with a progress bar.

    A list, not a generator: zipped with the items, a generator was never asked past its
    last result, so its bar stopped one short of the total and stayed open.
    """
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = pool.map(fn, items, chunksize=64)
        return list(tqdm(results, total=len(items), desc=desc, disable=not progress, unit="file"))


def list_image_files(root: str | Path) -> list[str]:
    """Every image file under root (recursively, hidden entries ignored), sorted."""
    return walk(root)[0]


def walk(root: str | Path) -> tuple[list[str], Counter]:
    """(image files under root, sorted; Counter of the other files' endings). Recursive and
    following links, as torchvision's ImageFolder; hidden files and folders are ignored."""
    found, others = [], Counter()
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if is_image_name(name):
                found.append(os.path.join(folder, name))
            elif not name.startswith("."):
                others[os.path.splitext(name)[1].lower() or "(no ending)"] += 1
    return found, others


def write_bad_files(root: str | Path, bad: Sequence[tuple[str, str]]) -> Path:
    out = Path(root) / BAD_FILES_NAME
    lines = [f"# files the loaders skip: [path relative to {Path(root).resolve()}, reason]\n"]
    lines += [json.dumps([os.path.relpath(p, root), r], ensure_ascii=False) + "\n" for p, r in bad]
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    tmp.replace(out)  # atomic: a reader never sees half a list
    return out


def read_bad_files(root: str | Path) -> dict[str, str]:
    """{absolute path: reason} from `<root>/bad_files.txt`, or {} when there is none."""
    listing = Path(root) / BAD_FILES_NAME
    if not listing.is_file():
        return {}
    bad = {}
    for line in listing.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        try:
            rel, reason = json.loads(line)
        except ValueError:  # the older "path<TAB>reason" format
            rel, _, reason = line.partition("\t")
        bad[os.path.normpath(os.path.join(root, rel))] = reason or f"listed in {listing}"
    return bad


def warn_skipped(skipped: Sequence[tuple[str, str]], where: str, others: Counter | None = None):
    """One warning: a line counting what was skipped by reason, then the bad images by name
    (the first 20); files of other types are only counted, by ending."""
    others = others or Counter()
    if not skipped and not others:
        return
    kinds = Counter(category(r) for _, r in skipped)
    counts = ", ".join(f"{k} {n}" for k, n in kinds.most_common())
    types = ", ".join(f"{k} {n}" for k, n in sorted(others.items()))
    what = [f"{len(skipped)} unreadable image file(s)"] * bool(skipped)
    what += [f"{sum(others.values())} file(s) of other types"] * bool(others)
    head = f"skipping {' and '.join(what)} in {where}: " + "; ".join(
        x for x in (counts, f"not images DALI decodes: {types}" if types else "") if x
    )
    shown = [f"  {p}: {r}" for p, r in skipped[:_WARN_LIST]]
    if len(skipped) > _WARN_LIST:
        shown.append(f"  ... and {len(skipped) - _WARN_LIST} more")
    hint = "(`python launch/prepare_data.py check ROOT` decodes every file and lists the bad ones)"
    lines = [head, *shown, hint] if skipped else [head]
    warnings.warn("\n".join(lines), ReproWarning, stacklevel=3)


def screen(
    paths: Sequence[str], root: str | Path, progress: bool = False, max_pixels: int = MAX_PIXELS
) -> list[tuple[str, str]]:
    """The files among `paths` a loader must skip: listed in bad_files.txt or failing `inspect`."""
    listed = read_bad_files(root)
    unlisted = [p for p in paths if os.path.normpath(p) not in listed]
    found = map_threads(lambda p: inspect(p, max_pixels)[0], unlisted, progress, "reading headers")
    reasons = dict(zip(unlisted, found))
    return [
        (p, listed.get(os.path.normpath(p)) or reasons[p])
        for p in paths
        if os.path.normpath(p) in listed or reasons[p] is not None
    ]
