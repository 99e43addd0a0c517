"""The data's shared names: the label that carries no target, the record fields, the templates.

Every module of `csd_jax.data` (and evaluation, and generation) takes them from here, so none
needs another for a constant. `IGNORE_INDEX` equals `csd_jax.losses.IGNORE_LABEL`, the label the
losses skip (the loss library imports nothing of the project, so it names its own; a test ties
the two).
"""

IGNORE_INDEX = -100   # a label that is no target: prompt tokens, padding

TEMPLATE_NAMES = ("minillm", "chat", "none")   # data.template

# The aliases of each field, first found first used; `dialogue` / `summary` are DialogSum's
# (speculative_kd's summ_*.json), the others cover Dolly, Alpaca, GSM8K and prompt pairs.
INSTRUCTION_FIELDS = ("instruction", "prompt", "question", "dialogue")
CONTEXT_FIELDS = ("context", "input")
RESPONSE_FIELDS = ("response", "output", "completion", "answer", "summary")
