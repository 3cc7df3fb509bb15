"""Prepare image data for training: split, arrange, convert, check and measure class folders.

    python launch/prepare_data.py split flower_photos data/flowers
    python launch/prepare_data.py digits data/digits
    python launch/prepare_data.py <command> --help

Bad input ends the command with exit code 2 and one line on stderr saying why.
"""

from __future__ import annotations

from repro import cli

PROG = "prepare_data"


def main(argv: list[str] | None = None) -> int:
    from repro.data.commands import add_commands  # numpy: here, where a Ctrl-C is one line

    doc = __doc__.splitlines()
    parser = add_commands(cli.parser(PROG, doc[0], "\n".join(doc[1:])))
    args = parser.parse_args(argv)
    # Any ValueError or OSError here is bad input or a file the system refused: one line.
    return cli.run(PROG, lambda: args.run(args), also=(ValueError, OSError), trace=args.traceback)


if __name__ == "__main__":
    cli.exit_with(main)
