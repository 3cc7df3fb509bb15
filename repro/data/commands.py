"""The sub-commands of launch/prepare_data.py: split, imagenet-val, digits, conversions, check,
resize (the 256x256 store), stats.

Each handler takes the parsed arguments and returns an exit code; the launch file builds the
parser (repro.cli) and turns errors into one line. check, resize and stats import their modules when
called, so the other commands work without DALI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from repro.data import convert, prepare
from repro.data.imagecheck import MAX_PIXELS


def _split(a: argparse.Namespace) -> int:
    prepare.split_folders(a.src, a.dst, a.val_fraction, a.seed, a.link, a.overwrite)
    return 0


def _imagenet_val(a: argparse.Namespace) -> int:
    prepare.arrange_imagenet_val(a.val_dir, a.ground_truth, a.synsets, a.dst, a.copy)
    return 0


def _digits(a: argparse.Namespace) -> int:
    root = convert.write_digits(a.root, a.val_fraction, a.seed, a.size, a.overwrite)
    print(f"digits: {root}/train and {root}/val ready")
    return 0


def _converter(which: str):
    def run(a: argparse.Namespace) -> int:
        if which == "fashion-mnist":
            counts = convert.convert_fashion_mnist(a.src, a.dst, a.overwrite)
        else:
            counts = convert.convert_cifar(a.src, a.dst, which, a.overwrite)
        prepare.print_counts(counts)
        return 0

    return run


def _check(a: argparse.Namespace) -> int:
    root = prepare.require_dir(Path(a.root), "image folder")
    fix = f"check writes its list to {root / 'bad_files.txt'}, where the loaders read it"
    prepare.require_output(root, "image folder", fix=fix)  # before the work, not after it
    from repro.data.check import find_bad_images  # here: the other commands work without it

    bad = find_bad_images(root, progress=True, max_pixels=a.max_pixels)
    for path, reason in bad:
        print(f"{path}: {reason}")
    print(f"{len(bad)} bad images under {root}", file=sys.stderr)
    return 1 if bad else 0


def _resize(a: argparse.Namespace) -> int:
    from repro.data import store  # here: needs DALI, the other commands work without it

    result = store.resize_store(a.src, a.dst, a.size, a.quality, a.workers, a.max_pixels)
    print("\n".join(store.summary(result, Path(a.dst))))
    return 0


def _stats(a: argparse.Namespace) -> int:
    root = prepare.require_dir(Path(a.root), "image folder")
    if a.out is None:
        prepare.require_output(root, "image folder", fix="pass --out FILE to write elsewhere")
    else:
        prepare.require_output_file(Path(a.out), "stats.npz")
    from repro.data.stats import compute_stats  # here: the other commands work without it

    stats = compute_stats(root, out=a.out, sample=a.sample, resize=a.resize, seed=a.seed)
    for key, value in stats.items():
        shape = getattr(value, "shape", None)
        print(f"{key}: {f'array {tuple(shape)}' if shape and len(shape) > 1 else value}")
    return 0


def add_commands(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the sub-commands (each sets `run`) and --traceback to the entry point's parser.

    --traceback is taken before the command or after it: each sub-parser has it too, its
    default left unset (SUPPRESS), so that it does not overwrite one given before.
    """
    traceback = {"action": "store_true", "help": "show the traceback on errors"}
    parser.add_argument("--traceback", **traceback)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    def command(name: str, run, summary: str, example: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(run=run)
        sub.add_argument("--traceback", **traceback, default=argparse.SUPPRESS)
        return sub

    def split_args(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--val-fraction",
            type=float,
            default=0.2,
            help="share of each class in val/ (default: %(default)s)",
        )
        sub.add_argument(
            "--seed", type=int, default=0, help="seed of the split (default: %(default)s)"
        )

    overwrite = {"action": "store_true", "help": "replace a destination that holds something else"}
    max_pixels = {
        "type": int,
        "default": MAX_PIXELS,
        "help": "skip (and name) images with more pixels (default: %(default)s)",
    }

    sub = command(
        "split",
        _split,
        "split src/<class>/* into dst/train/<class>/ and dst/val/<class>/",
        "python launch/prepare_data.py split ~/Downloads/flower_photos data/flowers --val-fraction 0.2",
    )
    sub.add_argument("src", help="class-folder collection, e.g. flower_photos/")
    sub.add_argument("dst", help="output folder: dst/train/<class>/ and dst/val/<class>/")
    split_args(sub)
    sub.add_argument(
        "--link",
        choices=prepare.LINK_MODES,
        default="auto",
        help="hard links where possible, else symlinks, else copies (default: %(default)s)",
    )
    sub.add_argument("--overwrite", **overwrite)

    sub = command(
        "imagenet-val",
        _imagenet_val,
        "move ImageNet's flat validation images into <wnid>/ folders",
        "python launch/prepare_data.py imagenet-val /data/imagenet/val "
        "ILSVRC2012_validation_ground_truth.txt synsets.txt",
    )
    sub.add_argument("val_dir", help="folder of ILSVRC2012_val_*.JPEG")
    sub.add_argument("ground_truth", help="the devkit's ILSVRC2012_validation_ground_truth.txt")
    sub.add_argument(
        "synsets", help="wnids in class-id order, one per line (a description may follow)"
    )
    sub.add_argument("--dst", default=None, help="write class folders here instead of in val_dir")
    sub.add_argument("--copy", action="store_true", help="copy instead of moving")

    sub = command(
        "digits",
        _digits,
        "write scikit-learn's digits (no download) as JPEG class folders",
        "python launch/prepare_data.py digits data/digits --size 32",
    )
    sub.add_argument(
        "root", nargs="?", default="data/digits", help="output folder (default: %(default)s)"
    )
    split_args(sub)
    sub.add_argument(
        "--size",
        type=int,
        default=32,
        help="side of the written images in pixels (default: %(default)s)",
    )
    sub.add_argument("--overwrite", **overwrite)

    examples = {
        "fashion-mnist": "~/Downloads/fashion-mnist data/fashion-mnist",
        "cifar10": "~/Downloads/cifar-10-batches-py data/cifar10",
        "cifar100": "~/Downloads/cifar-100-python data/cifar100",
    }
    for name, example in examples.items():
        what = "idx files" if name == "fashion-mnist" else "python batches"
        sub = command(
            name,
            _converter(name),
            f"convert {name}'s downloaded {what} to PNG class folders",
            f"python launch/prepare_data.py {name} {example}",
        )
        sub.add_argument("src", help=f"folder holding the downloaded {what}")
        sub.add_argument("dst", help="output folder")
        sub.add_argument("--overwrite", **overwrite)

    sub = command(
        "check",
        _check,
        "list images that fail to decode (exit 1 if any)",
        "python launch/prepare_data.py check data/flowers",
    )
    sub.add_argument("root", help="image folder to check; the list goes to root/bad_files.txt")
    sub.add_argument("--max-pixels", **max_pixels)

    sub = command(
        "resize",
        _resize,
        "write the paper's 256x256 store (§2): each image's central square, resized, as JPEG",
        "python launch/prepare_data.py resize /data/imagenet /data/imagenet256 --size 256",
    )
    sub.add_argument("src", help="image tree: class folders, or a data root with train/ and val/")
    sub.add_argument("dst", help="output folder, outside src; the same tree, every image size^2")
    sub.add_argument(
        "--size", type=int, default=256, help="side of the stored squares (default: %(default)s)"
    )
    sub.add_argument(
        "--quality", type=int, default=90, help="JPEG quality, 1-100 (default: %(default)s)"
    )
    sub.add_argument(
        "--workers",
        type=int,
        default=0,
        help="decode and encode threads, 0 for one per core (default: %(default)s)",
    )
    sub.add_argument("--max-pixels", **max_pixels)

    sub = command(
        "stats",
        _stats,
        "compute the mean image and PCA lighting statistics of root/train",
        "python launch/prepare_data.py stats data/flowers --sample 2000",
    )
    sub.add_argument("root", help="data root holding train/")
    sub.add_argument("--out", default=None, help="output file (default: root/stats.npz)")
    sub.add_argument(
        "--sample", type=int, default=0, help="images to use, 0 for all (default: %(default)s)"
    )
    sub.add_argument(
        "--resize",
        type=int,
        default=256,
        help="shorter side before the central crop (default: %(default)s)",
    )
    sub.add_argument(
        "--seed", type=int, default=0, help="seed of the sample (default: %(default)s)"
    )
    return parser
