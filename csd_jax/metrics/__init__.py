"""Training metrics (moved from `csd_jax/metrics.py`; split into modules next)."""

from csd_jax.metrics.writer import (MetricsWriter, ProgressBar, crc32c, masked_crc32c, mfu,
                                    peak_flops_per_device, read_metrics, read_tensorboard_scalars,
                                    transformer_flops_per_token)

__all__ = ["MetricsWriter", "ProgressBar", "crc32c", "masked_crc32c", "mfu",
           "peak_flops_per_device", "read_metrics", "read_tensorboard_scalars",
           "transformer_flops_per_token"]
