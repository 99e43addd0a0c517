"""Judging students by what they write: generation metrics (ROUGE-L, Self-BLEU, perplexity,
teacher KL / CSD: `csd-jax eval`), the task evaluators (`eval --task`: GSM8K, summarisation,
translation), Table 1 (`csd-jax report`) and the notebook's per-token loss inspection.
Writing responses to prompt sets (`csd-jax generate`) lives in `csd_jax.generate`."""
