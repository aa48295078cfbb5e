"""Benchmarks, entry point ``tools/benchmark.py`` (``python tools/benchmark.py --help``).

- :mod:`~detkit.bench.split`: any config's train-step and inference throughput, peak memory and the
  step's time split by part (``--config``).
- :mod:`~detkit.bench.peers`: losses, assigners and data loading against their usual implementations.
- :mod:`~detkit.bench.train_step`: detkit's FCOS vs torchvision's, one training step and batched inference.
- :mod:`~detkit.bench.epochs`: whole epochs through the trainer, for several configs.

Every peer comparison runs both sides in the same process, alternated after warm-up, and reports
ratios; absolute times are only meaningful on a quiet machine.
"""
