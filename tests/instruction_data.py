"""Tiny instruction data for training tests (the `instruction_files` fixture writes it)."""

import pathlib


def colour_records(count: int) -> list[dict[str, str]]:
  """Dolly-form records a tiny model learns within a few steps."""
  return [{"instruction": f"Name colour {i}.", "context": "", "response": f"Colour {i} is blue."}
          for i in range(count)]


def instruction_overrides(files: pathlib.Path) -> list[str]:
  """configs/tiny.yaml overrides that train on `instruction_files` with GPT-2's vocabulary."""
  return ["teacher.config.vocab_size=50257", "student.config.vocab_size=50257",
          "data.source=files", f"data.train_files=[{files / 'train.jsonl'}]",
          f"data.tokenizer={files / 'tokenizer'}", f"data.data_dir={files / 'tfds'}",
          "data.max_prompt_length=12"]
