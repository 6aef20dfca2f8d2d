"""What a stage key knows of a checkpoint: a hash of its files' bytes, no model built.

  checkpoint_id(folder)   # sha256 over (relative name, sha256 of bytes) of every file in it

A rerun of a finished experiment must find its outputs without loading a 7B teacher, so keys
never hash loaded weights. Hashing a file is still a full read (15 GB for a 7B checkpoint):
each file's hash is cached under files.cache_root()/sha256/, keyed by (absolute path, size,
mtime), so it is read once per machine and changed files are hashed again.
"""

from __future__ import annotations

import hashlib
import os

from antidistill_jax import errors, files

_CHUNK = 1 << 24


def _cache_path(path: str, stat: os.stat_result) -> str:
  tag = f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode("utf-8")
  return os.path.join(os.fspath(files.cache_root()), "sha256",
                      hashlib.sha256(tag).hexdigest()[:32])


def file_sha256(path: str) -> str:
  """sha256 of a local file's bytes, cached by (path, size, mtime)."""
  stat = os.stat(path)
  cached = _cache_path(path, stat)
  if os.path.exists(cached):
    with open(cached) as f:
      digest = f.read().strip()
    if len(digest) == 64:
      return digest
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(_CHUNK):
      h.update(block)
  digest = h.hexdigest()
  files.makedirs(os.path.dirname(cached))
  files.write_atomic(cached, digest.encode("ascii"))
  return digest


def checkpoint_id(folder: str) -> str:
  """A short hash of every file under a local checkpoint folder (names and bytes): weights,
  config, tokenizer and chat template alike, since each changes what the model writes."""
  if not os.path.isdir(folder):
    raise errors.MissingInput(f"no checkpoint folder {folder!r}.")
  h = hashlib.sha256()
  for root, dirs, names in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in sorted(names):
      if name.startswith("."):
        continue
      path = os.path.join(root, name)
      rel = os.path.relpath(path, folder).replace(os.sep, "/")
      h.update(f"{rel}\0{file_sha256(path)}\n".encode("utf-8"))
  return h.hexdigest()[:16]
