"""The network and everything needed to run it on any layout of ranks.

`model` (the towers, read like the paper's Figure 2), `layers` (LRN, pooling, dropout),
`parallel` (the cross-tower exchanges, named by their backward), `dist` (replicas x towers
and their process groups), `summary` (per-layer shapes, parameters and FLOPs), `hybrid` and
`hybrid_model` ("one weird trick": its exchanges and its net), `schemes` (what differs between
train.parallel 'towers', 'data' and 'owt').
May import: repro.config. Never data, run, tools or bench.
"""
