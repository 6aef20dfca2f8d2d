"""A fake `gs` filesystem for fsspec (the backend etils.epath uses for gs:// when tensorflow is
absent) that keeps a bucket's objects under a local folder, with an object store's semantics:
objects are published whole when their file closes, and mode "xb" is an upload with the
precondition "no object yet" (gcsfs: ifGenerationMatch=0), refused at close if one appeared."""

import io
import os
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem


class _ExclusiveUpload(io.BytesIO):
  """Bytes buffered until close, then linked into place unless the object exists."""

  def __init__(self, path):
    super().__init__()
    self.path = path

  def close(self):
    if not self.closed:
      tmp = f"{self.path}.upload{uuid.uuid4().hex}"
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      with open(tmp, "wb") as f:
        f.write(self.getvalue())
      try:
        os.link(tmp, self.path)  # FileExistsError: the precondition failed
      finally:
        os.unlink(tmp)
        super().close()


class FakeGCS(LocalFileSystem):
  """gs://bucket/key <-> <root>/bucket/key."""
  protocol = ("gs", "gcs")
  root = ""

  def __init__(self, *args, finalize_on_close=True, **kwargs):
    super().__init__(*args, auto_mkdir=True, **kwargs)  # an object store has no folders to make

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        return os.path.join(cls.root, path[len(prefix):])
    return super()._strip_protocol(path)

  def _open(self, path, mode="rb", **kwargs):
    if "x" in mode:
      return _ExclusiveUpload(self._strip_protocol(path))
    return super()._open(path, mode, **kwargs)


def register(root) -> None:
  """Serves gs://... from the local folder `root` in this process."""
  FakeGCS.root = os.fspath(root)
  fsspec.register_implementation("gcs", FakeGCS, clobber=True)
  fsspec.register_implementation("gs", FakeGCS, clobber=True)
  from etils.epath import backend
  backend.fsspec_backend._get_filesystem.cache_clear()
