"""The prepared GPU check: GPU tests, then 1-process (and 2-rank) benchmarks, within a budget.

PYTHONPATH=. python3 launch/gpu_check.py --out runs/gpu_check --budget-s 420
python launch/gpu_check.py --out runs/gpu_check_dry --dry-run      # tiny, on the CPU (CI runs it)

Writes OUT/gpu_check.json (everything) and OUT/gpu_check.md (the table), rewritten after
every row. Exit 0 when every test passed and every row ran, 1 otherwise (the files say
what), 2 for bad input. Needs neither DALI nor wandb. Steps: repro/bench/gpu_check.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

from repro import cli


def main() -> int:
    parser = cli.parser("gpu_check", __doc__.splitlines()[0], __doc__)
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and .md")
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="never run past this many seconds"
    )
    parser.add_argument("--dry-run", action="store_true", help="the same steps, tiny, on the CPU")
    args = parser.parse_args()

    def run() -> int:
        from repro.bench import gpu_check

        command = "python launch/gpu_check.py " + " ".join(sys.argv[1:])
        record = gpu_check.run(args.out, args.budget_s, args.dry_run, command)
        print((Path(args.out) / "gpu_check.md").read_text())
        found = gpu_check.problems(record)
        for line in found:
            print(f"gpu_check: {line}", file=sys.stderr)
        return 1 if found else 0

    from repro.bench.gpu_check import GpuCheckError

    return cli.run("gpu_check", run, also=(GpuCheckError,))


if __name__ == "__main__":
    cli.exit_with(main)
