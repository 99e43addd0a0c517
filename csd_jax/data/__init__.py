"""Instruction and text data: rendering and tokenisation, TFDS builders, the Grain loader.

- `instruct`: records -> `input_ids` and pre-shifted `labels` (MiniLLM template or chat template).
- `tfds_builder`: local JSONL / JSON / Parquet files and Dolly -> cached ArrayRecord sources.
- `loader`: `BatchLoader`, shuffled per epoch, sharded per process, bucketed or packed,
  resumable, yielding global batches.

Imports grain and tensorflow-datasets; nothing here imports the models.
"""
