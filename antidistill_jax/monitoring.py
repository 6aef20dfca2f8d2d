"""Live monitoring: TensorBoard scalars without tensorflow, progress bars, stage summaries.

`EventWriter` writes the TensorBoard event-file format by hand. A file is a sequence of
TFRecords, each

    uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)

(little-endian), where data is a serialized `Event` protobuf:

    Event   {double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5;}
    Summary {repeated Value value = 1;}
    Value   {string tag = 1; float simple_value = 2;}

The first record of every file carries only file_version "brain.Event:2". Messages are
encoded in canonical proto3 form (zero step omitted), byte-identical to protobuf's own.

Storage. Paths go through `etils.epath`, so `gs://` logdirs work wherever epath can write
them. A local file is written and flushed in place, so a running TensorBoard sees new points on
its next reload. A GCS object becomes visible only when it is closed (there is no append),
so for remote logdirs the writer rotates: once the current file is `rotate_seconds` old it
is closed after the next write or flush, and the next write opens a new file. TensorBoard
reads all files of a directory as one run, in name order; names are
`events.out.tfevents.<int time>.<hostname>.<pid>.<counter>` with a zero-padded counter, so
that name order is creation order.

Multi-host: only process 0 writes, logs and draws progress bars (the defaults of `enabled`
below ask `jax.process_index()`, so construct these after `jax.distributed.initialize()`).
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
import socket
import struct
import sys
import threading
import time
from typing import Any, Mapping

from absl import logging
from etils import epath
import tqdm

FILE_VERSION = "brain.Event:2"
# Environment variable that turns progress bars off (summary lines are still logged).
NO_PROGRESS_ENV = "ANTIDISTILL_NO_PROGRESS"
# Rotation period of remote (gs://, ...) event files when none is given.
REMOTE_ROTATE_SECONDS = 60.0
# Local files are flushed at least this often while scalars are being written.
FLUSH_SECONDS = 10.0

_FILE_COUNTER = itertools.count()
_FILE_COUNTER_LOCK = threading.Lock()


def _is_process_zero() -> bool:
  import jax  # pylint: disable=g-import-not-at-top  (keeps this module importable without jax)
  return jax.process_index() == 0


# ----------------------------------------------------------------------------- crc32c


def _crc32c_table() -> tuple[int, ...]:
  poly = 0x82F63B78  # Castagnoli polynomial, bit-reversed
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ (poly if crc & 1 else 0)
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of `data`, table-driven, in pure Python.

  About 10 MB/s; event records are tens of bytes, so this never matters here.
  """
  crc = 0xFFFFFFFF
  table = _CRC32C_TABLE
  for b in data:
    crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC: rotate right by 15 bits and add a constant."""
  crc = crc32c(data)
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: length, its masked crc, the data, the data's masked crc."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc32c(length)) + data
          + struct.pack("<I", masked_crc32c(data)))


# ----------------------------------------------------------------------------- protobuf

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


def _varint(n: int) -> bytes:
  """Base-128 varint; negative int64 values as their 64-bit two's complement (10 bytes)."""
  if not -(1 << 63) <= n < (1 << 64):
    raise OverflowError(f"{n} does not fit in 64 bits")
  n &= (1 << 64) - 1
  out = bytearray()
  while True:
    low, n = n & 0x7F, n >> 7
    if n:
      out.append(low | 0x80)
    else:
      out.append(low)
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint((field << 3) | wire_type)


def _length_delimited(field: int, payload: bytes) -> bytes:
  return _key(field, _LENGTH) + _varint(len(payload)) + payload


def _float32(value: float) -> bytes:
  try:
    return struct.pack("<f", value)
  except OverflowError:  # finite beyond float32's range: round to infinity like a cast does
    return struct.pack("<f", math.copysign(math.inf, value))


def encode_event(wall_time: float, step: int = 0, *, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None) -> bytes:
  """Serialized `Event` with optional file_version and a Summary of simple_value scalars."""
  out = _key(1, _FIXED64) + struct.pack("<d", wall_time)
  if step:
    out += _key(2, _VARINT) + _varint(int(step))
  if file_version is not None:
    out += _length_delimited(3, file_version.encode())
  if scalars:
    summary = b"".join(
        _length_delimited(1, _length_delimited(1, str(tag).encode())
                          + _key(2, _FIXED32) + _float32(float(value)))
        for tag, value in scalars.items())
    out += _length_delimited(5, summary)
  return out


# ----------------------------------------------------------------------------- EventWriter


class EventWriter:
  """Writes scalars to a TensorBoard event file in `logdir` (local or gs://).

    with monitoring.EventWriter(workdir + "/tb") as tb:
      tb.scalars({"train/loss": loss, "train/grad_norm": g}, step)

  Args:
    logdir: directory (created if needed); anything `epath.Path` accepts.
    enabled: a disabled writer touches no file and ignores every call. Default: only on
      process 0 (`jax.process_index() == 0`).
    rotate_seconds: once the current file is this old, it is closed after the next write or
      flush and the next write starts a new file. Default: `REMOTE_ROTATE_SECONDS` for remote
      logdirs (objects are visible only once closed), never for local ones.
    flush_seconds: a write flushes the file if the last flush is at least this old.
  """

  def __init__(self, logdir: str | os.PathLike[str], *, enabled: bool | None = None,
               rotate_seconds: float | None = None, flush_seconds: float = FLUSH_SECONDS):
    self.enabled = _is_process_zero() if enabled is None else bool(enabled)
    self.logdir = epath.Path(logdir)
    if rotate_seconds is None:
      rotate_seconds = REMOTE_ROTATE_SECONDS if "://" in os.fspath(logdir) else math.inf
    self.rotate_seconds = rotate_seconds
    self.flush_seconds = flush_seconds
    self.paths: list[epath.Path] = []  # every event file this writer has opened, in order
    self._file = None
    self._opened = self._flushed = 0.0
    self._closed = False
    self._lock = threading.Lock()
    if self.enabled:
      self.logdir.mkdir(parents=True, exist_ok=True)
      self._open()

  def _open(self):
    with _FILE_COUNTER_LOCK:
      counter = next(_FILE_COUNTER)
    name = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
            f".{counter:06d}")
    path = self.logdir / name
    self._file = path.open("wb")
    self.paths.append(path)
    self._opened = self._flushed = time.monotonic()
    self._file.write(tfrecord(encode_event(time.time(), file_version=FILE_VERSION)))

  def _end_file_if_old(self):
    if self._file is not None and time.monotonic() - self._opened >= self.rotate_seconds:
      self._file.close()
      self._file = None

  def scalars(self, values: Mapping[str, Any], step: int):
    """Writes several scalars (anything `float()` accepts: numbers, 0-d arrays) as one event."""
    if not self.enabled:
      return
    record = tfrecord(encode_event(time.time(), int(step),
                                   scalars={k: float(v) for k, v in values.items()}))
    with self._lock:
      if self._closed:
        raise ValueError(f"EventWriter({self.logdir}) is closed")
      if self._file is None:
        self._open()
      self._file.write(record)
      if time.monotonic() - self._flushed >= self.flush_seconds:
        self._file.flush()
        self._flushed = time.monotonic()
      self._end_file_if_old()

  def flush(self):
    """Flushes to storage (local readers see it now); ends the file if it is due to rotate."""
    if not self.enabled:
      return
    with self._lock:
      if self._file is not None:
        self._file.flush()
        self._flushed = time.monotonic()
        self._end_file_if_old()

  def close(self):
    if not self.enabled:
      return
    with self._lock:
      if self._file is not None:
        self._file.close()
        self._file = None
      self._closed = True

  def __enter__(self) -> EventWriter:
    return self

  def __exit__(self, *exc):
    self.close()


# ----------------------------------------------------------------------------- Progress


def _num(x: float) -> str:
  """Compact number: integers as is, other values to 4 significant digits (no exponent >= 1)."""
  if float(x).is_integer() and abs(x) < 1e15:
    return str(int(x))
  return f"{x:.0f}" if abs(x) >= 1e4 else f"{x:.4g}"


def _show(v: Any) -> str:
  """A metric value for a summary line: real numbers through `_num`, anything else as str."""
  if isinstance(v, numbers.Real) and not isinstance(v, bool):
    return _num(float(v))
  return str(v)


_DRAWN: list["Progress"] = []  # the bars on the terminal now, innermost last


class Progress:
  """A tqdm bar over a long loop, plus a summary line logged on close.

    with monitoring.progress(n_tokens, "sampling", unit="tok") as bar:
      bar.update(new_tokens)
    with monitoring.progress(steps, "distill", unit="step") as bar:
      bar.update(1, loss=loss)  # keyword values are shown after the rate

  The bar shows the rate (tqdm's `<unit>/s`). On close, process 0 logs
  `"<desc>: <n> <unit> in <s> s (<rate> <unit>/s)"`, followed by the last keyword values.

  Args:
    total: expected count, or None when unknown.
    desc, unit: label and unit of the count.
    enabled: draw the bar. Default: on process 0 unless $ANTIDISTILL_NO_PROGRESS is set
      (to anything non-empty).
    log_summary: log the summary line on close. Default: on process 0.
    **tqdm_kwargs: passed to `tqdm.tqdm` (e.g. `file`, `unit_scale`, `mininterval`). When the
      output is not a terminal (pod logs), `mininterval` defaults to 30 s so that log files
      get a line every 30 s instead of every 0.1 s.
  """

  def __init__(self, total: float | None = None, desc: str = "", unit: str = "it", *,
               enabled: bool | None = None, log_summary: bool | None = None, **tqdm_kwargs):
    if enabled is None:
      enabled = not os.environ.get(NO_PROGRESS_ENV) and _is_process_zero()
    # A bar opened inside another (a stage's traces inside the stage's items) is not drawn: it
    # shows its count and rate on the outer bar instead, so the terminal keeps one bar.
    self._outer = _DRAWN[-1] if enabled and _DRAWN else None
    enabled = enabled and self._outer is None
    self.total = total
    self.log_summary = _is_process_zero() if log_summary is None else log_summary
    self.desc, self.unit, self.n = desc, unit, 0
    self.postfix: dict[str, Any] = {}
    self.summary: str | None = None
    self._start = time.perf_counter()
    self._end: float | None = None
    if enabled:
      out = tqdm_kwargs.setdefault("file", sys.stderr)
      if "mininterval" not in tqdm_kwargs and not getattr(out, "isatty", lambda: False)():
        tqdm_kwargs["mininterval"] = 30.0
      self._bar = tqdm.tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, **tqdm_kwargs)
      _DRAWN.append(self)
    else:
      self._bar = None

  @property
  def elapsed(self) -> float:
    return (self._end if self._end is not None else time.perf_counter()) - self._start

  @property
  def rate(self) -> float:
    """Mean rate since the start, in units per second."""
    return self.n / max(self.elapsed, 1e-9)

  def update(self, n: float = 1, **postfix: Any):
    """Advances by n; keyword values (a loss, ...) are shown on the bar and in the summary."""
    self.n += n
    if postfix:
      # Arrays (a jax loss) become Python floats here: one host transfer per update.
      self.postfix.update({k: v if isinstance(v, str) else float(v) for k, v in postfix.items()})
    if self._bar is not None:
      if postfix:
        self._bar.set_postfix({k: _show(v) for k, v in self.postfix.items()}, refresh=False)
      self._bar.update(n)
    elif self._outer is not None and self._outer._bar is not None:
      done = f"{_num(self.n)}/{_num(self.total)}" if self.total else _num(self.n)
      outer = self._outer._bar
      outer.set_postfix_str(f"{self.desc} {done} {self.unit} ({_num(self.rate)} {self.unit}/s)",
                            refresh=False)
      if time.time() - outer.last_print_t >= outer.mininterval:  # tqdm's own pace (30 s in logs)
        outer.refresh()
        outer.last_print_t = time.time()

  def close(self) -> str:
    """Closes the bar and returns (and, on process 0, logs) the summary line. Idempotent."""
    if self.summary is None:
      self._end = time.perf_counter()
      if self._bar is not None:
        self._bar.close()
        if self in _DRAWN:
          _DRAWN.remove(self)
      self.summary = (f"{self.desc}: {_num(self.n)} {self.unit} in {_num(self.elapsed)} s "
                      f"({_num(self.rate)} {self.unit}/s)")
      if self.postfix:
        self.summary += "".join(f", {k}={_show(v)}" for k, v in self.postfix.items())
      if self.log_summary:
        logging.info("%s", self.summary)
    return self.summary

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc):
    self.close()


def progress(total: float | None = None, desc: str = "", unit: str = "it", **kwargs) -> Progress:
  """`Progress(total, desc, unit, **kwargs)`, for `with monitoring.progress(...) as bar:`."""
  return Progress(total, desc, unit, **kwargs)


def stage_summary(name: str, seconds: float, **metrics: Any) -> str:
  """Returns, and on process 0 logs, `"<name>: <s> s, k=v, ..."` for one pipeline stage."""
  line = f"{name}: {_num(seconds)} s" + "".join(f", {k}={_show(v)}" for k, v in metrics.items())
  if _is_process_zero():
    logging.info("%s", line)
  return line
