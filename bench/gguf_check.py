"""`csd-jax convert-gguf` against transformers' own GGUF loader, tensor by tensor.

    python bench/gguf_check.py                 # the installed Gemma 3 270M and SmolLM2 files
    python bench/gguf_check.py FILE.gguf ...   # any GGUF files

Converts each file with csd-jax (float32) and loads it with
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` (torch): every tensor must be equal
bit for bit, and both tokenizers must give the same ids. Slow (transformers parses a 262k
vocabulary twice: about a minute for Gemma 3), so the test suite checks the converted model's
English instead (tests/test_gemma3.py); run this after changing the converter.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file

from csd_jax.demo.assets import gemma3_gguf_path, smollm2_gguf_path
from csd_jax.models.io.gguf import convert_gguf

TEXT = ("Hello world, how are you?  Two  spaces\n\nnew lines 123 café <start_of_turn>user\nhi"
        "<end_of_turn>")


def check(gguf: pathlib.Path) -> bool:
  with tempfile.TemporaryDirectory() as out:
    convert_gguf(gguf, out)
    ours = load_file(str(pathlib.Path(out) / "model.safetensors"))
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    expected = {k: v.numpy() for k, v in reference.state_dict().items()
                if not (k == "lm_head.weight" and reference.config.tie_word_embeddings)}
    differ = sorted(k for k in expected if k not in ours or not np.array_equal(ours[k],
                                                                                 expected[k]))
    extra = sorted(set(ours) - set(expected))
    ids = transformers.AutoTokenizer.from_pretrained(out)(TEXT)["input_ids"]
    reference_ids = transformers.AutoTokenizer.from_pretrained(
        gguf.parent, gguf_file=gguf.name)(TEXT)["input_ids"]
  same_ids = ids == reference_ids
  print(f"{gguf.name}: {len(expected)} tensors, {len(differ)} differ {differ[:4]}, extra "
        f"{extra[:4]}; tokenizer ids {'equal' if same_ids else 'DIFFER'}")
  return not differ and not extra and same_ids


def main(paths: list[str]) -> int:
  files = [pathlib.Path(p) for p in paths] or [
      p for p in (gemma3_gguf_path(pathlib.Path(tempfile.gettempdir())), smollm2_gguf_path())
      if p is not None]
  return 0 if all([check(f) for f in files]) else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
