"""Benchmarks, apart from the library they measure: `kit` (rank spawning, timing, tables),
`step` (one training or inference step per layout), `train`, `exchange`, `data` (the
sub-commands of launch/bench.py), `traffic` (bytes at each cross-tower link, link model) and
`gpu_check` (launch/gpu_check.py: GPU tests and benchmarks within a time budget).
May import: repro.config, net, data, run. Never tools; nothing below imports bench.
"""
