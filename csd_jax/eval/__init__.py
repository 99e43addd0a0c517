"""Judging students by what they write: generation metrics (ROUGE-L, Self-BLEU, perplexity,
teacher KL / CSD: `csd-jax eval`), the task evaluators (`eval --task`: GSM8K, summarisation,
translation), sampled responses and answer files (`csd-jax generate`), Table 1 (`csd-jax
report`)."""
