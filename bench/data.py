"""Input pipeline throughput and padding, on Dolly-sized synthetic records with the GPT-2 BPE.

    PYTHONPATH=. python bench/data.py [--bpe-dir .venv/assets/gpt2] [--batches 200]

Records imitate databricks-dolly-15k's shape (a short instruction; context on ~30% of them; a
response of ~60 words with a long tail), rendered with the MiniLLM template and tokenised by the
real GPT-2 BPE (max_length 512, prompt 256, batch 8 as in the paper). The pipeline is the real
one: TFDS ArrayRecord cache -> Grain (shuffle, tokenise, pad or pack, batch, prefetch). Reports
tokens/s (real tokens, padding excluded) and the padding fraction with no buckets (every batch
padded to max_length), with 64-token buckets, and with packing.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import numpy as np
import transformers

from csd_jax.data import tfds_builder
from csd_jax.data.instruct import InstructionTokenizer
from csd_jax.data.loader import BatchLoader, LoaderConfig, padding_fraction

WORDS = ("the model data time answer people water system city world music river power story "
         "light small great many often which would about because through between during under "
         "history science number language family company question example").split()


def synthetic_dolly(n: int, seed: int = 0) -> list[dict[str, str]]:
  rng = np.random.default_rng(seed)

  def text(mean_words: float, sigma: float) -> str:
    count = max(1, int(rng.lognormal(np.log(mean_words), sigma)))
    return " ".join(rng.choice(WORDS, count)).capitalize() + "."

  return [{"instruction": text(14, 0.5), "context": text(90, 0.8) if rng.random() < 0.3 else "",
           "response": text(60, 1.0)} for _ in range(n)]


def run(loader: BatchLoader, batches: int) -> tuple[float, float]:
  next(loader)  # start-up (threads, first reads) is not throughput
  tokens, fractions = 0, []
  start = time.perf_counter()
  for _ in range(batches):
    batch = loader.__next__()
    tokens += int((batch["attention_mask"] > 0).sum())
    fractions.append(padding_fraction(batch))
  return tokens / (time.perf_counter() - start), float(np.mean(fractions))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--bpe-dir", default=".venv/assets/gpt2")
  parser.add_argument("--records", type=int, default=4000)
  parser.add_argument("--batches", type=int, default=200)
  args = parser.parse_args()
  tokenizer = transformers.GPT2TokenizerFast.from_pretrained(args.bpe_dir)
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "dolly_like.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in synthetic_dolly(args.records)))
    source = tfds_builder.instruction_files({"train": [path]}, pathlib.Path(tmp) / "cache")["train"]
    print(f"bench/data.py: {args.records} Dolly-sized records, GPT-2 BPE, batch 8 x <= 512, "
          f"{args.batches} batches each")
    print(f"{'layout':<22}{'tokens/s':>12}{'padding':>10}")
    for name, extra in (("pad to max_length", {"bucket_multiple": 512}),
                        ("buckets of 64", {"bucket_multiple": 64}), ("packing", {"pack": True})):
      encode = InstructionTokenizer(tokenizer, max_length=512, max_prompt_length=256)
      loader = BatchLoader(source, encode, pad_id=encode.pad_id, process_index=0,
                           process_count=1,
                           config=LoaderConfig(global_batch_size=8, max_length=512, **extra))
      rate, padding = run(loader, args.batches)
      print(f"{name:<22}{rate:>12,.0f}{padding:>10.1%}", flush=True)


if __name__ == "__main__":
  main()
