"""csd-jax: Concrete Score Distillation for LLMs in JAX."""
