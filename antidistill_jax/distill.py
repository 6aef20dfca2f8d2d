"""The attacker's side: supervised fine-tuning (distillation) of a student on teacher traces.

LoRA (through `nnx.LoRA`) on q, k, v, o, gate, up, down, or full fine-tuning; completion-only
token-mean NLL; optax AdamW with linear warmup + cosine decay, global-norm clipping and
gradient accumulation over micro-batches; the batch sharded over a mesh's `data` axis; the
holdout loss every `eval_every` steps (train and holdout curves: the paper's Figure 5); orbax
checkpoints so a killed run resumes and ends with the same parameters as an uninterrupted
one (the data order is a pure function of seed and step). The reference settings are
`DistillConfig()`'s defaults: r = alpha = 128, dropout 0, lr 5e-4, weight decay 0.1, clip 1.0,
warmup 3%, batch 16, 3 epochs, max length 4096.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from antidistill_jax import files, gradients, monitoring, parallel
from antidistill_jax.gradients import TokenPair
from antidistill_jax.models.checkpoint import abstract_model
from antidistill_jax.models.transformer import Transformer
from antidistill_jax.pytrees import flatten, unflatten_like

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  lora_rank: int | None = 128  # None: full fine-tuning
  lora_alpha: float = 128.0
  lora_dropout: float = 0.0
  lora_targets: tuple[str, ...] = LORA_TARGETS
  learning_rate: float = 5e-4
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  warmup_fraction: float = 0.03
  epochs: int = 3
  batch_size: int = 16  # examples per optimizer step
  micro_batch_size: int = 4  # examples per forward/backward (gradient accumulation)
  max_length: int = 4096  # longer sequences are truncated (completion end dropped)
  length_multiple: int = 64  # sequence lengths are padded up to a multiple: few shapes compile
  eval_every: int = 50
  checkpoint_every: int = 50
  seed: int = 0
  pad_id: int = 0

  def __post_init__(self):
    if self.batch_size % self.micro_batch_size:
      raise ValueError(f"batch_size={self.batch_size} is not a multiple of "
                       f"micro_batch_size={self.micro_batch_size}.")


# -- LoRA -------------------------------------------------------------------------------------


# PEFT (the reference's trainer) initialises A like torch's nn.Linear, kaiming_uniform(a=sqrt(5)):
# U(-b, b) with b = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + 5)), so b = 1 / sqrt(in).
# That is variance scaling 1/3 over fan_in; nnx's default (he_uniform, b = sqrt(6 / in)) starts
# the attacker 2.45x hotter. B starts at zero in both.
LORA_A_INIT = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class LoRALinear(nnx.Module):
  """base(x) + (alpha / r) * B(A(dropout(x))); the base kernel and bias are the original
  Linear's own Params, so parameter paths (q_proj/kernel) and their sharding are unchanged and
  the LoRA factors live under q_proj/lora."""

  def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, dropout: float,
               rngs: nnx.Rngs):
    self.kernel, self.bias = base.kernel, base.bias
    self.dtype = base.dtype
    self.lora = nnx.LoRA(base.in_features, rank, base.out_features, dtype=base.dtype,
                         param_dtype=jnp.float32, a_initializer=LORA_A_INIT,
                         b_initializer=nnx.initializers.zeros, rngs=rngs)
    self.scale = alpha / rank
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

  def __call__(self, x_BTI):
    dtype = self.dtype or x_BTI.dtype
    y_BTO = jnp.einsum("...i,io->...o", x_BTI.astype(dtype), self.kernel[...].astype(dtype))
    if self.bias is not None:
      y_BTO = y_BTO + self.bias[...].astype(dtype)
    h = self.dropout(x_BTI) if self.dropout is not None else x_BTI
    return y_BTO + (self.scale * self.lora(h)).astype(dtype)

  def merged_kernel(self):
    """kernel + (alpha / r) A B, computed in fp32, in the kernel's dtype."""
    kernel = self.kernel[...]
    delta = self.scale * (self.lora.lora_a[...].astype(jnp.float32)
                          @ self.lora.lora_b[...].astype(jnp.float32))
    return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


def _projections(model: Transformer, targets):
  """(state path of the projection, its parent module, its attribute name) for every target."""
  for i, layer in enumerate(model.layers):
    for block in ("self_attn", "mlp"):
      parent = getattr(layer, block)
      for name in targets:
        if hasattr(parent, name):
          yield f"layers/{i}/{block}/{name}", parent, name


def add_lora(model: Transformer, *, rank: int, alpha: float, dropout: float = 0.0,
             targets: Sequence[str] = LORA_TARGETS, seed: int = 0) -> Transformer:
  """Wraps the target projections of every layer with LoRA (in place; returns the model).
  B starts at zero, so the model's function is unchanged until it trains."""
  unknown = set(targets) - set(LORA_TARGETS)
  if unknown:
    raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {LORA_TARGETS}.")
  rngs = nnx.Rngs(params=seed, dropout=seed + 1)
  for _, parent, name in _projections(model, targets):
    setattr(parent, name, LoRALinear(getattr(parent, name), rank=rank, alpha=alpha,
                                     dropout=dropout, rngs=rngs))
  return model


def merge_lora(model: Transformer) -> Transformer:
  """A plain Transformer (no LoRA modules) whose kernels hold base + (alpha/r) A B."""
  flat = flatten(nnx.state(model, nnx.Param))
  for path, parent, name in _projections(model, LORA_TARGETS):
    module = getattr(parent, name)
    if isinstance(module, LoRALinear):
      flat[f"{path}/kernel"] = module.merged_kernel()
  plain = abstract_model(model.config, model.dtype, model.embed_tokens.embedding[...].dtype)
  graphdef, state = nnx.split(plain)
  return nnx.merge(graphdef, unflatten_like(state, flat))


# -- data -------------------------------------------------------------------------------------


def sft_examples(tokenizer, traces: Sequence[dict[str, Any]], *, system: str | None,
                 max_length: int) -> list[TokenPair]:
  """Re-tokenizes teacher traces with the STUDENT's tokenizer and chat template: the prompt is
  the (system, user) chat rendering of the problem, the completion the trace text plus the
  student's EOS when the trace finished. Completions are cut to fit max_length."""
  from antidistill_jax.data.prompts import user_message
  from antidistill_jax.tokenizer import prompt_ids
  out, cut = [], 0
  for row in traces:
    prompt = prompt_ids(tokenizer, user_message(row["problem"]), system=system)
    completion = tokenizer.encode(row["completion"], add_special_tokens=False)
    if row.get("finished", True) and tokenizer.eos_token_id is not None:
      completion = completion + [tokenizer.eos_token_id]
    room = max_length - len(prompt)
    if room <= 0:
      raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room under "
                       f"max_length={max_length}; raise max_length or drop long prompts.")
    cut += len(completion) > room
    out.append((prompt, completion[:room]))
  if cut:
    logging.warning("truncated %d of %d completions to max_length=%d.", cut, len(out), max_length)
  return out


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
  """The example order of one epoch: a pure function of (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, config: DistillConfig, step: int) -> np.ndarray:
  """Example indices of optimizer step `step` (0-based); the last batch of an epoch may be
  short. Steps run through the epochs in order."""
  per_epoch = -(-n // config.batch_size)
  epoch, k = divmod(step, per_epoch)
  order = epoch_order(n, config.seed, epoch)
  return order[k * config.batch_size:(k + 1) * config.batch_size]


def num_steps(n: int, config: DistillConfig) -> int:
  return config.epochs * -(-n // config.batch_size)


def _micro_batches(examples, indices, config: DistillConfig, rows: int, mesh, keep=None,
                   weights=None):
  """Fixed-shape right-padded micro-batches ((ids, pad, loss), completion tokens) of the given
  examples; with a keep mask [len(examples)], the loss mask of the examples it drops is zero
  (same shapes); with weights [len(examples)], the loss mask is float32, each row's ones times
  its weight. The token count (the unweighted loss mask's, targets only) is read off the host
  copy."""
  for start in range(0, len(indices), config.micro_batch_size):
    picked = indices[start:start + config.micro_batch_size]
    chunk = [examples[i] for i in picked]
    longest = max(len(p) + len(c) for p, c in chunk)
    length = min(-(-longest // config.length_multiple) * config.length_multiple,
                 max(config.max_length, longest))
    ids, pad, loss = gradients.pack_examples(chunk, rows, length, config.pad_id)
    if keep is not None:
      loss[:len(chunk)] *= np.asarray(keep, np.int32)[picked][:, None]
    count = int(loss[:, 1:].sum())
    if weights is not None:
      loss = loss.astype(np.float32)
      loss[:len(chunk)] *= np.asarray(weights, np.float32)[picked][:, None]
    yield parallel.shard_batch([jnp.asarray(a) for a in (ids, pad, loss)], mesh), count


# -- training ---------------------------------------------------------------------------------


def warmup_steps(config: DistillConfig, total_steps: int) -> int:
  """Linear-warmup steps, rounded UP as transformers' TrainingArguments.get_warmup_steps does
  (3% of 50 steps is 2 steps there, not 1), but never every step: a run of one step (3% of 1
  rounds up to 1, at learning rate 0 in transformers) would train nothing, so the last step
  always has a positive learning rate."""
  return min(math.ceil(config.warmup_fraction * total_steps), max(total_steps - 1, 0))


def make_optimizer(config: DistillConfig, total_steps: int) -> optax.GradientTransformation:
  """Clip, then AdamW on a warmup-cosine schedule; like the HF Trainer the reference used, no
  weight decay on vectors (biases, norm scales), and the same learning rate at every step."""
  warmup = warmup_steps(config, total_steps)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
      end_value=0.0)
  return optax.chain(optax.clip_by_global_norm(config.clip_norm),
                     optax.adamw(schedule, weight_decay=config.weight_decay,
                                 mask=lambda params: jax.tree.map(lambda x: x.ndim > 1, params)))


@functools.lru_cache(maxsize=16)
def _optimizer(config: DistillConfig, total_steps: int) -> optax.GradientTransformation:
  """make_optimizer, one object per (config, total_steps): `_apply` takes it as a static
  argument, so students trained alike (the pipeline's) share one compiled update."""
  return make_optimizer(config, total_steps)


def _template(treedef):
  """An nnx State of treedef's structure holding no arrays: `unflatten_like` fills it."""
  return jax.tree.unflatten(treedef, [None] * treedef.num_leaves)


@functools.lru_cache(maxsize=16)
def _programs(graphdef: nnx.GraphDef, params_def, rngs_def, frozen_def
              ) -> tuple[Callable, Callable, Callable]:
  """(grad_step, eval_step, token_step) of one model structure.

  The graphdef and the states' structures (pytree defs of split_student's trainable, rngs and
  frozen) are closed over, and the programs take flat {name: array} dicts (the checkpointed
  form) that they rebuild into nnx States inside the trace. A call then costs only its arrays:
  a GraphDef as a static argument is hashed on every call (~0.4 ms at 3 layers) and nnx
  Variables are pytree nodes to flatten and rebuild (~1 ms per step). Students of one
  structure share the programs and their compilations.
  """
  params_t, rngs_t, frozen_t = map(_template, (params_def, rngs_def, frozen_def))

  def model_of(params, rngs, frozen):  # fresh Variables of this trace
    return nnx.merge(graphdef, unflatten_like(params_t, params), unflatten_like(rngs_t, rngs),
                     unflatten_like(frozen_t, frozen), copy=True)

  def accumulate(params, rngs, frozen, acc, ids_BT, pad_BT, loss_BT):
    """acc + grad of the summed completion NLL of one micro-batch (acc None: a step's first
    micro-batch, nothing to add); also that sum and the dropout RNG state after the call."""
    def total(p, r):  # the RNG state is an argument: dropout advances it inside this trace
      model = model_of(p, r, frozen)
      nll_BT, mask_BT = gradients.token_nll(model, ids_BT, pad_BT, loss_BT)
      return jnp.sum(nll_BT * mask_BT), flatten(nnx.state(model, nnx.RngState))
    (value, new_rngs), grad = jax.value_and_grad(total, has_aux=True)(params, rngs)
    if acc is not None:
      grad = jax.tree.map(jnp.add, acc, grad)
    return grad, value, new_rngs

  grad_step = jax.jit(accumulate, donate_argnames="acc")

  @jax.jit
  def eval_step(params, rngs, frozen, ids_BT, pad_BT, loss_BT):
    model = model_of(params, rngs, frozen)
    model.eval()  # dropout off
    nll_BT, mask_BT = gradients.token_nll(model, ids_BT, pad_BT, loss_BT)
    return jnp.sum(nll_BT * mask_BT), jnp.sum(mask_BT)

  @jax.jit
  def token_step(params, rngs, frozen, ids_BT, pad_BT, loss_BT):
    model = model_of(params, rngs, frozen)
    model.eval()
    return gradients.token_nll(model, ids_BT, pad_BT, loss_BT)

  return grad_step, eval_step, token_step


def _programs_of(graphdef, params, rngs, frozen):
  return _programs(graphdef, *(jax.tree.structure(s) for s in (params, rngs, frozen)))


@functools.partial(jax.jit, static_argnames="tx", donate_argnames=("params", "opt_state"))
def _apply(tx, params, opt_state, grad_sum, n_tokens):
  """One AdamW step on the token-mean gradient.

  A program of its own: fused into the gradient's program it would save a launch (a few ms on
  a CPU) but XLA then fuses across the two and the weights change in the last bits."""
  grad = jax.tree.map(lambda g: g / jnp.maximum(n_tokens, 1.0), grad_sum)
  updates, opt_state = tx.update(grad, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grad)


def split_student(model: Transformer, config: DistillConfig):
  """(graphdef, trainable, rngs, frozen): LoRA factors (or every Param for full fine-tuning),
  dropout RNG state, and everything else."""
  return nnx.split(model, nnx.LoRAParam if config.lora_rank else nnx.Param, nnx.RngState, ...)


def _holdout_loss(eval_step, flat_parts, examples, config, rows, mesh) -> float:
  # Every micro-batch is dispatched before the first sum is read: one wait, not one per batch.
  sums = [eval_step(*flat_parts, *batch)
          for batch, _ in _micro_batches(examples, np.arange(len(examples)), config, rows, mesh)]
  total, count = 0.0, 0.0
  for s, c in sums:
    total, count = total + float(s), count + float(c)
  return total / max(count, 1.0)


def evaluate_loss(parts, examples: Sequence[TokenPair], config: DistillConfig, *, rows: int,
                  mesh: Mesh | None = None) -> float:
  """Token-mean completion NLL of the student `parts` (from split_student) on examples."""
  graphdef, *states = parts
  _, eval_step, _ = _programs_of(graphdef, *states)
  return _holdout_loss(eval_step, [flatten(s) for s in states], examples, config, rows, mesh)


def completion_nlls(model: Transformer, examples: Sequence[TokenPair], config: DistillConfig,
                    *, rows: int, mesh: Mesh | None = None) -> list[np.ndarray]:
  """Per example, the NLL (nats) of each of its completion tokens under `model`, in order."""
  graphdef, *states = split_student(model, dataclasses.replace(config, lora_rank=None))
  _, _, token_step = _programs_of(graphdef, *states)
  flat = [flatten(s) for s in states]
  out = []
  indices = np.arange(len(examples))
  for start, (batch, _) in zip(range(0, len(examples), config.micro_batch_size),
                               _micro_batches(examples, indices, config, rows, mesh)):
    nll_BT, mask_BT = (np.asarray(a) for a in token_step(*flat, *batch))
    for j in range(min(config.micro_batch_size, len(examples) - start)):
      out.append(nll_BT[j][mask_BT[j] > 0])
  return out


def distill(student: Transformer, train: Sequence[TokenPair], holdout: Sequence[TokenPair],
            workdir: str, config: DistillConfig = DistillConfig(), *, mesh: Mesh | None = None,
            max_steps: int | None = None,
            on_step: Callable[[dict[str, float]], None] | None = None,
            select: Callable[[Transformer, int], np.ndarray] | None = None,
            weights: np.ndarray | None = None
            ) -> tuple[Transformer, list[dict[str, float]]]:
  """Fine-tunes `student` (modified in place) on `train` (prompt ids, completion ids) pairs,
  resuming from the latest checkpoint in workdir/checkpoints if there is one.

  Returns the trained student with LoRA merged into plain kernels (ready for
  models.save_pretrained) and the loss history, also written to workdir/curves.{json,png}.
  max_steps stops early (the schedule still spans the whole run): a later call resumes.
  on_step: called with each step's record (step, train_loss, grad_norm, holdout_loss at
    evaluations), e.g. to write TensorBoard scalars while training runs. A record is written
    while the next step computes (at evaluations, checkpoints and epoch starts, at once).
  select: called at the start of each epoch with the student at its current weights and the
    epoch; returns a keep mask [len(train)]: the examples it drops add no loss that epoch (the
    batches and the schedule are unchanged). The mask is checkpointed, so a run resumed
    mid-epoch trains on the same examples (attacks.reaimed_selector).
  weights: [len(train)] loss weights (attacks.trace_weights): the loss is
    sum_i w_i * (example i's summed completion NLL) / (the batch's completion tokens), so
    weights of 1 train exactly as none do. Fixed inputs, not checkpointed state: a resumed run
    must pass the same ones.
  """
  if not train:
    raise ValueError("distill needs at least one training example.")
  if weights is not None:
    weights = np.asarray(weights, np.float32)
    if weights.shape != (len(train),) or not np.all(np.isfinite(weights)) or np.any(weights < 0):
      raise ValueError(f"weights: expected {len(train)} finite non-negative numbers (one per "
                       f"training example); got shape {weights.shape}.")
  if config.lora_rank:
    add_lora(student, rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
             targets=config.lora_targets, seed=config.seed)
  graphdef, trainable, rngs, frozen = split_student(student, config)
  grad_step, eval_step, _ = _programs_of(graphdef, trainable, rngs, frozen)
  frozen_flat = flatten(frozen)
  total = num_steps(len(train), config)
  end = total if max_steps is None else min(total, max_steps)
  tx = _optimizer(config, total)
  # Checkpointed state: flat string-keyed dicts, which orbax stores and optax updates as is;
  # the loop holds the same dicts (what the programs take).
  state = {"params": flatten(trainable), "rngs": flatten(rngs)}
  state["opt_state"] = tx.init(state["params"])
  if select is not None:
    state["keep"] = np.ones(len(train), np.int32)
  history: list[dict[str, float]] = []
  rows = parallel.round_rows(config.micro_batch_size, mesh)

  manager = ocp.CheckpointManager(
      files.absolute(epath.Path(workdir) / "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
      item_names=("state", "history"))
  start = manager.latest_step() or 0
  if start:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = manager.restore(start, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore()))
    state, history = restored["state"], restored["history"]["history"]
    logging.info("resumed distillation at step %d of %d from %s", start, total, workdir)

  t0, tokens = time.time(), 0
  bar = monitoring.progress(end - start, epath.Path(workdir).name or "distill",
                            unit="step")

  def write(step, loss_sums, n_tok, grad_norm, holdout_loss=None):
    """Appends (and reports) the record of a dispatched step; reading its sums waits for it."""
    nonlocal tokens
    loss_sum = 0.0
    for s in loss_sums:  # float64 sum of the float32 micro-batch sums, in order
      loss_sum = loss_sum + float(s)
    tokens += int(n_tok)
    record = {"step": step + 1, "train_loss": loss_sum / max(n_tok, 1.0),
              "grad_norm": float(grad_norm)}
    if holdout_loss is not None:
      record["holdout_loss"] = holdout_loss
    history.append(record)
    bar.update(1, loss=record["train_loss"], tokens_per_s=tokens / max(time.time() - t0, 1e-9))
    if "holdout_loss" in record:
      logging.info("distill step %d/%d: %s", step + 1, total,
                   {k: round(v, 4) for k, v in record.items() if k != "step"})
    if on_step is not None:
      on_step(record)

  per_epoch = -(-len(train) // config.batch_size)
  pending = None  # (step, loss sums, tokens, grad norm) of a step whose record is unwritten
  for step in range(start, end):
    if select is not None and step % per_epoch == 0:
      if pending is not None:
        write(*pending)
        pending = None
      current = nnx.merge(graphdef, unflatten_like(trainable, state["params"]),
                          unflatten_like(rngs, state["rngs"]), frozen, copy=True)
      state["keep"] = np.asarray(select(current, step // per_epoch), np.int32)
    keep = None if select is None else np.asarray(state["keep"])
    acc, loss_sums, n_tok, step_rngs = None, [], 0, state["rngs"]
    for batch, count in _micro_batches(train, batch_indices(len(train), config, step), config,
                                       rows, mesh, keep, weights):
      acc, s, step_rngs = grad_step(state["params"], step_rngs, frozen_flat, acc, *batch)
      loss_sums.append(s)
      n_tok += count
    n_tok = float(n_tok)
    new_params, opt_state, grad_norm = _apply(tx, state["params"], state["opt_state"], acc,
                                              jnp.float32(n_tok))
    state = {**state, "params": new_params, "rngs": step_rngs, "opt_state": opt_state}
    # No wait for this step: the host writes the previous step's record while it computes.
    if pending is not None:
      write(*pending)
    pending = (step, loss_sums, n_tok, grad_norm)
    evaluate = holdout and ((step + 1) % config.eval_every == 0 or step + 1 == total)
    save = (step + 1) % config.checkpoint_every == 0 or step + 1 == end
    if evaluate or save:
      holdout_loss = None
      if evaluate:
        holdout_loss = _holdout_loss(eval_step, (state["params"], state["rngs"], frozen_flat),
                                     holdout, config, rows, mesh)
      write(*pending, holdout_loss=holdout_loss)
      pending = None
    if save:
      manager.save(step + 1, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), history=ocp.args.JsonSave({"history": history})))
  if pending is not None:
    write(*pending)
  bar.close()
  manager.wait_until_finished()
  manager.close()

  nnx.update(student, unflatten_like(trainable, state["params"]),
             unflatten_like(rngs, state["rngs"]))
  if parallel.is_writer():
    write_curves(workdir, history)
  return (merge_lora(student) if config.lora_rank else student), history


# -- curves -----------------------------------------------------------------------------------


def write_curves(workdir: str, history: Sequence[dict[str, float]]) -> None:
  """workdir/curves.json and curves.png: train and holdout loss against the step."""
  workdir = epath.Path(workdir)
  files.makedirs(workdir)
  files.write_json(workdir / "curves.json", list(history), indent=1)
  if not history:
    return
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot([r["step"] for r in history], [r["train_loss"] for r in history], label="train")
  evals = [r for r in history if "holdout_loss" in r]
  if evals:
    ax.plot([r["step"] for r in evals], [r["holdout_loss"] for r in evals], "o-", label="holdout")
  ax.set_xlabel("step")
  ax.set_ylabel("completion NLL (nats/token)")
  ax.set_title("student distillation")
  ax.legend()
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=120)
  plt.close(fig)
  files.write_atomic(workdir / "curves.png", png.getvalue())
