"""Print the per-layer table of a config's net: output shape, parameters, multiply-adds.

python launch/summary.py                                  # the paper's net
python launch/summary.py configs/ablation_one_tower.yaml
python launch/summary.py configs/demo.yaml model.fc_width=256
"""

from __future__ import annotations

from repro import cli


def main() -> int:
    parser = cli.parser(
        "summary", "Per-layer summary of the network, per tower and in total.", __doc__
    )
    parser.add_argument("config", nargs="?", help="YAML config (default: the paper's net)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args()

    def run() -> int:
        from repro.config import load_config
        from repro.net.summary import format_summary

        print(format_summary(load_config(args.config, args.overrides).model))
        return 0

    return cli.run("summary", run)


if __name__ == "__main__":
    cli.exit_with(main)
