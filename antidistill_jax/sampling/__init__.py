"""Antidistillation sampling: one jitted program per shape that prefills the teacher (and the
proxy), then decodes with a `lax.scan` whose step adds lam * Delta to the teacher.

  sampler = Sampler(teacher, tokenizer, proxy=proxy, grad=g)          # once per run
  out = sampler(prompts, SamplingParams(max_new_tokens=1024, tau=0.9, top_p=0.95, lam=0.08))

Delta(v | x) is the directional derivative of the proxy's log p(v | x) along the gradient g of
the proxy's distillation loss (`gradients`), exact by jax.jvp (method="jvp", the default) or by
the paper's central difference (method="fd"); lam * Delta enters the teacher's log-probs
(placement="paper", the paper's Algorithm 1) or its raw logits (placement="reference", the
authors' code), before top-k / top-p (delta_on="vocab", the authors') or inside the teacher's
own top-k / top-p set (delta_on="nucleus").

  adjustment  the method: Delta (jvp, fd and fd's rounding check), the proxy side prepared
              once per (method, eps), and the placements (`adjusted_logits`); `delta(proxy,
              grad, ids)` for analysis.
  draw        one token per row: Gumbel-max first, then only the drawn token's top-k / top-p
              membership checked (the filter's search runs for rejected rows alone).
  decode      the jitted program: prefill on left-padded prompts, then a while_loop of
              lax.scan chunks with traced tau, lam, eps, top_p and delta_on (a whole sweep
              compiles once), per-prompt randomness.
  sampler     `SamplingParams`, `Sampler` (the models split once, batches placed on the mesh)
              and `Generation`; `generate` is the one-shot form.
"""

from antidistill_jax.sampling.adjustment import delta, perturbed_states
from antidistill_jax.sampling.decode import left_pad
from antidistill_jax.sampling.sampler import Generation, Sampler, SamplingParams, generate

__all__ = ["Generation", "Sampler", "SamplingParams", "delta", "generate", "left_pad",
           "perturbed_states"]
