"""Tests for csd_jax.metrics: JSONL + TensorBoard writing and reading, progress bar, MFU."""

import io
import json
import math
import pathlib
import struct
import time
import types

import numpy as np
import pytest

from csd_jax.metrics import (MetricsWriter, ProgressBar, crc32c, masked_crc32c, mfu,
                             peak_flops_per_device, read_metrics, read_tensorboard_scalars,
                             transformer_flops_per_token)


def _f32(x: float) -> float:
  return float(np.float32(x))


def _records(path: pathlib.Path) -> list[bytes]:
  data, i, out = path.read_bytes(), 0, []
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    out.append(data[i + 12:i + 12 + n])
    i += 16 + n
  return out


def test_crc32c_known_vectors():
  assert crc32c(b"123456789") == 0xE3069283
  # RFC 3720 (iSCSI) appendix B.4 vectors.
  assert crc32c(bytes(32)) == 0x8A9136AA
  assert crc32c(b"\xff" * 32) == 0x62A8AB43
  assert crc32c(bytes(range(32))) == 0x46DD794E


def test_masked_crc_matches_a_tfrecord_written_by_tensorflow():
  """A TFRecord file shipped in grain's test data: both CRCs of every record must match ours."""
  import grain

  path = pathlib.Path(grain.__file__).parent / "_src/python/testdata"
  path /= "morris_sequence_first_5.tfrecord"
  assert path.exists(), f"grain's test TFRecord moved: {path}"
  data, i, checked = path.read_bytes(), 0, 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    length_crc, data_crc = struct.unpack("<II", data[i + 8:i + 12] + data[i + 12 + n:i + 16 + n])
    assert length_crc == masked_crc32c(data[i:i + 8])
    assert data_crc == masked_crc32c(data[i + 12:i + 12 + n])
    i, checked = i + 16 + n, checked + 1
  assert checked == 5


def test_jsonl_resumed_run_appends_and_last_line_wins(tmp_path):
  with MetricsWriter(tmp_path) as w:
    for step in (1, 2, 3):
      w.write(step, {"loss": 10.0 - step, "lr": np.float32(0.5)})
  with MetricsWriter(tmp_path) as w:  # resumed from the step-2 checkpoint
    w.write(3, {"loss": 33.0})
    w.write(4, {"loss": 44.0, "tokens": 7})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 5
  assert json.loads(lines[0]) == {"step": 1, "loss": 9.0, "lr": 0.5}
  rows = read_metrics(tmp_path)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert rows[2] == {"step": 3, "loss": 33.0}
  assert rows[3] == {"step": 4, "loss": 44.0, "tokens": 7}
  assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_jsonl_nonfinite_becomes_null(tmp_path):
  with MetricsWriter(tmp_path) as w:
    w.write(5, {"loss": float("nan"), "grad_norm": float("inf"), "lr": -float("inf"), "ok": 1.5})
  text = (tmp_path / "metrics.jsonl").read_text()
  assert "NaN" not in text and "Infinity" not in text
  assert json.loads(text) == {"step": 5, "loss": None, "grad_norm": None, "lr": None, "ok": 1.5}


def test_jsonl_is_flushed_per_line_and_a_torn_line_is_survived(tmp_path):
  w = MetricsWriter(tmp_path)
  w.write(1, {"loss": 1.0})
  assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]  # before close: flushed
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 2, "lo')  # a run killed mid-line
  with MetricsWriter(tmp_path) as w:
    w.write(2, {"loss": 2.0})
  assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]


def test_tensorboard_scalars_round_trip(tmp_path, monkeypatch):
  # The two files get numbers 9 and 10, in the same second: read in the order they were written
  monkeypatch.setattr(MetricsWriter, "_uid", 8)
  values = {1: 0.1, 2: 1e40, 7: -3.25, 2**40: float("nan")}
  with MetricsWriter(tmp_path) as w:
    for step, v in values.items():
      w.write(step, {"train/loss": v, "lr": step * 1e-3})
  with MetricsWriter(tmp_path) as w:  # a second file: the directory read covers both
    w.write(-1, {"lr": 2.0})
  got = read_tensorboard_scalars(tmp_path / "tensorboard")
  assert set(got) == {"train/loss", "lr"}
  loss = got["train/loss"]
  assert [s for s, _ in loss] == list(values)
  assert loss[0][1] == _f32(0.1) and loss[0][1] != 0.1
  assert loss[1][1] == math.inf and loss[2][1] == -3.25 and math.isnan(loss[3][1])
  assert got["lr"] == [(s, _f32(s * 1e-3)) for s in values] + [(-1, 2.0)]


def test_tensorboard_reader_rejects_a_bad_crc(tmp_path):
  with MetricsWriter(tmp_path) as w:
    w.write(1, {"loss": 1.0})
  (event_file,) = (tmp_path / "tensorboard").iterdir()
  data = bytearray(event_file.read_bytes())
  assert read_tensorboard_scalars(event_file) == {"loss": [(1, 1.0)]}
  data[-6] ^= 0x01  # inside the last record's data
  event_file.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="crc"):
    read_tensorboard_scalars(event_file)


def test_tensorboard_reader_stops_at_a_truncated_tail(tmp_path):
  with MetricsWriter(tmp_path) as w:
    w.write(1, {"loss": 1.0})
    w.write(2, {"loss": 2.0})
  (event_file,) = (tmp_path / "tensorboard").iterdir()
  event_file.write_bytes(event_file.read_bytes()[:-5])  # a writer killed mid-record
  assert read_tensorboard_scalars(event_file) == {"loss": [(1, 1.0)]}


def test_event_protos_decode_with_protobuf(tmp_path):
  """An independent decoder: the Event/Summary/Value schema built with google.protobuf."""
  from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

  fd = descriptor_pb2.FileDescriptorProto(name="ev_test.proto", package="evtest")
  f = descriptor_pb2.FieldDescriptorProto
  for name, fields in [
      ("Value", [("tag", 1, f.TYPE_STRING, None), ("simple_value", 2, f.TYPE_FLOAT, None)]),
      ("Summary", [("value", 1, f.TYPE_MESSAGE, ".evtest.Value")]),
      ("Event", [("wall_time", 1, f.TYPE_DOUBLE, None), ("step", 2, f.TYPE_INT64, None),
                 ("file_version", 3, f.TYPE_STRING, None),
                 ("summary", 5, f.TYPE_MESSAGE, ".evtest.Summary")])]:
    msg = fd.message_type.add(name=name)
    for fname, number, ftype, type_name in fields:
      label = f.LABEL_REPEATED if name == "Summary" else f.LABEL_OPTIONAL
      msg.field.add(name=fname, number=number, type=ftype, label=label, type_name=type_name)
  pool = descriptor_pool.DescriptorPool()
  pool.Add(fd)
  event_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("evtest.Event"))

  with MetricsWriter(tmp_path) as w:
    w.write(3, {"a": 0.25, "b": -1.0})
    w.write(300000, {"a": 0.5})
  (event_file,) = (tmp_path / "tensorboard").iterdir()
  events = [event_cls.FromString(r) for r in _records(event_file)]
  assert events[0].file_version == "brain.Event:2" and events[0].wall_time > 1e9
  assert [e.step for e in events[1:]] == [3, 300000]
  assert [(v.tag, v.simple_value) for v in events[1].summary.value] == [("a", 0.25), ("b", -1.0)]
  assert [(v.tag, v.simple_value) for v in events[2].summary.value] == [("a", 0.5)]


def test_tensorboard_own_reader(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator

  with MetricsWriter(tmp_path) as w:
    for step in (1, 2, 5):
      w.write(step, {"loss": 1.0 / step})
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(s, _f32(1.0 / s)) for s in (1, 2, 5)]


def test_disabled_writer_creates_nothing(tmp_path):
  workdir = tmp_path / "run"
  with MetricsWriter(workdir, enabled=False) as w:
    w.write(1, {"loss": 1.0})
  assert not workdir.exists()
  assert list(tmp_path.iterdir()) == []
  assert read_metrics(workdir) == []


class _Clock:
  def __init__(self, now: float):
    self.now = now

  def __call__(self) -> float:
    return self.now


def test_progress_bar_non_tty(monkeypatch):
  clock = _Clock(100.0)
  monkeypatch.setattr(time, "monotonic", clock)
  out = io.StringIO()
  bar = ProgressBar(10, stream=out, min_interval_s=0.0)
  # The first update (after compilation) is the baseline: step 2 takes 30 s, step 3 2 s.
  for step, t in [(1, 100.0), (2, 130.0), (3, 132.0)]:
    clock.now = t
    bar.update(step, loss=1.23456 * step, tokens_per_s=12345.6, mfu=0.45 if step == 3 else None)
  bar.close()
  lines = out.getvalue().splitlines()
  assert "\r" not in out.getvalue() and len(lines) == 3
  assert lines[0].startswith("step 1/10") and "ETA ?" in lines[0]
  assert "loss 1.2346" in lines[0] and "12,346 tokens/s" in lines[0] and "MFU" not in lines[0]
  assert "step 2/10" in lines[1] and "ETA 0:04:00" in lines[1]  # 30 s/step x 8 steps left
  assert "step 3/10" in lines[2] and "loss 3.7037" in lines[2] and "MFU 45.0%" in lines[2]
  assert "ETA 0:01:52" in lines[2]  # (132 - 100) / 2 = 16 s/step x 7 steps left


def test_progress_bar_throttles_and_tty_redraws(monkeypatch):
  clock = _Clock(0.0)
  monkeypatch.setattr(time, "monotonic", clock)
  out = io.StringIO()
  bar = ProgressBar(100, stream=out, min_interval_s=10.0)
  for step in (1, 2, 3):
    clock.now = float(step)
    bar.update(step, loss=1.0, tokens_per_s=1.0)
  assert out.getvalue().count("\n") == 1  # only step 1 shown so far
  bar.close()  # shows the held-back step 3
  assert [line.split(" |")[0] for line in out.getvalue().splitlines()] == ["step 1/100",
                                                                          "step 3/100"]

  out = io.StringIO()
  bar = ProgressBar(2, stream=out, min_interval_s=10.0)
  for step in (1, 2):
    clock.now = 10.0 + step
    bar.update(step, loss=1.0, tokens_per_s=1.0)
  assert out.getvalue().count("\n") == 2  # the final step is shown at once, before close()

  tty = io.StringIO()
  tty.isatty = lambda: True
  bar = ProgressBar(2, stream=tty, min_interval_s=0.0)
  bar.update(1, loss=2.0, tokens_per_s=1.0)
  bar.update(2, loss=1.0, tokens_per_s=1.0)
  assert tty.getvalue().count("\r") == 2 and "\n" not in tty.getvalue()
  bar.close()
  assert tty.getvalue().endswith("\n") and "step 2/2" in tty.getvalue().split("\r")[-1]


def test_mfu_and_flops():
  assert mfu(1e15, 2.0, 1e15) == 0.5
  assert mfu(1e15, 2.0, None) is None and mfu(1e15, 0.0, 1e15) is None
  fwd = transformer_flops_per_token(1_000_000, 2, 128, 64, backward=False)
  assert fwd == 2 * 1_000_000 + 4 * 2 * 128 * 64
  assert transformer_flops_per_token(1_000_000, 2, 128, 64, backward=True) == 3 * fwd


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L4", 121e12), ("NVIDIA L40S", None),
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("Some New Chip", None)])
def test_peak_flops_table(kind, peak):
  assert peak_flops_per_device(types.SimpleNamespace(platform="gpu", device_kind=kind)) == peak


def test_peak_flops_cpu_is_none():
  import jax

  assert peak_flops_per_device(jax.devices("cpu")[0]) is None


# ---- object storage (gs://...): no append, no seek; whole objects rewritten on flush ---------
# A local directory forced into the object-store branch (the lead's tests use a GCS emulator).


@pytest.fixture
def object_store(monkeypatch):
  """The object-store branch on a local path, with a clock moved by hand; every whole-object
  write recorded (path name, bytes)."""
  from etils import epath

  from csd_jax.metrics import writer

  monkeypatch.setattr(writer, "_appendable", lambda path: False)
  monkeypatch.setattr(writer, "_LocalFile", None)   # any append-mode open would fail
  clock = types.SimpleNamespace(now=1000.0)
  monkeypatch.setattr(writer, "_clock", lambda: clock.now)
  clock.uploads = []
  write_bytes = epath.Path.write_bytes

  def recorded(self, data):
    clock.uploads.append((self.name, bytes(data)))
    return write_bytes(self, data)

  monkeypatch.setattr(type(epath.Path("/")), "write_bytes", recorded)
  return clock


def test_object_store_buffers_then_rewrites_whole_objects(tmp_path, object_store):
  from csd_jax.metrics.writer import OBJECT_FLUSH_SECONDS

  w = MetricsWriter(tmp_path)
  w.write(1, {"loss": 1.0})   # the first write is stored at once: the objects exist early
  assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]
  w.write(2, {"loss": 2.0})   # within the interval: held in memory
  assert [r["step"] for r in read_metrics(tmp_path)] == [1]
  object_store.now += OBJECT_FLUSH_SECONDS
  w.write(3, {"loss": 3.0})   # the interval passed: the whole file again
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
  w.write(4, {"loss": 4.0})
  assert read_tensorboard_scalars(tmp_path / "tensorboard")["loss"] == [(1, 1.0), (2, 2.0),
                                                                        (3, 3.0)]
  w.flush()                   # what the loop calls before a checkpoint
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
  assert [s for s, _ in read_tensorboard_scalars(tmp_path / "tensorboard")["loss"]] == [1, 2, 3, 4]
  uploads = len(object_store.uploads)
  w.flush()                   # nothing new: no upload
  assert len(object_store.uploads) == uploads
  w.write(5, {"loss": 5.0})
  w.close()                   # close always stores
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
  jsonl = [data for name, data in object_store.uploads if name == "metrics.jsonl"]
  assert len(jsonl) == 4 and jsonl[-1] == (tmp_path / "metrics.jsonl").read_bytes()
  assert all(later.startswith(earlier) for earlier, later in zip(jsonl, jsonl[1:]))


def test_object_store_resume_continues_both_files(tmp_path, object_store):
  with MetricsWriter(tmp_path) as w:
    for step in (1, 2, 3):
      w.write(step, {"loss": 10.0 - step})
  (tmp_path / "metrics.jsonl").write_bytes((tmp_path / "metrics.jsonl").read_bytes()
                                           + b'{"step": 4, "lo')   # an object written by hand
  with MetricsWriter(tmp_path) as w:   # resumed from the step-2 checkpoint
    w.write(3, {"loss": 33.0})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 5 and json.loads(lines[-1]) == {"step": 3, "loss": 33.0}
  assert read_metrics(tmp_path) == [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 8.0},
                                    {"step": 3, "loss": 33.0}]
  assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
  assert read_tensorboard_scalars(tmp_path / "tensorboard")["loss"] == [
      (1, 9.0), (2, 8.0), (3, 7.0), (3, 33.0)]


def test_object_store_files_are_the_local_files_byte_for_byte(tmp_path, monkeypatch):
  """The same writes (and a resume) give the same bytes on a local disk and on object storage."""
  from csd_jax.metrics import writer

  monkeypatch.setattr(writer.time, "time", lambda: 1_700_000_000.25)

  def run(workdir):
    monkeypatch.setattr(MetricsWriter, "_uid", 0)
    for steps in ((1, 2), (2, 3)):
      with MetricsWriter(workdir) as w:
        for step in steps:
          w.write(step, {"loss": 1.0 / step, "nonfinite": float("nan"), "tokens": 3})
    return {p.relative_to(workdir): p.read_bytes() for p in sorted(workdir.rglob("*"))
            if p.is_file()}

  local = run(tmp_path / "local")
  monkeypatch.setattr(writer, "_appendable", lambda path: False)
  assert run(tmp_path / "object") == local
  assert len(local) == 3


def test_only_urls_are_object_storage():
  from etils import epath

  from csd_jax.metrics.writer import _appendable

  assert _appendable(epath.Path("/tmp/run")) and _appendable(epath.Path("run"))
  assert not _appendable("gs://bucket/run") and not _appendable("s3://bucket/run/metrics.jsonl")


def test_the_loop_stores_every_logged_step_before_each_checkpoint(tmp_path, object_store,
                                                                  monkeypatch):
  """On object storage with a flush interval longer than the run, each checkpoint is started
  only after the steps before it are stored: a kill after it loses none of them."""
  from csd_jax.run.checkpoint import Checkpointer
  from csd_jax.config import load_config
  from csd_jax.metrics import writer
  from csd_jax.train.loop import train

  monkeypatch.setattr(writer, "OBJECT_FLUSH_SECONDS", 1e9)
  stored_at_save = {}
  save = Checkpointer.save

  def spy(self, step, *args, **kwargs):
    stored_at_save[step] = [r["step"] for r in read_metrics(tmp_path)]
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(Checkpointer, "save", spy)
  tiny = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
  train(load_config(tiny, ["train.steps=4", "checkpoint.every=2", "train.heldout_batches=1"]),
        tmp_path)
  assert stored_at_save == {2: [1, 2], 4: [1, 2, 3, 4]}
