"""Top-k classes, with probabilities, of image files according to a checkpoint.

    python launch/predict.py runs/demo/checkpoints/best.pt photo.jpg
    python launch/predict.py runs/demo/checkpoints/best.pt photos/ --top-k 3 --json
    python launch/predict.py runs/demo/checkpoints/best.pt photos/ --patches ten --plot preds/

Images are prepared as evaluation prepares them (shorter side to data.resize, central square,
the run's mean image subtracted) and scored on the centre patch, or on the softmax averaged
over the 10 patches of §4.1. Folders are searched recursively for the image files training reads
(repro.data.imagecheck.IMAGE_EXTENSIONS: .jpg, .jpeg, .png, .bmp, .webp, ... in any case).
--plot DIR writes DIR/<image stem>.png per image (a repeated stem gets _2, _3...): the patch
the net saw (or its 10 patches) beside a bar chart of its top-k, titled with the checkpoint,
its step and the patch mode; the command says where it wrote them.
Exit codes: 0 every image predicted; 1 some images were unreadable (each named on stderr,
the rest still predicted); 2 a bad input (missing or foreign checkpoint, an empty folder, no
image named that exists, a --plot folder not writable); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse

from repro import cli


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main() -> int:
    parser = cli.parser("predict", "Top-k class names and probabilities per image.", __doc__)
    parser.add_argument("checkpoint", help="a checkpoint .pt written by training")
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    parser.add_argument("--top-k", type=positive, default=5, help="classes per image (default 5)")
    parser.add_argument("--patches", choices=("center", "ten"), default="center")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plot", metavar="DIR", default=None, help="write a PNG per image here")
    parser.add_argument("--batch", type=positive, default=32, help="images per forward pass")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args()

    def run() -> int:
        from repro.tools.predict import predict

        skipped = predict(
            args.checkpoint,
            args.images,
            top_k=args.top_k,
            patches=args.patches,
            as_json=args.json,
            plot_dir=args.plot,
            batch_size=args.batch,
            device=args.device,
        )
        return 1 if skipped else 0

    return cli.run("predict", run)


if __name__ == "__main__":
    cli.exit_with(main)
