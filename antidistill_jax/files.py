"""Whole-file writes that readers never see half done, and JSON in and out, for local or
object-store (`gs://...`) paths through `etils.epath`.

  write_atomic(path, data)    # bytes; readers see the old file or the new one
  write_json(path, obj)       # indented UTF-8 JSON + newline, atomically
  create_new(path, data)      # write unless it exists: the first writer wins, atomically
  read_json(path)
  replace(src, dst)           # rename over dst, durably
  local_dir(path)             # a local folder holding a (possibly gs://) folder's files
  upload_dir(local, path)     # a local folder's files copied to a (possibly gs://) folder

Local paths: a tmp file next to `path` (`<path>.tmp<pid>`), flushed and fsynced, renamed over
`path` with os.replace, then the folder fsynced so the rename survives a power cut. An object
store publishes an object whole when its upload ends, so a remote path is written directly,
with no tmp object and no fsync (meaningless there).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from etils import epath

PathLike = str | os.PathLike[str]


def is_local(path: PathLike) -> bool:
  """False for a URI such as gs://bucket/key, True for a path on this machine's filesystem."""
  return "://" not in os.fspath(path)


def absolute(path: PathLike) -> epath.Path:
  """`path` made absolute (orbax wants absolute paths); a gs:// path is one already."""
  return epath.Path(path) if not is_local(path) else epath.Path(os.path.abspath(os.fspath(path)))


def fsync_dir(path: PathLike) -> None:
  """fsyncs the folder holding a local `path` (best effort: some filesystems refuse)."""
  if not is_local(path):
    return
  try:
    fd = os.open(os.path.dirname(os.path.abspath(os.fspath(path))), os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_atomic(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` so that a reader (or a run killed midway) finds the old contents
  or the new, never part of them."""
  path = epath.Path(path)
  if not is_local(path):
    path.write_bytes(data)
    return
  tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  fsync_dir(path)


def create_new(path: PathLike, data: bytes) -> bool:
  """Writes `data` to `path` only if no file is there; True if this call created it.

  Several processes or hosts may race: exactly one wins and a reader sees no file or the whole
  file. Locally: a private tmp file, fsynced, then os.link onto `path` (fails if it exists).
  On an object store: mode "xb", an upload with the precondition "no object yet" (gcsfs sends
  ifGenerationMatch=0), published whole when it closes."""
  if not is_local(path):
    import fsspec  # epath opens no "x" mode: fsspec (gcsfs) does
    fs, target = fsspec.core.url_to_fs(os.fspath(path))
    try:
      with fs.open(target, "xb") as f:
        f.write(data)
    except FileExistsError:
      return False
    return True
  path = epath.Path(path)
  makedirs(path.parent)
  tmp = f"{os.fspath(path)}.tmp{os.getpid()}.{uuid.uuid4().hex[:8]}"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  try:
    os.link(tmp, path)
  except FileExistsError:
    return False
  finally:
    os.unlink(tmp)
  fsync_dir(path)
  return True


def write_json(path: PathLike, obj: Any, *, indent: int = 2) -> None:
  """`obj` as indented UTF-8 JSON and a newline, written atomically (see write_atomic)."""
  write_atomic(path, (json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode("utf-8"))


def read_json(path: PathLike) -> Any:
  with epath.Path(path).open("r") as f:
    return json.load(f)


def replace(src: PathLike, dst: PathLike) -> None:
  """Renames `src` over `dst`; on a local filesystem the rename is fsynced too."""
  epath.Path(src).replace(dst)
  fsync_dir(dst)


def makedirs(path: PathLike) -> None:
  """Creates the folder `path` and its parents if missing."""
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def cache_root() -> epath.Path:
  """Local scratch for copies of remote folders: $ANTIDISTILL_CACHE, else
  ~/.cache/antidistill_jax."""
  root = os.environ.get("ANTIDISTILL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                              "antidistill_jax")
  return epath.Path(root)


def local_dir(path: PathLike) -> str:
  """`path` itself when it is local; for a remote folder (gs://...), a local copy of its files
  under cache_root(), fetched once (a folder whose copy finished is not fetched again).

  Safetensors and tokenizers are read from local files, so model folders on gs:// are
  copied here first."""
  if is_local(path):
    return os.fspath(path)
  import hashlib
  src = epath.Path(path)
  dst = cache_root() / "remote" / hashlib.sha256(os.fspath(src).encode()).hexdigest()[:16]
  done = dst / ".complete"
  if not done.exists():
    if not src.is_dir():
      raise FileNotFoundError(f"no folder {os.fspath(src)!r}.")
    for rel, f in _files_under(src):
      makedirs((dst / rel).parent)
      write_atomic(dst / rel, f.read_bytes())
    done.write_text(os.fspath(src))
  return os.fspath(dst)


def upload_dir(local: PathLike, path: PathLike) -> None:
  """Copies the files of the local folder `local` into `path` (local or remote); each file is
  written whole (write_atomic)."""
  for rel, f in _files_under(epath.Path(local)):
    makedirs((epath.Path(path) / rel).parent)
    write_atomic(epath.Path(path) / rel, f.read_bytes())


def _files_under(root: epath.Path, rel: str = ""):
  """(relative path, path) of every file below `root`, in name order (epath has no rglob for
  object stores)."""
  for f in sorted((root / rel).iterdir() if rel else root.iterdir()):
    name = f"{rel}/{f.name}" if rel else f.name
    if f.is_dir():
      yield from _files_under(root, name)
    else:
      yield name, f
