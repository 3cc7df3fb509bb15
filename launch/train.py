"""Train the two-tower AlexNet in any layout.

torchrun --nproc_per_node 2 launch/train.py configs/paper.yaml        # one tower per GPU
python launch/train.py configs/paper.yaml                             # one GPU (or CPU)
python launch/train.py configs/paper.yaml optim.lr=0.02 data.root=/data/imagenet
python launch/train.py configs/demo.yaml train.resume=latest

Two nodes of 8 GPUs (8 replicas x 2 towers); the same command on every node, HOST being
node 0's address (c10d rendezvous: torchrun numbers the nodes itself):
torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id JOB launch/train.py configs/paper.yaml train.batch_size=1024

Exit codes: 0 finished; 1 a fault (non-finite loss, out of memory, a lost rank, a full disk);
2 a bad input; 130 (SIGINT, Ctrl-C) or 143 (SIGTERM) stopped on request (its checkpoint saved
once training began). Under torchrun a stopped worker exits 0, so that torchrun does not
restart it; torchrun itself exits 1 when it was the one signalled.
"""

from __future__ import annotations

from repro import cli


def main() -> int:
    parser = cli.parser("train", "Train AlexNet (2012) as two model-parallel towers.", __doc__)
    parser.add_argument("config", help="YAML file, e.g. configs/paper.yaml")
    # default=[]: without one argparse lists a "*" positional as required when none is given.
    parser.add_argument(
        "overrides", nargs="*", default=[], help="section.key=value, e.g. optim.lr=0.02"
    )
    args = parser.parse_args()

    def run() -> int:
        from repro.config import load_config
        from repro.run.train import main as train

        train(load_config(args.config, args.overrides))
        return 0

    return cli.run("train", run)


if __name__ == "__main__":
    cli.exit_with(main)
