"""The one config schema: every field any config sets or any code reads, with its meaning and
unit. The experiment configs (tiny, synthetic, gsm8k_paper, math_paper, mmlu_paper) and the
sampling demo (generate) start from `get_config()` and change values only: the returned config
is locked, so a key that is not here raises, in a config file and on the command line alike
(`--config.attacks.names=...` works on every config). tests/test_configs.py checks that every
config has exactly this tree.

Optional parts are switched off by a value, never by leaving a key out:
  tiny.enabled=False, scratch.enabled=False   the models come from models.* (hub ids or dirs)
  grid.calibrate.points=0                     no lambda calibration: ADS lams from the grid
  attacks.names=()                            no attacker students
  data.task.kind="sums"                       the default synthetic task (chain fields unused)
  sample.max_length=0                         no cap on prompt + new tokens
  sample.top_p=None, sample.top_k=None        no nucleus / top-k filter
The defaults of `distill` are `distill.DistillConfig()`'s (the reference's LoRA settings); the
prompts are the authors' (`SYSTEM_PROMPT` as the system turn, PAPER.md "Prompt layout").

Types: a leaf keeps the type of its default here, except the fields whose comment says
"None: ..." (sample.top_p, sample.top_k, distill.lora_rank), which take None or a number.

Configs load this file by path (not by import): configs/ also ships inside the package as
`antidistill_jax.configs`, and `--config=FILE` loads a config by file path.
"""

import ml_collections

# The authors' system prompt (utils.py of the reference code; PAPER.md, "Prompt layout"), the
# system turn of every GSM8K / MATH / MMLU prompt. Written out here rather than imported from
# antidistill_jax.data.prompts (which pulls in jax, ~1.5 s, for every config load);
# tests/test_configs.py checks it equals `prompts.SYSTEM_PROMPT`.
SYSTEM_PROMPT = (
    "You are a math teacher. You will be given a math problem and you will solve it step by "
    "step.\nYou will output your final solution like \\boxed{ANSWER}. Be sure to include "
    "relevant units within the brackets and fully evaluate arithmetic expressions.\n")

# distill.LORA_TARGETS, the projections the reference's LoRA wraps.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _shape(hidden_size: int = 64, intermediate_size: int = 128, layers: int = 2) -> dict:
  """A tiny model's shape (config.json fields; random_checkpoints.tiny_hf_config's defaults)."""
  return dict(
      hidden_size=hidden_size,  # model width D (units)
      intermediate_size=intermediate_size,  # MLP width F (units)
      num_hidden_layers=layers,  # transformer blocks
      num_attention_heads=4,  # query heads N
      num_key_value_heads=2)  # key/value heads K (grouped-query attention)


def _scratch_model(model_type: str, traces: int | None) -> dict:
  """One model of `scratch`: its family, shape and training (task_models.scratch_config fields)."""
  spec = dict(
      model_type=model_type,  # "qwen2" or "llama": the architecture family
      shape=_shape(),  # its size (above)
      train=dict(batch_size=32,  # examples per optimizer step
                 learning_rate=4e-3,  # peak AdamW learning rate (cosine schedule)
                 epochs=1))  # passes over its training traces
  if traces is not None:
    spec["traces"] = traces  # training traces it learns from (examples)
  return spec


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # What main runs: "experiment" (the pipeline's stages, antidistill_jax.pipeline, in
  # --workdir), "study" (experiments over arms and seeds: section `study`) or "generate" (the
  # sampling demo, main.run_generate: section `generate`).
  c.job = "experiment"
  # One seed, linked into data.seed, tiny.seed, scratch.seed, sample.seed, distill.seed and
  # attacks.seed: --config.seed=S (or setting any one of them) sets all six.
  seed = ml_collections.FieldReference(0)
  c.seed = seed

  c.data = dict(
      # "<dataset>:<split>" g is computed on: gsm8k, math, mmlu, synthetic, or a file
      # jsonl:PATH (every row) / jsonl:PATH:train / jsonl:PATH:holdout (its seeded 70/30 split)
      holdout="",
      train="",  # "<dataset>:<split>" of the training traces each grid point samples
      test="",  # "<dataset>:<split>" every model is evaluated on
      grader="",  # how answers are graded: "gsm8k", "math", "mmlu" or "synthetic"
      max_holdout=0,  # examples kept from the start of the holdout split (0: all)
      max_train=0,  # examples kept from the start of the train split (0: all)
      max_test=0,  # examples kept from the start of the test split (0: all)
      seed=seed,  # the synthetic task's problems (the top-level seed)
      manual_dir="",  # offline source files (train.jsonl, test.jsonl, ...); "": download
      data_dir="",  # TFDS data directory; "": TFDS's default
      split_seed=42,  # seed of the 70/30 train/holdout split (records.DEFAULT_SEED)
      # The synthetic task (data.synthetic): kind "sums" (GSM8K-formatted sums, configs/tiny.py;
      # the fields below are ignored) or "chains" (synthetic.chains, with these options).
      task=dict(kind="sums",  # "sums" or "chains"
                min_terms=3,  # fewest terms of a problem (count)
                max_terms=5,  # most terms of a problem (count)
                max_value=9,  # largest term (terms are 1..max_value)
                order="free",  # operand order within a step: "free" (either) or "fixed"
                separators=(";", ","),  # strings that may join steps (one drawn per problem)
                direction="left"))  # the side the chain accumulates from

  c.models = dict(
      teacher="",  # the teacher: hub id or local / gs:// directory (generate: "" = tiny random)
      proxy="",  # the proxy student, sharing the teacher's tokenizer (same forms)
      student="",  # the student that is distilled (same forms; its own tokenizer)
      dtype="float32")  # parameter dtype of every loaded model: "float32" or "bfloat16"

  # Tiny random teacher / proxy / student (random_checkpoints.make_tiny_checkpoint), built in
  # workdir/models from one BPE tokenizer trained on the splits' text: checks that the pipeline
  # runs.
  tiny_model = lambda: dict(model_type="qwen2",  # "qwen2" or "llama"
                            hidden_size=64,  # model width D (units)
                            intermediate_size=128)  # MLP width F (units)
  c.tiny = dict(
      enabled=False,  # build and use the tiny random models instead of models.*
      seed=seed,  # initialisation seed (teacher seed, proxy seed + 1, student seed + 2)
      vocab_size=0,  # BPE vocabulary of the tiny tokenizer (tokens; set when enabled)
      teacher=tiny_model(), proxy=tiny_model(), student=tiny_model())

  # Models trained from scratch on the synthetic task by the `models` stage (task_models.py):
  # the teacher on gold traces, the proxy on the teacher's traces at tau = 1, the student
  # pre-trained on easier problems (pretrain) of the same task.
  student = _scratch_model("llama", None)
  student["pretrain"] = dict(
      traces=0,  # pre-training problems (examples); the student trains from random weights first
      # data.task overrides for the pre-training problems (here: the same task)
      task=dict(min_terms=3, max_terms=5, order="free", separators=(";", ",")))
  c.scratch = dict(
      enabled=False,  # train the three models here instead of loading models.*
      seed=seed,  # initialisation and data-order seed (teacher seed, proxy + 1, student + 2)
      batch_size=256,  # prompts per batch when the teacher writes the proxy's traces
      eval_rows=256,  # holdout traces each model's holdout loss is measured on (examples)
      teacher=_scratch_model("qwen2", 0), proxy=_scratch_model("qwen2", 0), student=student)

  c.prompts = dict(
      # System turn of every chat prompt, teacher's and student's ("": none). The user turn is
      # always problem.strip() + "\n" (data.prompts.build_prompts).
      system=SYSTEM_PROMPT,
      max_prompt_length=256,  # prompts longer than this are dropped (tokens)
      answer_forcing=True)  # also grade with "**Final Answer** \boxed{" forced after the trace

  c.holdout = dict(
      max_new_tokens=1024,  # greedy teacher trace length on the holdout split (tokens)
      batch_size=64)  # prompts per generation batch
  c.grad = dict(
      micro_batch_size=8,  # holdout traces per proxy forward/backward for g
      # Holdout problems g is computed on: the first `rows` (0: all). The greedy traces of the
      # rest are the clean traces, never seen by g, that each student's holdout NLL is measured
      # on (rows 0: on g's own traces).
      rows=0,
      # Temperature of the teacher's traces g is computed on (0: the greedy holdout traces, the
      # paper's choice; > 0: the grad stage samples its own on those problems).
      tau=0.0)

  c.sample = dict(
      max_new_tokens=1024,  # trace length cap (tokens)
      max_length=0,  # cap on left-padded prompt + new tokens, as HF's max_length (tokens; 0: none)
      batch_size=64,  # prompts per generation batch
      # Continuous batching: > 0 decodes each batch of batch_size prompts on this many slots,
      # a finished trace's slot taking the next prompt (sampling.continuous; the same tokens,
      # faster when trace lengths vary; set batch_size to several times the slots). 0: static
      # batches of batch_size rows.
      slots=0,
      method="jvp",  # Delta: "jvp" (exact) or "fd" (the paper's central difference)
      placement="paper",  # where lam * Delta enters: "paper" (log p / tau) or "reference" (z)
      eps=1e-2,  # finite-difference step (method "fd"); lam = b * eps on the grid
      top_p=None,  # nucleus filter (probability mass; None: off)
      top_k=None,  # top-k filter (tokens; None: off)
      # Where lam * Delta applies: "vocab" (the authors': every token, then top-k/top-p of the
      # adjusted logits) or "nucleus" (the teacher's own top-k/top-p set, Delta inside it).
      delta_on="vocab",
      seed=seed)  # sampling randomness (per global prompt index)

  c.grid = dict(
      ads_taus=(),  # temperatures of the ADS sweep
      ads_lam_over_eps=(),  # ADS lams as b = lam / eps (unitless); lam 0 is plain sampling
      temperatures=(),  # temperatures of the baseline sweep (lam = 0)
      # The A/A control: plain sampling at these taus from another sampling stream (seed),
      # analysed exactly as a defence; its gap to the baseline sweep must be consistent with 0.
      controls=(),
      students=1,  # students per trace set (replicates: distillation seeds; R >= 2 for a CI)
      # The product-of-experts defence (sampling.adjustment, method "poe"): the teacher's and
      # the unperturbed proxy's log-probs mixed as (1 - gamma) log p_T + gamma log p_P, at each
      # of these taus and gammas (The Distillation Game reports tau 0.6, gamma 0.6-0.7)
      poe_taus=(),
      poe_gammas=(),
      # ADS with the answer-aligned g (`aligned`: the proxy's gradient on the answer tokens
      # only, rescaled to g's norm) at the ADS taus, kind "aligned", its lams calibrated like
      # ADS's (the calibrate stage's second item) or the ADS lams without calibration; False:
      # none
      aligned=False,
      # Lambda calibration (the `calibrate` stage): ADS lams chosen so that the teacher's
      # accuracy under them spans the temperature sweep's, or (logprob_drops) so that the
      # teacher finds the ADS text that many nats per token less likely than plain text, a
      # target that means the same on every model; they replace ads_lam_over_eps.
      calibrate=dict(
          n=256,  # holdout problems the accuracies or log-probs are measured on (examples)
          points=0,  # ADS lams to choose by accuracy (count; 0: none)
          # ADS lams by the teacher's log-prob drop instead, one per target (nats per token,
          # at the first ADS tau; sampling.calibration); (): none
          logprob_drops=(),
          # aim the lams between the accuracies of these taus of the sweep (): all of it)
          between=(),
          ladder=(0.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)))  # b = lam / eps to measure

  # Distillation (distill.DistillConfig: its fields, its defaults = the reference's settings).
  c.distill = dict(
      lora_rank=128,  # LoRA rank r (None: full fine-tuning)
      lora_alpha=128.0,  # LoRA scale numerator (the update is alpha / r * A B)
      lora_dropout=0.0,  # dropout on the LoRA input (probability)
      lora_targets=LORA_TARGETS,  # projections wrapped with LoRA
      learning_rate=5e-4,  # peak AdamW learning rate (linear warmup, cosine decay)
      weight_decay=0.1,  # AdamW weight decay (decoupled)
      clip_norm=1.0,  # global gradient-norm clip
      warmup_fraction=0.03,  # warmup steps as a fraction of all steps
      epochs=3,  # passes over the training traces
      batch_size=16,  # examples per optimizer step
      micro_batch_size=4,  # examples per forward/backward (gradient accumulation)
      max_length=4096,  # prompt + trace cap; longer completions are cut (tokens)
      length_multiple=64,  # padded sequence lengths are multiples of this (tokens)
      eval_every=50,  # holdout loss every this many steps
      checkpoint_every=50,  # orbax checkpoint every this many steps
      seed=seed,  # data order
      pad_id=0)  # token id of padding (masked out)

  c.eval = dict(
      max_new_tokens=1024,  # greedy answer length on the test split (tokens)
      batch_size=64)  # prompts per generation batch

  # Attackers distilling from the ADS traces (attacks.py), each a student per point it applies
  # to. The settings are configs/synthetic.py's, fixed before any attacker ran.
  c.attacks = dict(
      # some of "keep_correct", "clean_mix", "reaimed", "reweight", "reweight_mass",
      # "resample" (a,b,c on the command line), "prefill"; "reweight@B" sets beta = B,
      # "reweight_mass@M" the top-fifth share M, "resample@Q" the budget Q (one attacker each)
      names=(),
      seed=seed,  # draw of the clean traces clean_mix, reaimed and reweight use
      # point kinds the attackers distil from (e.g. ("ads", "temperature")); (): every kind
      kinds=(),
      students=0,  # replicate students per attacked trace set (0: grid.students)
      clean_mix=dict(rows=300),  # clean traces added to each trace set (examples)
      reaimed=dict(
          clean_rows=256,  # clean traces the student's own gradient is taken on (examples)
          drop_fraction=0.25,  # traces skipped per epoch, highest score first (fraction)
          # traces per forward/backward when scoring (examples; like grad.micro_batch_size, sized
          # for a hub student at the paper's lengths)
          micro_batch_size=8),
      # The Distillation Game's adaptive student (ysfalh/distillation-game, strategic_fd):
      # beta and clip are the reference code's (configs/gsm8k.yaml beta_s_values, DELTA_B_CLIP).
      reweight=dict(
          clean_rows=256,  # clean traces the student's gradient g_s is taken on (examples)
          beta=0.5,  # w_i ~ exp(beta * clip(a_i)); > 0 weights up traces that raise clean loss
          # reweight_mass: |beta| chosen per set so the most-weighted fifth holds this share of
          # the weight (the reference's runs at beta 0.5: 0.221-0.233, ysfalh/distillation-game
          # gsm8k_mismatch/.../RESULTS.md); beta above gives the sign. A fixed beta is a
          # different attacker on every model (a_i's scale is the student's).
          top20_mass=0.22,
          clip=10.0,  # a_i clipped to [-clip, clip] (nats per token per unit of g_s)
          micro_batch_size=8),  # traces per forward/backward when scoring (examples; as reaimed)
      # Degenerate-text filter + re-queries ("What Does It Mean to Break a Distillation
      # Defense?"); the rules are the public filter's (distillation-game, filtering_traces/).
      resample=dict(
          budget=2.0,  # total queries over the served set's ("resample@Q" sets it; 1: filter)
          rounds=3,  # re-query rounds the sample stage runs (each asks for what is still flagged)
          min_foreign_run=1,  # foreign-script letters in a row that flag a trace (0: off)
          min_copies=8,  # copies in a row of one token that flag a trace (0: off)
          max_period=1),  # also blocks of up to this many tokens repeated min_copies times
      # The attacker fixes the first words of every response; the teacher continues them.
      prefill=dict(text=""))  # the prefill ("": none, the served traces as they are)

  # Devices: data x model (-1: the rest); fsdp_teacher also shards the teacher's hidden
  # dimension over `data` (FSDP), for teachers that do not fit on `model` devices.
  c.mesh = dict(data=-1,  # devices on the batch axis (-1: all not on `model`)
                model=1,  # devices on the weight axis (heads, MLP, vocabulary)
                fsdp_teacher=False)  # shard the teacher's hidden dimension over `data` too

  # Jobs sharing one workdir (--shard, several hosts): a stage another job claimed is waited for.
  c.pipeline = dict(
      wait_timeout_s=7200.0,  # how long to wait for it before failing (seconds)
      poll_s=2.0,  # how often to look (seconds)
      # This config's folder under index/ and report/ ("": none); a study names one per arm
      # and seed, so that the chains of a study share one workdir and its finished stages.
      name="")

  # The report of one run (antidistill_jax/report.py).
  c.report = dict(
      # SD of one student's test accuracy between replicate students of a trace set (training
      # and test-set noise), measured by a study at this config's sizes: the report then gives
      # this run's gap a CI from student noise and the gap it can detect (None: no CI)
      student_sd=None,
      student_sd_source="")  # where student_sd was measured (printed beside it)

  # A study (job "study", antidistill_jax/study.py): the experiment once per arm and seed, in
  # one workdir, then the study's report (CIs over seeds, the A/A row, a forest plot). An
  # arm is a config file's argument (--config=configs/synthetic_study.py:ARM).
  c.study = dict(
      arm="",  # the arm this config is ("": not a study)
      arms=(),  # the arms the study runs (each loaded as the config file with :ARM)
      seeds=(),  # the seeds of every arm (each a whole chain: models, g, traces, students)
      # ("a", "b") pairs: arm a's primary value minus arm b's, paired by seed (the effect of
      # what a changes)
      contrasts=(),
      # the arms whose ADS row a pre-registered plan's decision rules are applied to, in the
      # report's "The plan's decisions" (study.decision; (): none)
      primary=(),
      # also write the defence x attacker matrix (antidistill_jax/matrix.py) beside the report
      matrix=False,
      # attackers whose matrix cells are secondary: decided by the same rule, not counted
      # among the primary cells (a column added after a plan was written)
      matrix_secondary=(),
      out="",  # where the study's report goes ("": <workdir>/study; a local or gs:// folder)
      # Chain records (study.py): each finished chain's report/results.json, copied to
      # <records>/ARM/seedS.json with the chain's fingerprint. The report takes a chain from
      # the workdir, else from a record whose fingerprint the current code and config give, and
      # a run skips such chains: a study survives a lost workdir, and jobs in separate workdirs
      # (hosts with no shared disk) merge theirs. A local or gs:// folder ("": none).
      records="")

  # The sampling demo (job "generate"): models.teacher/proxy/dtype, prompts.system and
  # sample.max_new_tokens/top_p/seed/eps/method apply to it as they do to the experiment.
  c.generate = dict(
      problems=(),  # the problems sampled (user turns: problem.strip() + "\n")
      # DATASET:SPLIT (read as data.* reads the experiment's): its first problems_n problems
      # are sampled instead of `problems`; "": `problems`
      problems_from="",
      problems_n=8,
      tau=1.0,  # temperature (0: greedy)
      lam=0.0,  # ADS weight lam (0: plain sampling only; else plain and antidistilled)
      # > 0: choose lam instead so that the teacher's mean log-prob per token drops by this
      # many nats from plain sampling (sampling.calibration; the same on any model)
      logprob_drop=0.0,
      # g from held-out problems: DATASET:SPLIT (read as data.* reads the experiment's, e.g.
      # "gsm8k:train" with --config.data.manual_dir), the teacher's greedy answers to the
      # first holdout_n of them; "": its greedy answers to `problems` themselves
      holdout="",
      holdout_n=16,  # problems g is computed on (examples)
      workdir="runs/generate")  # where the tiny random teacher / proxy are built when "" above

  c.lock()  # values only from here on: an unknown key raises
  return c
