"""The run's plumbing: flags and banner, the run folder's life, checkpoints, data, distributed
processes, progress lines and TensorBoard. Nothing here is the method (see quant/, regularizers/,
hooks.py and engine.py)."""
