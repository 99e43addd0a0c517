"""Writing with a model, apart from judging it (`csd_jax.eval`):

- `command`: `csd-jax generate`, the prompts, the model and the files written.
- `responses`: sampled responses as resumable JSONL, one line a `RowKey` (index, sample, turn).
- `plan`: which rows are sampled together (`plan_batches`: pure, no model, no JAX).
- `prompt_sets`: the prompts of a file, and AlpacaEval / MT-Bench answer files.
- `pairs_file`: `csd-jax pairs`, a teacher's and a student's responses joined into chat pairs.
"""
