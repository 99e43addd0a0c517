"""Parameter counts, model FLOPs per token (of a formula or of a model), model FLOP utilisation
(MFU) and the per-device peak FLOP/s table: for the loop's progress line and bench/."""

from __future__ import annotations

import re
from typing import Any

import jax
from flax import nnx

# bf16 dense peak FLOP/s of one device, by `device.device_kind` (case-insensitive); first match
# wins, so the specific patterns come first ("H100 PCIe" before "H100", "v5 lite" before "v5").
_PEAK_BF16 = [
    (r"h100 pcie", 756e12), (r"h100", 989e12), (r"h200", 989e12), (r"a100", 312e12),
    (r"\bl4\b", 121e12), (r"tpu v4\b", 275e12), (r"tpu v5 ?(lite|e)\b", 197e12),
    (r"tpu v5p?\b", 459e12), (r"tpu v6 ?(lite|e)?\b", 918e12),
]


def peak_flops_per_device(device: Any) -> float | None:
  """bf16 dense peak FLOP/s of one JAX device, or None for a CPU or an unknown kind.

  Per device: for a step that runs on several devices the total peak is this times the device
  count (`len(mesh.devices.flat)`), which the caller multiplies in.
  """
  if getattr(device, "platform", "") == "cpu":
    return None
  kind = str(getattr(device, "device_kind", "")).lower()
  return next((peak for pattern, peak in _PEAK_BF16 if re.search(pattern, kind)), None)


def mfu(flops_per_step: float, step_time_s: float, peak_flops: float | None) -> float | None:
  """Model FLOP utilisation as a fraction: flops_per_step / step_time_s / peak_flops.

  `flops_per_step` and `peak_flops` must cover the same devices (global FLOPs with the total
  peak). None when the peak is unknown or a time or peak is not positive.
  """
  if peak_flops is None or peak_flops <= 0 or step_time_s <= 0:
    return None
  return flops_per_step / step_time_s / peak_flops


def transformer_flops_per_token(num_params_matmul: int, num_layers: int, seq_len: int,
                                hidden: int, *, backward: bool) -> float:
  """Model FLOPs per token of a decoder transformer (the PaLM appendix B convention).

  Forward: 2*N for the matmul weights N (embedding lookups excluded; a tied or untied LM head
  included) plus 4*L*T*D for attention scores and weighted values over T keys of width D in L
  layers (causal masking not subtracted). With backward (training) both triple: 6*N + 12*L*T*D.
  Multiply by tokens per step for `mfu`; rematerialisation is not counted (it is not model work).
  """
  factor = 3 if backward else 1
  return factor * (2.0 * num_params_matmul + 4.0 * num_layers * seq_len * hidden)


def count_params(state: Any) -> int:
  """The number of values in a pytree of arrays (an NNX state)."""
  return sum(x.size for x in jax.tree.leaves(state))


def model_flops_per_token(model: Any, seq_len: int, *, backward: bool) -> float:
  """Matmul FLOPs per token of a forward (x3 with the backward) pass: every parameter that
  multiplies (the LM head included, the embedding lookup and learned positions not) plus
  attention's scores and values."""
  cfg = model.cfg
  matmul = count_params(nnx.state(model, nnx.Param))
  if not cfg.tie_word_embeddings:
    matmul -= cfg.vocab_size * cfg.hidden_size  # the lookup table; the head is counted
  if model.pos_embed is not None:
    matmul -= model.pos_embed.get_value().size
  return transformer_flops_per_token(matmul, cfg.num_layers, seq_len,
                                     cfg.num_heads * cfg.head_dim, backward=backward)
