"""csd_jax.runtime.logs: the commands' output carries no third-party banners."""

import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: the banners are printed once per process, at import or build.
_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.modules["torch"] = None  # as on a machine without torch: transformers' banner case
    from csd_jax.runtime.logs import setup_logging

    setup_logging()
    import transformers  # noqa: F401
    from csd_jax.data import tfds_builder

    data, cache = sys.argv[1], sys.argv[2]
    for _ in range(2):  # a fresh build, then the cached one
      splits = tfds_builder.instruction_files({"train": [data]}, cache)
      print("records", len(splits["train"]))
""")

_BANNERS = ("PyTorch was not found", "Models won't be available", "Downloading and preparing",
            "downloaded and prepared", "Using custom data configuration")


def test_no_third_party_banners(tmp_path):
  data = tmp_path / "train.jsonl"
  data.write_text('{"instruction": "Say hi.", "response": "hi"}\n'
                  '{"instruction": "Say bye.", "response": "bye"}\n')
  env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_")}
  result = subprocess.run(
      [sys.executable, "-c", _SCRIPT, str(data), str(tmp_path / "cache")], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=300)
  output = result.stdout + result.stderr
  assert result.returncode == 0, output
  assert result.stdout.splitlines() == ["records 2", "records 2"], output
  assert not [banner for banner in _BANNERS if banner in output], output


_WAKEUP_SCRIPT = textwrap.dedent("""
    import asyncio, gc
    from csd_jax.runtime.logs import setup_logging

    class Wakeup:  # Python reports an error raised in __del__ as unraisable, as it does an
      def __init__(self, call):  # error raised in TensorStore's C++ callbacks
        self.call = call
      def __del__(self):
        self.call()

    setup_logging()
    loop = asyncio.new_event_loop()
    loop.close()
    Wakeup(lambda: loop.call_soon_threadsafe(print))  # after a failed save closed Orbax's loop
    def real_error():
      raise ValueError("a real error keeps its traceback")
    Wakeup(real_error)
    gc.collect()
    import errno, logging
    full = OSError(errno.ENOSPC, "No space left on device")
    logging.getLogger("asyncio").error("Task exception was never retrieved",
                                       exc_info=(OSError, full, None))
    logging.getLogger("asyncio").error("Task exception was never retrieved",
                                       exc_info=(KeyError, KeyError("a bug"), None))
""")


def test_a_closed_event_loop_woken_after_a_failed_save_prints_nothing():
  result = subprocess.run([sys.executable, "-c", _WAKEUP_SCRIPT], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  assert "Event loop is closed" not in result.stderr, result.stderr
  assert result.stderr.count("Traceback") == 1, result.stderr
  assert "ValueError: a real error keeps its traceback" in result.stderr
  # a save that failed for want of space is csd-jax's own one line; any other stays, in one line
  assert result.stderr.count("never retrieved") == 1, result.stderr
