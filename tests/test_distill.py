"""Student distillation: LoRA touches only LoRA factors, merged export parity with transformers,
exact resume, sharded equals single-device, loss goes down, student re-tokenization."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from antidistill_jax import distill, gradients, models, parallel, random_checkpoints
from antidistill_jax.pytrees import flatten
from conftest import LLAMA, build_hf_checkpoint, random_examples, torch_logits

SMALL = distill.DistillConfig(lora_rank=4, lora_alpha=8.0, learning_rate=1e-2, epochs=2,
                              batch_size=4, micro_batch_size=2, eval_every=2,
                              checkpoint_every=1, length_multiple=16, max_length=64)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tokenizer):
  path = tmp_path_factory.mktemp("student")
  build_hf_checkpoint(path, tokenizer=tokenizer, seed=5, **LLAMA)
  return str(path)


def _mean_loss(model, examples):
  ids, pad, loss = gradients.pack_examples(examples, len(examples), 64)
  nll, mask = gradients.token_nll(model, jnp.asarray(ids), jnp.asarray(pad), jnp.asarray(loss))
  return float(jnp.sum(nll * mask) / jnp.sum(mask))


def test_one_lora_step_changes_only_lora_params(student_dir, tmp_path):
  student = models.from_pretrained(student_dir)
  before = {k: np.asarray(v) for k, v in flatten(nnx.state(student, nnx.Param)).items()}
  # No warmup: under warmup the first step's learning rate is 0 (as in transformers).
  config = dataclasses.replace(SMALL, warmup_fraction=0.0)
  distill.distill(student, random_examples(8), [], str(tmp_path), config, max_steps=1)
  after = {k: np.asarray(v) for k, v in flatten(nnx.state(student, nnx.Param)).items()}
  lora = sorted(k for k in after if "/lora/" in k)
  assert len(lora) == 2 * 7 * student.config.num_layers  # A and B of q,k,v,o,gate,up,down
  assert set(after) - set(lora) == set(before)
  for k in before:
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)
  assert all(np.any(after[k] != 0) for k in lora if k.endswith("lora_b"))  # B left zero init


def test_merged_export_loads_in_transformers_with_the_same_logits(student_dir, tmp_path):
  import torch
  import transformers
  student = models.from_pretrained(student_dir)
  merged, _ = distill.distill(student, random_examples(8), [], str(tmp_path / "run"), SMALL,
                              max_steps=3)
  assert not any("/lora/" in k for k in flatten(nnx.state(merged, nnx.Param)))
  ids = np.random.default_rng(0).integers(0, 320, size=(2, 24))
  with_lora = np.asarray(student(jnp.asarray(ids)))
  np.testing.assert_allclose(np.asarray(merged(jnp.asarray(ids))), with_lora,
                             atol=1e-4 * np.abs(with_lora).max())
  base = np.asarray(models.from_pretrained(student_dir)(jnp.asarray(ids)))
  assert np.abs(with_lora - base).max() > 1e-3  # training changed the function
  models.save_pretrained(merged, tmp_path / "export")
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32)
  np.testing.assert_allclose(torch_logits(hf, ids), with_lora, atol=1e-4 * np.abs(with_lora).max())


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_killed_then_resumed_run_equals_uninterrupted(student_dir, tmp_path, dropout):
  config = dataclasses.replace(SMALL, lora_dropout=dropout)  # dropout: its RNG is resumed too
  train, holdout = random_examples(10, seed=1), random_examples(3, seed=2)
  full_model, full_hist = distill.distill(models.from_pretrained(student_dir), train, holdout,
                                          str(tmp_path / "full"), config)
  assert len(full_hist) == distill.num_steps(10, config) == 6
  if dropout:  # it is on: the losses are not those of the same run without it
    _, plain_hist = distill.distill(models.from_pretrained(student_dir), train, holdout,
                                    str(tmp_path / "plain"), SMALL)
    assert [r["train_loss"] for r in plain_hist] != [r["train_loss"] for r in full_hist]
  # "Kill" after 4 steps, then a fresh process-like restart in the same workdir.
  distill.distill(models.from_pretrained(student_dir), train, holdout, str(tmp_path / "cut"),
                  config, max_steps=4)
  resumed_model, resumed_hist = distill.distill(models.from_pretrained(student_dir), train,
                                                holdout, str(tmp_path / "cut"), config)
  assert resumed_hist == full_hist
  a, b = flatten(nnx.state(full_model, nnx.Param)), flatten(nnx.state(resumed_model, nnx.Param))
  for k in a:
    np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(a[k]), err_msg=k)
  curves = json.loads((tmp_path / "cut" / "curves.json").read_text())
  assert curves == full_hist and any("holdout_loss" in r for r in curves)
  assert (tmp_path / "cut" / "curves.png").stat().st_size > 0


def test_every_record_reaches_on_step_and_students_share_programs(student_dir, tmp_path):
  """A step's record is written while the next step computes, and at once at evaluations and
  checkpoints: on_step still sees every record, in order, as the history and the checkpoints
  hold it. A second student of the same structure and config compiles nothing."""
  config = dataclasses.replace(SMALL, eval_every=3, checkpoint_every=4)  # 2 micro-batches
  train, holdout = random_examples(12, seed=6), random_examples(3, seed=7)
  seen = []
  _, history = distill.distill(models.from_pretrained(student_dir), train, holdout,
                               str(tmp_path / "a"), config, on_step=seen.append)
  assert seen == history
  assert [r["step"] for r in history] == list(range(1, distill.num_steps(12, config) + 1))
  assert [r["step"] for r in history if "holdout_loss" in r] == [3, 6]
  # Stopped after step 5 (checkpointed, as the last step of every call): records go on at 6.
  distill.distill(models.from_pretrained(student_dir), train, holdout, str(tmp_path / "b"),
                  config, max_steps=5)
  resumed = []
  _, resumed_history = distill.distill(models.from_pretrained(student_dir), train, holdout,
                                       str(tmp_path / "b"), config, on_step=resumed.append)
  assert resumed_history == history and resumed == history[5:]

  student, compiles = models.from_pretrained(student_dir), []

  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(kwargs.get("fun_name"))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    _, again = distill.distill(student, train, holdout, str(tmp_path / "c"), config)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert again == history
  assert compiles == []


@pytest.mark.parametrize("model_axis", [1, 4])
def test_sharded_batch_equals_single_device(student_dir, tmp_path, model_axis):
  """Data parallel (data=2), and with the student's weights tensor-parallel over model=4."""
  train = random_examples(8, seed=3)
  mesh = parallel.make_mesh(data=2, model=model_axis, devices=jax.devices()[:2 * model_axis])
  one, h1 = distill.distill(models.from_pretrained(student_dir), train, [], str(tmp_path / "a"),
                            SMALL, max_steps=2)
  two, h2 = distill.distill(models.from_pretrained(student_dir, mesh=mesh), train, [],
                            str(tmp_path / "b"), SMALL, max_steps=2, mesh=mesh)
  np.testing.assert_allclose([r["train_loss"] for r in h2], [r["train_loss"] for r in h1], rtol=1e-5)
  for k, v in flatten(nnx.state(one, nnx.Param)).items():
    w = np.asarray(flatten(nnx.state(two, nnx.Param))[k])
    np.testing.assert_allclose(w, np.asarray(v), atol=1e-5 * np.abs(np.asarray(v)).max(), err_msg=k)


@pytest.mark.parametrize("lora_rank", [8, None])
def test_distilling_lowers_the_loss_on_the_traces(student_dir, tmp_path, lora_rank):
  traces = random_examples(6, seed=4)
  student = models.from_pretrained(student_dir)
  before = _mean_loss(student, traces)
  config = distill.DistillConfig(lora_rank=lora_rank, lora_alpha=16.0, epochs=8, batch_size=6,
                                 micro_batch_size=3, learning_rate=1e-2 if lora_rank else 2e-3,
                                 eval_every=100, checkpoint_every=100, length_multiple=16,
                                 max_length=64)
  trained, history = distill.distill(student, traces, traces, str(tmp_path), config)
  after = _mean_loss(trained, traces)
  assert after < 0.7 * before, (before, after)
  assert history[-1]["holdout_loss"] == pytest.approx(after, rel=1e-4)


def test_student_retokenizes_traces_with_its_own_template(tokenizer):
  # Another vocabulary than the teacher's.
  student_tok = random_checkpoints.train_tokenizer(vocab_size=400)
  traces = [{"problem": "What is 2 + 3?", "completion": "2 + 3 = 5. #### 5", "finished": True},
            {"problem": "What is 7 * 6?", "completion": "7 * 6 = 42 " * 30, "finished": False}]
  out = distill.sft_examples(student_tok, traces, system="Be brief.", max_length=80)
  prompt, completion = out[0]
  assert student_tok.decode(prompt) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>"
                                        "user\nWhat is 2 + 3?\n<|im_end|>\n<|im_start|>assistant\n")
  assert completion[-1] == student_tok.eos_token_id
  assert student_tok.decode(completion[:-1]) == "2 + 3 = 5. #### 5"
  assert len(out[1][0]) + len(out[1][1]) == 80  # the unfinished long trace is cut, no EOS
  assert out[1][1][-1] != student_tok.eos_token_id
  with pytest.raises(ValueError, match="leaves no room under max_length=10"):
    distill.sft_examples(student_tok, traces, system="Be brief.", max_length=10)


def test_optimizer_decays_matrices_not_vectors():
  config = distill.DistillConfig(learning_rate=0.1, weight_decay=0.5, warmup_fraction=0.0)
  tx = distill.make_optimizer(config, total_steps=10)
  params = {"a/kernel": jnp.ones((2, 2)), "a/bias": jnp.ones((2,))}
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  # AdamW with no gradient: -lr * weight_decay * w at the peak rate (no warmup)
  np.testing.assert_allclose(np.asarray(updates["a/kernel"]), -0.1 * 0.5, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(updates["a/bias"]), 0.0)


def test_lora_init_matches_peft(student_dir):
  """A ~ kaiming_uniform(a=sqrt(5)) as PEFT's (bound 1/sqrt(in), not he_uniform's sqrt(6/in)),
  B = 0: the attacker starts where the paper's does."""
  student = distill.add_lora(models.from_pretrained(student_dir), rank=16, alpha=16.0)
  factors = flatten(nnx.state(student, nnx.LoRAParam))
  assert len(factors) == 2 * 7 * student.config.num_layers
  for path in (k[:-len("/lora_a")] for k in factors if k.endswith("/lora_a")):
    a, b = np.asarray(factors[f"{path}/lora_a"]), np.asarray(factors[f"{path}/lora_b"])
    bound = 1 / np.sqrt(a.shape[0])  # fan_in = in_features ([in, r], like PEFT's A.T)
    assert np.abs(a).max() <= bound, path
    assert np.abs(a).max() > 0.9 * bound, path  # uniform over the whole interval
    np.testing.assert_allclose(a.std(), bound / np.sqrt(3), rtol=0.1, err_msg=path)
    np.testing.assert_array_equal(b, 0.0, err_msg=path)


def _learning_rates(config, total_steps):
  """The learning rate of each step of make_optimizer's AdamW, read off its updates: with a
  constant gradient, no clipping and no weight decay, Adam's step is lr * g / |g| = lr."""
  tx = distill.make_optimizer(config, total_steps)
  params = {"w": jnp.zeros((1, 1))}
  grad = {"w": jnp.ones((1, 1))}
  state, lrs = tx.init(params), []
  for _ in range(total_steps):
    updates, state = tx.update(grad, state, params)
    lrs.append(-float(updates["w"][0, 0]))
  return np.array(lrs)


@pytest.mark.parametrize("total_steps", [50, 100, 10])
def test_schedule_matches_transformers(total_steps):
  """Warmup steps are ceil(fraction * steps) as in transformers (50 * 3% = 1.5 -> 2, not 1),
  then cosine decay to 0: the learning rate of every step equals the HF Trainer's."""
  import types

  import torch
  import transformers
  config = distill.DistillConfig(learning_rate=5e-4, weight_decay=0.0, clip_norm=1e9,
                                 warmup_fraction=0.03)
  warmup = transformers.TrainingArguments.get_warmup_steps(
      types.SimpleNamespace(warmup_steps=config.warmup_fraction), total_steps)
  opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
  schedule = transformers.get_cosine_schedule_with_warmup(opt, warmup, total_steps)
  hf = []
  for _ in range(total_steps):
    hf.append(opt.param_groups[0]["lr"])
    opt.step()
    schedule.step()
  np.testing.assert_allclose(_learning_rates(config, total_steps), hf, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("total_steps", [1, 2])
def test_a_run_of_one_or_two_steps_trains(total_steps):
  """3% warmup rounds up to a whole step: transformers would spend a one-step run at learning
  rate 0. Here the last step always learns."""
  config = distill.DistillConfig(learning_rate=5e-4, weight_decay=0.0, clip_norm=1e9,
                                 warmup_fraction=0.03)
  lrs = _learning_rates(config, total_steps)
  assert lrs[-1] == pytest.approx(5e-4 if total_steps == 1 else 4.9999e-4, rel=1e-4)
