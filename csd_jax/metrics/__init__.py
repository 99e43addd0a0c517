"""Training metrics, one concern per module:

- `tfevents`: the TensorBoard event-file codec (TFRecord framing, crc32c, `Event` protos),
  by hand: no TensorFlow, no `tensorboard` package.
- `writer`: `MetricsWriter` (`metrics.jsonl` + TensorBoard, on a local disk or object storage)
  and its readers, `read_metrics` and `read_tensorboard_scalars`.
- `wandb_logger`: Weights & Biases, optional (`metrics.wandb.project`); imported by the writer
  only when configured, so that `wandb` is never imported otherwise.
- `progress`: `ProgressBar`, the trainer's one-line display (loss, tokens/s, MFU, ETA).
- `flops`: `transformer_flops_per_token`, `model_flops_per_token` (of a model), `count_params`,
  `mfu` and `peak_flops_per_device` (the device table).

The names below are the ones the rest of the project imports from `csd_jax.metrics`.
"""

from csd_jax.metrics.flops import mfu, peak_flops_per_device, transformer_flops_per_token
from csd_jax.metrics.progress import ProgressBar
from csd_jax.metrics.tfevents import crc32c, masked_crc32c
from csd_jax.metrics.writer import MetricsWriter, read_metrics, read_tensorboard_scalars

__all__ = ["MetricsWriter", "ProgressBar", "crc32c", "masked_crc32c", "mfu",
           "peak_flops_per_device", "read_metrics", "read_tensorboard_scalars",
           "transformer_flops_per_token"]
