"""repro: AlexNet (2012) as two model-parallel towers, on today's PyTorch.

Rooms by concern; imports run one way, from the bottom up (tests/test_layering.py keeps it so):

    config  <-  net  <-  data  <-  run  <-  tools, bench  <-  cli

- `repro.config`: the run's configuration (dataclasses, YAML, overrides, validation).
- `repro.net`: the two-tower network, its exchanges and the ranks layout.
- `repro.data`: images on disk to batches on the device (DALI), statistics, preparation.
- `repro.run`: the training loop and what it writes (checkpoints, metrics, plots).
- `repro.tools`: what a user runs on a trained model (evaluate, predict, visualize).
- `repro.bench`: benchmarks and the traffic model.
- `repro.cli`: what every launch/ entry point shares (arguments, one-line errors).
"""
