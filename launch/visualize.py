"""Pictures of a trained net: conv1 kernels (Figure 3), activation maps, training curves.

    python launch/visualize.py kernels runs/demo/checkpoints/best.pt
    python launch/visualize.py activations runs/demo/checkpoints/best.pt photo.jpg
    python launch/visualize.py curves runs/demo

Default outputs (--out PNG overrides; its folder is made):
    kernels      CKPT_DIR/<ckpt stem>_kernels.png, and the colour-specificity scores in
                 CKPT_DIR/<ckpt stem>_kernels.json (always beside the PNG, same name)
    activations  CKPT_DIR/<ckpt stem>_activations_<image stem>.png
    curves       RUN_DIR/curves.png
Colour specificity of a kernel w (3, k, k): 1 - ||g||^2 / ||w||^2, g the projection of each
pixel's RGB weights onto grey (1,1,1)/sqrt(3); 0 colour-agnostic, 1 pure colour, 2/3 random.
Exit codes: 0 done; 2 a bad input (missing or foreign checkpoint, unreadable image, a run
folder without metrics.jsonl, an output folder not writable); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse

from repro import cli


def main() -> int:
    parser = cli.parser(
        "visualize", "Figure 3 kernels, activation maps and training curves of a run.", __doc__
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter
    k = sub.add_parser(
        "kernels",
        help="conv1 kernels per tower (Figure 3) and their colour specificity",
        epilog="example: python launch/visualize.py kernels runs/demo/checkpoints/best.pt\n"
        "writes CKPT_DIR/<stem>_kernels.png and .json unless --out is given",
        formatter_class=raw,
    )
    k.add_argument("checkpoint")
    k.add_argument("--out", default=None, help="PNG path (the .json goes beside it)")
    a = sub.add_parser(
        "activations",
        help="mean conv1..conv5 activation per tower over an image",
        epilog="example: python launch/visualize.py activations runs/demo/checkpoints/best.pt "
        "photo.jpg\nwrites CKPT_DIR/<stem>_activations_<image stem>.png unless --out is given",
        formatter_class=raw,
    )
    a.add_argument("checkpoint")
    a.add_argument("image")
    a.add_argument("--out", default=None, help="PNG path")
    c = sub.add_parser(
        "curves",
        help="loss, validation error and lr from RUN_DIR/metrics.jsonl",
        epilog="example: python launch/visualize.py curves runs/demo\n"
        "writes RUN_DIR/curves.png unless --out is given",
        formatter_class=raw,
    )
    c.add_argument("run_dir", metavar="RUN_DIR")
    c.add_argument("--out", default=None, help="PNG path")
    args = parser.parse_args()

    def run() -> int:
        from repro.tools import visualize

        if args.command == "kernels":
            visualize.kernels(args.checkpoint, args.out)
        elif args.command == "activations":
            visualize.activations(args.checkpoint, args.image, args.out)
        else:
            visualize.curves(args.run_dir, args.out)
        return 0

    return cli.run("visualize", run)


if __name__ == "__main__":
    cli.exit_with(main)
