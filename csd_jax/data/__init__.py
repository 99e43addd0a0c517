"""Instruction and text data: rendering and tokenisation, TFDS builders, the Grain loader.

- `instruct`: records -> `input_ids` and pre-shifted `labels` (MiniLLM template or chat template).
- `chat`: where a chat template ends an assistant turn, and `stop_ids`: every token id that ends
  a generation (eos ids of the tokenizer, config.json and generation_config.json; end-of-turn).
- `pairs`: chat pairs (a prompt, the teacher's and the student's response; the official
  reformat.py's file) -> two rows a pair, labelled on the responses, with their `pair_role`.
- `tfds_builder`: local JSONL / JSON / Parquet files and Dolly -> cached ArrayRecord sources.
- `loader`: `BatchLoader`, shuffled per epoch, sharded per process, bucketed or packed,
  resumable, yielding global batches.
- `records` (reading JSON / JSONL / Parquet records) and `batching` (padding to buckets): pure
  functions that evaluation uses too.
- `inputs`: a run's loaders (train, held-out, LM text) from its config.

`tfds_builder` and `loader` import tensorflow-datasets and grain; `records`, `batching`,
`chat` and `instruct` do not (evaluation imports them). Nothing here imports the models.
"""
