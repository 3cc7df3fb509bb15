"""Images on disk to batches on the device.

`folders` (the class-folder scan, DataError), `imagecheck` (bad-file screening),
`pipelines` (the DALI graphs), `loaders` (batches for the towers, sharding), `synthetic`
(random batches, no DALI), `stats` (mean image and PCA), `prepare` and `convert` (data set
preparation). Only `pipelines` and what calls it need DALI.
May import: repro.config, repro.net. Never run, tools or bench.
"""
