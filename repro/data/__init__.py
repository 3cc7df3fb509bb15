"""Images on disk to batches on the device.

`folders` (the class-folder layout, DataError), `imagecheck` (the image extensions, cheap
per-file checks, bad_files.txt, the skip warning), `index` (a split's files screened once by
rank 0 and cached), `sets` (which images a run reads, label files), `augment` (the draws of
§4.1 and the normalisation, no DALI), `pipelines` (the DALI graphs), `loaders` (batches for
the towers, sharding, the uint8 gather), `synthetic` (random batches, no DALI), `stats`
(mean image and PCA), `check` (decode every file, name the bad ones), `store` (the 256x256
store of §2), `prepare` and `convert` (data set preparation), `commands` (prepare_data.py).
Only `pipelines` and what calls it need DALI.
May import: repro.config, repro.net. Never run, tools or bench.
"""
