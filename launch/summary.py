"""Print the per-layer table of a config's net: output shape, parameters, multiply-adds.

python launch/summary.py                                  # the paper's net
python launch/summary.py configs/ablation_one_tower.yaml
python launch/summary.py configs/demo.yaml model.fc_width=256
python launch/summary.py model.towers=1                   # the paper's net, overridden
"""

from __future__ import annotations

from pathlib import Path

from repro import cli

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper.yaml"


def main() -> int:
    parser = cli.parser(
        "summary", "Per-layer summary of the network, per tower and in total.", __doc__
    )
    parser.add_argument("config", nargs="?", help="YAML config (default: the paper's net)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args()

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not Path(config).exists():  # only overrides were given
        config, overrides = None, [config, *overrides]

    def run() -> int:
        from repro.config import load_config
        from repro.net.summary import format_summary

        # A summary reads the model section alone: the data source is made synthetic (last,
        # so it wins), so a config that names no data folder, as a model-only one does, is not
        # refused for it; the model's own rules (and data.crop = model.image_size) still hold.
        synthetic = [*overrides, "data.source=synthetic"]
        print(format_summary(load_config(config or PAPER, synthetic).model))
        return 0

    return cli.run("summary", run)


if __name__ == "__main__":
    cli.exit_with(main)
