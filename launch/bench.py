"""Benchmarks, one sub-command each; the logic lives in repro/bench/.

    python launch/bench.py data --workers 2       # DALI vs a torch DataLoader, images/s
    python launch/bench.py train                  # training images/s and MFU, every layout
    python launch/bench.py infer                  # evaluation images/s, every layout
    python launch/bench.py exchange               # bytes and time at the cross-tower links
    python launch/bench.py <command> --help

Each sub-command module has `add_arguments(parser)` and `run(args)`; add one to COMMANDS,
with its examples (printed by `<command> --help`). `args.command` names the sub-command
(train and infer share one module).
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from repro import cli

# sub-command -> (module in repro/ with add_arguments and run, one-line help).
COMMANDS = {
    "data": ("repro.bench.data", "images/s of the DALI training pipeline vs a torch DataLoader"),
    "train": ("repro.bench.train", "training images/s and MFU: 1 process, 2 ranks, 2R ranks"),
    "infer": ("repro.bench.train", "evaluation images/s and MFU: 1 process, 2 ranks, 2R ranks"),
    "exchange": (
        "repro.bench.exchange",
        "bytes per image at each cross-tower link, time on 2 ranks",
    ),
}


# sub-command -> the examples its --help ends with.
EXAMPLES = {
    "data": ["python launch/bench.py data --workers 2"],
    "train": [
        "python launch/bench.py train                      # CPU: 1 process, 2 and 4 ranks",
        "python launch/bench.py train --layouts 1 --batch 32 --compare torchvision",
        "python launch/bench.py train --batch 128 512 --precision bf16 --compile on   # GPUs",
    ],
    "infer": [
        "python launch/bench.py infer --layouts 1 2 --batch 64",
        "python launch/bench.py infer --layouts 1 --batch 64 --compare torchvision",
    ],
    "exchange": [
        "python launch/bench.py exchange                   # 2 ranks, batch 32 on the CPU",
        "python launch/bench.py exchange --mode infer --batch 64",
    ],
}


def check_out(out: str | None) -> None:
    """A PrepareError if --out is a folder or its folder cannot be made or written."""
    from repro.data.prepare import require_output_file

    if out:
        require_output_file(Path(out), "bench.json", "a JSON file")


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("bench", __doc__.splitlines()[0], __doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, summary) in COMMANDS.items():
        examples = "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[name])
        command = sub.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.set_defaults(module=module)
        importlib.import_module(module).add_arguments(command)
    args = parser.parse_args(argv)

    # Bad input (a missing data folder, an impossible layout, an --out that cannot be written)
    # is one line and exit code 2, as in every launch/ command.
    def measure() -> None:
        check_out(args.out)  # before the minutes of measuring, not after them
        importlib.import_module(args.module).run(args)  # prints its table, writes its JSON

    from repro.data.prepare import PrepareError  # the --out check's (no torch behind it)

    return cli.run("bench", measure, also=(OSError, PrepareError))


if __name__ == "__main__":
    cli.exit_with(main)
