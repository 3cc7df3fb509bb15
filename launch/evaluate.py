"""Evaluate a checkpoint: top-1/top-5 error with the centre patch and the 10 patches (§4.1).

    python launch/evaluate.py runs/demo/checkpoints/best.pt
    python launch/evaluate.py runs/paper/checkpoints/best.pt --data-root /data/imagenet --patches ten
    torchrun --nproc_per_node 2 launch/evaluate.py runs/paper/checkpoints/best.pt   # a tower per GPU

Any checkpoint loads in any layout (one process, or two ranks with one tower each). Writes,
from rank 0, into --out (default: beside the checkpoint, CKPT_DIR/<ckpt stem>_eval/):
    eval.json                      errors, per-class accuracy and confusion matrix per scheme
    confusion_center.png           confusion matrix, centre patch
    confusion_ten.png              confusion matrix, 10 patches
Exit codes: 0 done; 2 a bad input (missing or foreign checkpoint, a data root whose class
count differs from the checkpoint's, an unreadable image, an output folder not writable);
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

from repro import cli


def main() -> int:
    parser = cli.parser(
        "evaluate",
        "Top-1/top-5 error of a checkpoint, centre patch and 10 patches (§4.1).",
        __doc__,
    )
    parser.add_argument("checkpoint", help="a checkpoint .pt written by training")
    parser.add_argument(
        "--data-root", default=None, help="data set with ROOT/val/<class>/* (default: the run's)"
    )
    parser.add_argument("--patches", choices=("center", "ten", "both"), default="both")
    parser.add_argument(
        "--batch",
        type=int,
        default=0,
        help="images per forward pass (default 0: the run's batch size, a tenth of it for ten)",
    )
    parser.add_argument("--out", default=None, help="output folder (default CKPT_DIR/<stem>_eval)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args()
    if args.batch < 0:
        parser.error("--batch must be >= 0")

    def run() -> int:
        from repro.tools.report import run as evaluate

        evaluate(args.checkpoint, args.data_root, args.patches, args.batch, args.out, args.device)
        return 0

    return cli.run("evaluate", run)


if __name__ == "__main__":
    cli.exit_with(main)
