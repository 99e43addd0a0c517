"""csd_jax.losses: CSD and its baselines as pure functions of arrays (see CSD_MATH.md).

- `logit_loss(name, student_logits, teacher_logits, mask, **params)`: the loss on logits.
- `fused_logit_loss(name, student_hidden, student_head, teacher_hidden, teacher_head, mask)`:
  the same loss and gradients without materialising the logits (token chunks, shardable).
- `per_token_loss(name, student_logits, teacher_logits, **params)`: unreduced values.
- `token_weights(mask, normalize=...)`: the reduction, for callers that split batches;
  `pair_row_weights`, `num_pairs`, `pair_beta`: the chat pairs' objective (see `reduce`).
- `chunked_token_sums(student_hidden, student_head, teacher_hidden, teacher_head, labels)`:
  forward-only held-out sums (token count, CE, top-1 agreement, losses) in O(chunk x V).

This package imports nothing else of csd_jax.
"""

from csd_jax.losses.fused import DEFAULT_CHUNK_SIZE, fused_logit_loss
from csd_jax.losses.heldout import chunked_token_sums
from csd_jax.losses.reduce import (NORMALIZATIONS, PAIR_NONE, PAIR_STUDENT, PAIR_TEACHER,
                                   num_pairs, pair_beta, pair_row_weights, token_weights)
from csd_jax.losses.registry import (IGNORE_LABEL, LOSS_NAMES, LOSSES, logit_loss, per_token_loss,
                                     resolve)

__all__ = [
    "DEFAULT_CHUNK_SIZE", "IGNORE_LABEL", "LOSSES", "LOSS_NAMES", "NORMALIZATIONS", "PAIR_NONE",
    "PAIR_STUDENT", "PAIR_TEACHER", "chunked_token_sums", "fused_logit_loss", "logit_loss",
    "num_pairs", "pair_beta", "pair_row_weights", "per_token_loss", "resolve", "token_weights",
]
