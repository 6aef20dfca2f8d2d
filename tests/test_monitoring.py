"""EventWriter read back by TensorBoard's own reader (which checks both CRCs of every record),
crc32c test vectors, the byte encoding against protobuf's, rotation, Progress and summaries."""

import io
import logging
import struct
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow

from antidistill_jax import monitoring


def _records(path):
  """Raw records through TensorBoard's stub reader, which raises DataLossError on a bad CRC."""
  reader = pywrap_tensorflow.PyRecordReader_New(str(path))
  out = []
  while True:
    try:
      reader.GetNext()
    except Exception as e:  # OutOfRangeError at the end of the file
      assert type(e).__name__ == "OutOfRangeError", e
      return out
    out.append(reader.record())


def _load(logdir):
  acc = EventAccumulator(str(logdir))
  acc.Reload()
  return acc


@pytest.mark.parametrize("data,crc", [
    (b"", 0x00000000),
    (b"a", 0xC1D04330),
    (b"123456789", 0xE3069283),  # the standard CRC-32C check value
    (bytes(32), 0x8A9136AA),  # RFC 3720 B.4 vectors
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
])
def test_crc32c_vectors(data, crc):
  assert monitoring.crc32c(data) == crc
  assert monitoring.masked_crc32c(data) == pywrap_tensorflow.masked_crc32c(data)


def test_encoding_matches_protobuf_and_reference_bytes():
  got = monitoring.encode_event(1.5, 3, scalars={"a": 2.0})
  ref = event_pb2.Event(wall_time=1.5, step=3, summary=summary_pb2.Summary(
      value=[summary_pb2.Summary.Value(tag="a", simple_value=2.0)]))
  assert got == ref.SerializeToString()
  # Hand-decoded: wall_time (field 1, fixed64), step (2, varint), summary (5) > value (1) >
  # tag (1) "a" and simple_value (2, fixed32).
  assert got == (b"\x09" + struct.pack("<d", 1.5) + b"\x10\x03"
                 + b"\x2a\x0a" + b"\x0a\x08" + b"\x0a\x01a" + b"\x15" + struct.pack("<f", 2.0))
  header = monitoring.encode_event(1e9, file_version="brain.Event:2")
  assert header == event_pb2.Event(wall_time=1e9, file_version="brain.Event:2").SerializeToString()
  # Negative and large steps (10-byte varints), several values, float32 overflow to inf.
  for step in (-1, -(1 << 63), (1 << 63) - 1, 300):
    scalars = {"x": 1e39, "y/z": -0.1, "ü": float("nan")}
    event = event_pb2.Event.FromString(monitoring.encode_event(2.0, step, scalars=scalars))
    assert event.step == step
    values = {v.tag: v.simple_value for v in event.summary.value}
    assert values["x"] == float("inf") and values["y/z"] == np.float32(-0.1)
    assert np.isnan(values["ü"])


def test_tfrecord_framing():
  rec = monitoring.tfrecord(b"abc")
  assert rec[:8] == struct.pack("<Q", 3) and rec[12:15] == b"abc" and len(rec) == 19
  assert struct.unpack("<I", rec[8:12])[0] == pywrap_tensorflow.masked_crc32c(rec[:8])
  assert struct.unpack("<I", rec[15:])[0] == pywrap_tensorflow.masked_crc32c(b"abc")


def test_scalars_read_back_by_tensorboard(tmp_path):
  logdir = tmp_path / "tb" / "run"  # created by the writer
  t0 = time.time()
  with monitoring.EventWriter(logdir, enabled=True) as tb:
    for step in range(5):
      tb.scalars({"train/loss": 1.0 / (step + 1), "train/grad_norm": np.float32(step)}, step)
    tb.scalars({"holdout/loss": 0.1}, 4)
    tb.flush()
    # Flushed data is readable while the writer is still open.
    assert _load(logdir).Scalars("holdout/loss")[0].value == pytest.approx(0.1)
  t1 = time.time()

  (path,) = logdir.iterdir()
  assert path.name.startswith("events.out.tfevents.") and tb.paths == [path]
  first = event_pb2.Event.FromString(_records(path)[0])
  assert first.file_version == "brain.Event:2" and not first.HasField("summary")

  acc = _load(logdir)
  assert sorted(acc.Tags()["scalars"]) == ["holdout/loss", "train/grad_norm", "train/loss"]
  loss = acc.Scalars("train/loss")
  assert [e.step for e in loss] == list(range(5))
  assert [e.value for e in loss] == [float(np.float32(1.0 / (s + 1))) for s in range(5)]
  assert [e.value for e in acc.Scalars("train/grad_norm")] == [0.0, 1.0, 2.0, 3.0, 4.0]
  walls = [e.wall_time for e in loss]
  assert t0 <= walls[0] and walls == sorted(walls) and walls[-1] <= t1


def test_rotation_gives_several_files_read_as_one_run(tmp_path):
  with monitoring.EventWriter(tmp_path, enabled=True, rotate_seconds=0.0) as tb:
    for step in range(1, 13):
      tb.scalars({"loss": float(step)}, step)
  paths = sorted(tmp_path.iterdir())
  assert len(paths) == 12 and paths == tb.paths  # name order is creation order (past 9 too)
  for path in paths:
    events = [event_pb2.Event.FromString(r) for r in _records(path)]
    assert events[0].file_version == "brain.Event:2" and len(events) == 2
  acc = _load(tmp_path)
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(s, float(s)) for s in range(1, 13)]


def test_remote_logdirs_rotate_by_default(tmp_path):
  assert monitoring.EventWriter("gs://bucket/tb", enabled=False).rotate_seconds == (
      monitoring.REMOTE_ROTATE_SECONDS)
  local = monitoring.EventWriter(tmp_path, enabled=True)
  assert local.rotate_seconds == float("inf")
  local.close()
  with pytest.raises(ValueError, match="closed"):
    local.scalars({"x": 1.0}, 0)


def test_disabled_writer_writes_nothing(tmp_path):
  logdir = tmp_path / "tb"
  with monitoring.EventWriter(logdir, enabled=False) as tb:
    tb.scalars({"loss": 1.0}, 0)
    tb.scalars({"a": 1.0}, 1)
    tb.flush()
  assert not logdir.exists() and tb.paths == []


def test_default_enabled_is_process_zero(tmp_path):
  with monitoring.EventWriter(tmp_path) as tb:  # a single-process test run is process 0
    assert tb.enabled


def test_progress_disabled_prints_nothing_and_logs_summary(monkeypatch, capsys, caplog):
  monkeypatch.setenv(monitoring.NO_PROGRESS_ENV, "1")
  caplog.set_level(logging.INFO, logger="absl")
  with monitoring.progress(100, "sampling", unit="tok") as bar:
    for _ in range(10):
      bar.update(10)
    time.sleep(0.01)
  captured = capsys.readouterr()
  assert "sampling" not in captured.out and "tok/s]" not in captured.err
  assert bar.n == 100 and 0 < bar.rate <= 100 / 0.01
  assert bar.summary.startswith("sampling: 100 tok in ") and bar.summary.endswith(" tok/s)")
  assert f"({monitoring._num(bar.rate)} tok/s)" in bar.summary
  assert bar.summary in [r.getMessage() for r in caplog.records]


def test_progress_bar_shows_rate_and_metrics(caplog):
  caplog.set_level(logging.INFO, logger="absl")
  out = io.StringIO()
  with monitoring.Progress(3, "distill", unit="step", enabled=True, file=out,
                           mininterval=0) as bar:
    for i in range(3):
      bar.update(1, loss=np.float32(1.0 / (i + 1)), lr="warmup")
  assert "distill" in out.getvalue() and "step/s" in out.getvalue()
  assert "loss=0.3333" in out.getvalue()
  assert bar.summary.startswith("distill: 3 step in ")
  assert bar.summary.endswith("step/s), loss=0.3333, lr=warmup")
  assert bar.close() == bar.summary  # idempotent, logged once
  assert [r.getMessage() for r in caplog.records].count(bar.summary) == 1


def test_other_processes_draw_and_log_nothing(monkeypatch, capsys, caplog, tmp_path):
  monkeypatch.setattr(monitoring, "_is_process_zero", lambda: False)
  monkeypatch.delenv(monitoring.NO_PROGRESS_ENV, raising=False)
  caplog.set_level(logging.INFO, logger="absl")
  with monitoring.progress(10, "sampling", unit="tok") as bar:
    bar.update(10)
  line = monitoring.stage_summary("sample", 1.0)
  with monitoring.EventWriter(tmp_path / "tb") as tb:
    tb.scalars({"loss": 1.0}, 0)
  captured = capsys.readouterr()
  assert captured.out == captured.err == "" and not caplog.records
  assert bar.summary.startswith("sampling: 10 tok in ") and line == "sample: 1 s"
  assert not tb.enabled and not (tmp_path / "tb").exists()


def test_stage_summary(caplog):
  caplog.set_level(logging.INFO, logger="absl")
  line = monitoring.stage_summary("sample", 12.345, rows=128, tokens_per_s=5432.1, ok=True,
                                  model="tiny")
  assert line == "sample: 12.35 s, rows=128, tokens_per_s=5432, ok=True, model=tiny"
  assert line in [r.getMessage() for r in caplog.records]


def test_a_bar_inside_another_shows_on_the_outer_one():
  """A stage's bar is the one drawn: a bar opened inside it (a trace file's rows) draws nothing
  of its own and shows its count and rate on the stage's bar."""
  import io
  out = io.StringIO()
  with monitoring.Progress(2, "sample", unit="item", enabled=True, file=out,
                           mininterval=0) as stage:
    with monitoring.Progress(10, "traces.jsonl", unit="row", enabled=True) as rows:
      rows.update(4)
      assert rows._bar is None
    stage.update(1)
    with monitoring.Progress(10, "traces.jsonl", unit="row", enabled=True) as rows:
      rows.update(7)
  text = out.getvalue()
  assert "traces.jsonl 4/10 row" in text and "traces.jsonl 7/10 row" in text
  assert text.count("sample") >= 2 and "rows/s" not in text
  with monitoring.Progress(1, "next", enabled=True, file=out) as alone:  # drawn again
    assert alone._bar is not None
