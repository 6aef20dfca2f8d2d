"""Shared fixtures: tiny random Hugging Face checkpoints built offline with transformers+torch.

Eight host devices are requested before JAX starts, so sharding tests see a real mesh.
fp32 matmuls run at full precision for the parity tests.
"""

import os
import re

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _share_compiled_programs():
  """One persistent XLA compilation cache for the whole run: most of a tiny test's time is
  compiling, and the same programs recur across tests, xdist workers and the CLI subprocesses
  (they inherit the environment). Made here, before JAX is imported, by the first process (the
  xdist controller), and removed when it exits. A JAX_COMPILATION_CACHE_DIR already set is
  used as it is (kept across runs). A cache hit still counts as a compile request
  (/jax/core/compile/backend_compile_duration wraps compile_or_get_cached), so the tests that
  count compiles count the same. No size limit: with one, JAX rescans the whole folder at every
  write (quadratic in the entries; a trial run went about half as fast). Without one it takes no
  lock, so a process may read an entry another is still writing: JAX then warns, recompiles and
  goes on (a truncated compressed entry does not decompress)."""
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  import atexit
  import shutil
  import tempfile
  path = tempfile.mkdtemp(prefix="antidistill-jax-tests-xla-")
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=path,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


_share_compiled_programs()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")

from antidistill_jax import random_checkpoints  # noqa: E402

VOCAB = 320  # tokenizer size; tables are padded past it like real checkpoints


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: over ~45 s on 2 idle cores; run first (below); -m 'not slow' skips them")


def pytest_collection_modifyitems(items):
  """The slow tests first (a stable sort: otherwise in file order), so that xdist hands them out
  at the start and both workers end on short tests, not one waiting on a 3-minute test."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _memory_maps() -> tuple[int, int] | None:
  """(this process's memory maps, the kernel's limit per process), or None off Linux."""
  try:
    with open("/proc/sys/vm/max_map_count") as f:
      limit = int(f.read())
    with open("/proc/self/maps", "rb") as f:
      return sum(1 for _ in f), limit
  except OSError:
    return None


@pytest.fixture(autouse=True)
def _release_compiled_programs():
  """Each XLA:CPU executable holds ~15 memory maps of JIT code until its cache entry goes; a
  worker that runs half the suite compiles thousands of programs, and at vm.max_map_count
  (65,530 by default) the next compile's mmap fails and XLA segfaults. When a test leaves the
  process past half the limit, the compilation caches are cleared (later tests recompile)."""
  yield
  maps = _memory_maps()
  if maps is not None and maps[0] > maps[1] // 2:
    jax.clear_caches()


def _randomize(model, seed: int):
  """HF zero-initialises biases and one-initialises norms, which hides bugs: randomize all."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      elif name.endswith("bias"):
        p.copy_(0.2 * torch.randn(p.shape, generator=g))
      elif "embed_tokens" in name or "lm_head" in name:
        p.copy_(0.5 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[-1]))


def build_hf_checkpoint(path, model_type: str, tokenizer, seed: int = 0, vocab_size: int = 384,
                        **overrides):
  """A random HF model saved with transformers' own save_pretrained (the reference writer)."""
  import torch
  import transformers
  torch.manual_seed(seed)
  hf = random_checkpoints.tiny_hf_config(model_type, vocab_size=vocab_size,
                                         eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id, **overrides)
  config = transformers.AutoConfig.for_model(**hf)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  _randomize(model, seed)
  model.eval()
  model.save_pretrained(path)
  tokenizer.save_pretrained(path)
  return model


# Qwen2: q/k/v biases, grouped-query attention (4 query heads on 2 kv heads), tied embeddings.
QWEN2 = dict(model_type="qwen2", tie_word_embeddings=True, num_attention_heads=4,
             num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
# Llama: llama3 rope scaling (a short original context so every band of the scaling is hit
# by a 300-token prompt), untied, head_dim 32 != 64 / 4, 1 kv head.
LLAMA = dict(model_type="llama", tie_word_embeddings=False, num_attention_heads=4,
             num_key_value_heads=1, head_dim=32,
             rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 64})
ARCHS = {"qwen2": QWEN2, "llama": LLAMA}


@pytest.fixture(scope="session")
def tokenizer():
  return random_checkpoints.train_tokenizer(vocab_size=VOCAB)


@pytest.fixture(scope="session", params=sorted(ARCHS))
def hf_checkpoint(request, tmp_path_factory, tokenizer):
  """(path, torch model) for each architecture."""
  path = tmp_path_factory.mktemp(f"hf_{request.param}")
  model = build_hf_checkpoint(path, tokenizer=tokenizer, seed=1, **ARCHS[request.param])
  return str(path), model


def cache_copies(hlo: str, rows: int, slots: int, per_slot: int) -> list[str]:
  """The copy and transpose instructions of a compiled program that copy a KV cache, permuted
  or not: a dimension of `slots` and at least rows * slots * per_slot elements. Asserts first
  that a cache of exactly that size is in the program (so an empty list means something)."""
  shapes = [[int(d) for d in m.split(",")] for m in re.findall(r"\w+\[([\d,]+)\]", hlo)]
  assert any(slots in s and np.prod(s) == rows * slots * per_slot for s in shapes)
  found = []
  for m in re.finditer(r"= \w+\[([\d,]*)\]\{[^}]*\} (copy|transpose)\(", hlo):
    dims = [int(d) for d in m.group(1).split(",") if d]
    if slots in dims and np.prod(dims) >= rows * slots * per_slot:
      found.append(m.group(0))
  return found


def torch_logits(model, ids) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids))).logits.float().numpy()


@pytest.fixture(scope="session")
def teacher_proxy_dirs(tmp_path_factory, tokenizer):
  """A Qwen2 teacher (384 rows) and a smaller Qwen2 proxy (352 rows) sharing one tokenizer."""
  root = tmp_path_factory.mktemp("pair")
  build_hf_checkpoint(root / "teacher", tokenizer=tokenizer, seed=2, **QWEN2)
  build_hf_checkpoint(root / "proxy", tokenizer=tokenizer, seed=3, vocab_size=352,
                      **dict(QWEN2, hidden_size=32, intermediate_size=64))
  return str(root / "teacher"), str(root / "proxy")


@pytest.fixture(scope="module")
def pair(teacher_proxy_dirs):
  """(teacher, proxy, g): the pair of teacher_proxy_dirs loaded in fp32, g on 8 random
  examples."""
  from antidistill_jax import gradients, models
  teacher = models.from_pretrained(teacher_proxy_dirs[0])
  proxy = models.from_pretrained(teacher_proxy_dirs[1])
  grad, _ = gradients.proxy_gradient(proxy, random_examples(8, seed=4), micro_batch_size=8)
  return teacher, proxy, grad


def random_examples(n: int, seed: int = 0, vocab: int = VOCAB):
  """(prompt ids, completion ids) pairs of varied lengths."""
  rng = np.random.default_rng(seed)
  return [(rng.integers(0, vocab, rng.integers(3, 12)).tolist(),
           rng.integers(0, vocab, rng.integers(2, 20)).tolist()) for _ in range(n)]


SAMPLER_KEYS = ("vocab_size", "eos_ids", "pad_id", "batch_size", "mesh", "proxy", "grad",
                "scan_chunk", "fd_stacked", "jvp_stacked", "first_row", "prompt_multiple")


def generate(model, prompts, *, vocab_size=VOCAB, **kw):
  """sampling.generate with the tokenizer-less defaults of these tests (ids past VOCAB are
  padding rows, no EOS) and the SamplingParams fields given as keywords."""
  from antidistill_jax import sampling
  sampler_kw = {k: kw.pop(k) for k in SAMPLER_KEYS if k in kw}
  return sampling.generate(model, prompts, sampling.SamplingParams(**kw), vocab_size=vocab_size,
                           **sampler_kw)
