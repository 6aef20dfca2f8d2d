"""files: atomic writes (no tmp file left, old or new contents only), JSON round trips."""

import os

import pytest

from antidistill_jax import files


def test_write_atomic_replaces_whole_and_leaves_no_tmp(tmp_path):
  path = tmp_path / "a.bin"
  files.write_atomic(path, b"old")
  files.write_atomic(str(path), b"new contents")
  assert path.read_bytes() == b"new contents"
  assert os.listdir(tmp_path) == ["a.bin"]


def test_a_write_killed_before_its_rename_leaves_the_old_contents(tmp_path, monkeypatch):
  """The new bytes go to a side file first: until the rename, readers see the old file whole."""
  path = tmp_path / "a.bin"
  files.write_atomic(path, b"old")

  def killed(src, dst):
    assert path.read_bytes() == b"old"  # everything written, nothing visible yet
    raise OSError("killed before the rename")

  monkeypatch.setattr(files.os, "replace", killed)
  with pytest.raises(OSError, match="killed before the rename"):
    files.write_atomic(path, b"new contents")
  assert path.read_bytes() == b"old"


def test_json_round_trip_and_format(tmp_path):
  obj = {"name": "défi", "values": [1, 2.5, None], "nested": {"ok": True}}
  files.write_json(tmp_path / "x.json", obj)
  assert files.read_json(tmp_path / "x.json") == obj
  text = (tmp_path / "x.json").read_text(encoding="utf-8")
  assert text.endswith("}\n") and "défi" in text and '\n  "values"' in text
  files.write_json(tmp_path / "y.json", [1], indent=1)
  assert (tmp_path / "y.json").read_text() == "[\n 1\n]\n"


def test_replace_and_makedirs(tmp_path):
  files.makedirs(tmp_path / "d" / "e")
  files.makedirs(tmp_path / "d" / "e")  # exists already: fine
  src, dst = tmp_path / "d" / "src", tmp_path / "d" / "e" / "dst"
  src.write_bytes(b"1")
  dst.write_bytes(b"0")
  files.replace(src, dst)
  assert dst.read_bytes() == b"1" and not src.exists()


def test_is_local():
  assert files.is_local("/tmp/x") and files.is_local("runs/x")
  assert not files.is_local("gs://bucket/runs/x")


def test_remote_paths_are_written_whole_without_tmp_or_fsync(monkeypatch):
  from etils import epath
  written = []
  monkeypatch.setattr(type(epath.Path("gs://bucket/x")), "write_bytes",
                      lambda self, data: written.append((os.fspath(self), data)))
  monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(AssertionError("fsync")))
  files.write_json("gs://bucket/run/meta.json", {"a": 1})
  assert written == [("gs://bucket/run/meta.json", b'{\n  "a": 1\n}\n')]
