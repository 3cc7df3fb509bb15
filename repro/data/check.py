"""The `check` command: decode every image as training would, and list the bad ones.

`find_bad_images(root_or_paths)` reads each file's header (repro.data.imagecheck.inspect:
not an image, truncated, over the pixel limit), then decodes every readable file with DALI,
the decoder training uses. DALI prints "Corrupt JPEG data: ..." for a JPEG damaged in the
middle and decodes it anyway (garbage pixels), naming no file; so the check decodes with
stderr (file descriptor 2) captured, and when a batch fails or prints such a warning, it
decodes that batch's files one by one to name the culprit. Without DALI installed, PIL
decodes instead (the same libjpeg-turbo, but it stays silent on corrupt data).

Given a data set root, the list goes to `<root>/bad_files.txt`, which the loaders read.
    python launch/prepare_data.py check /data/imagenet
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from repro.data.imagecheck import (
    BAD_FILES_NAME,
    MAX_PIXELS,
    full_check,
    inspect,
    list_image_files,
    map_threads,
    write_bad_files,
)

_CORRUPT = ("corrupt", "premature end", "warning")  # what libjpeg & co. print on bad data


def _corrupt(printed: str) -> bool:
    return any(word in printed.lower() for word in _CORRUPT)


def decode_named(
    pipeline: str, args: dict, paths: Sequence[str], threads: int, batch: int = 32
) -> Iterator[tuple[str, Any, str | None]]:
    """(path, DALI's output for it or None, None or why it is bad) for each path, in order.

    Runs repro.data.pipelines.<pipeline> on CPU over batches with file descriptor 2 captured;
    a batch that fails, or makes the decoder print a corrupt-data warning, is decoded again
    one file at a time, so each bad file is named and the good ones still come out.
    """
    import torch

    from repro.data import pipelines

    graph = getattr(pipelines, pipeline)
    runner = pipelines.FedPipeline(graph, args, batch, threads, torch.device("cpu"), False)

    def run(files: list[str]):
        """(output or None, DALI's error or None, what DALI printed) for one batch."""
        saved = os.dup(2)
        with tempfile.TemporaryFile() as printed:
            os.dup2(printed.fileno(), 2)
            out = error = None
            try:
                (out,) = list(runner.run([({}, files)]))
            except pipelines.DecodeError as e:
                error = str(e).split("DALI said: ")[-1]
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            printed.seek(0)
            return out, error, printed.read().decode(errors="replace").strip()

    def each(files: list[str]):
        out, error, printed = run(files)
        if error is None and not _corrupt(printed):
            yield from ((p, out[i], None) for i, p in enumerate(files))
        elif len(files) > 1:  # which file: one at a time (bad files are rare)
            for f in files:
                yield from each([f])
        elif error is not None:
            yield files[0], None, f"DALI cannot decode it: {error[:300]}"
        else:
            lines = " | ".join(printed.splitlines())[:300]
            yield files[0], None, f"corrupt data: DALI warned {lines}"

    for i in range(0, len(paths), batch):
        yield from each(list(paths[i : i + batch]))


def find_bad_images(
    paths_or_root: str | Path | Iterable[str],
    progress: bool = True,
    max_pixels: int = MAX_PIXELS,
    threads: int = 4,
) -> list[tuple[str, str]]:
    """Check the header of each image, decode it, and return [(path, reason)] of the bad ones.

    Decodes with DALI (as training does) where it is installed, else with PIL. Given a
    folder, every image under it is checked (as `walk` lists them) and the list is written
    to `<folder>/bad_files.txt` (an empty list when all are good), which the loaders read.
    """
    root = None
    if isinstance(paths_or_root, (str, Path)):
        root = Path(paths_or_root)
        if not root.is_dir():
            raise FileNotFoundError(f"find_bad_images: {root} is not a folder")
        paths = list_image_files(root)
    else:
        paths = [str(p) for p in paths_or_root]
    found = map_threads(lambda p: inspect(p, max_pixels)[0], paths, progress, "reading headers")
    reasons = dict(zip(paths, found))
    readable = [p for p in paths if reasons[p] is None]
    try:
        decoded = decode_named("shape_pipeline", {}, readable, threads)
        bar = tqdm(decoded, total=len(readable), desc="decoding", unit="file", disable=not progress)
        reasons.update((p, r) for p, _, r in bar if r is not None)
    except ModuleNotFoundError as err:  # no DALI: PIL decodes with the same libjpeg-turbo
        if not (err.name or "").startswith("nvidia"):
            raise
        reasons.update(zip(readable, map_threads(full_check, readable, progress, "decoding")))
    bad = [(p, reasons[p]) for p in paths if reasons[p] is not None]
    if root is not None:
        write_bad_files(root, bad)
    return bad


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m repro.data.check ROOT`: the `check` command without the launcher."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="data set folder; the list goes to ROOT/bad_files.txt")
    args = parser.parse_args(argv)
    bad = find_bad_images(args.root)
    for path, reason in bad:
        print(f"{path}\t{reason}")
    print(f"{len(bad)} bad file(s); list written to {Path(args.root) / BAD_FILES_NAME}")


if __name__ == "__main__":
    main()
