"""What a user runs on a trained model: `inference` (load any checkpoint on any machine),
`predict`, `report` (evaluation report), `visualize`.
May import: repro.config, net, data, run. Never bench; nothing below imports tools.
"""
