"""A training run: the loop and everything it reads and writes.

`train` (the loop), `state` (what a run holds; saving, resuming and restoring it), `window`
(the host side of a step: log windows read a step late, the stop request, progress bars),
`optim` (SGD and the schedule of §5), `evaluate` (top-1/top-5, centre and 10-patch),
`checkpoint` (atomic save, load, latest, rank-0 load), `kernels` (determinism, cuDNN
autotuning, torch.compile with an eager fallback), `tracking` (metrics.jsonl and wandb),
`plots` (curves and Figure 3, drawn during training), `rundir` (one owner per run folder),
`agree` (ranks deciding together), `faults` (how a run ends when it cannot go on).
May import: repro.config, repro.net, repro.data. Never tools or bench.
"""
