"""The flow-map distillation objective (SPEC §3): diagonal cross-entropy + a consistency loss.

One network f_θ(x, τ_s, τ_t) is both the denoiser (s = t) and the flow map (s < t). Each batch is
split: the first `diag_fraction` of the rows keeps training the diagonal with the base flow's
cross-entropy; the rest draws a time pair s < t and is trained with KL(teacher ‖ ψθ(x_s, s, t)),
where the teacher (PSD, LSD or ESD, see `distill_losses.py`) is built from a stop-gradient copy of the
network: either the live student or its EMA (`distill.teacher`).

Time pairs are drawn in model time τ (gap d ~ U(0, 1), s ~ U(0, 1 − d), t = s + d, PSD's u the
midpoint), with the boundary pair (0, 1) at probability `boundary_prob`; the flow algebra is in
γ = g(τ). For LSD and ESD, t is capped at `t_max` < 1, where their identities degenerate.

Conditioning (SPEC §8). A prompt-trained base gives a conditional flow map: consistency rows draw a
prompt (never dropped) and the teacher network's logits are clamped to the prompt there, so every
teacher's flow-map algebra keeps prompt positions fixed; the diagonal keeps the base's prompt
training (with its dropout). Guided distillation (`distill.guidance` = ω ≥ 0): the diagonal rows
learn the frozen base's guided denoiser μ_ω = μ_u + ω (μ_c − μ_u) (projected onto the simplex
when ω > 1 takes it outside) instead of the data, so the student's own diagonal *is* the guided
flow and the unchanged PSD/LSD/ESD teachers distil the guided flow map. ω is fixed per student,
not a network input: it keeps the network unchanged (no third conditioning input beside τ_s,
τ_t), spends the student's capacity on the one ω that is deployed, and each ω is a separate,
cheap distillation run from the same base. `objective = "fixed_point"` is the other stage
(fixed_point.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cfmjax.flow import corruption, prompting
from cfmjax.models import model as model_lib, state_space
from cfmjax.objectives import distill_losses, loss_weights, losses

MODES = ("two_stage", "joint")
TEACHERS = ("ema", "student")


def validate(config):
  # Called by the distillation objectives only (objectives._Distillation.validate).
  d, loss = config.distill, config.objective
  if d.mode not in MODES:
    raise ValueError(f"unknown distill.mode={d.mode!r}; choose one of {MODES}")
  if d.teacher not in TEACHERS:
    raise ValueError(f"unknown distill.teacher={d.teacher!r}; choose one of {TEACHERS}")
  if loss in ("lsd", "esd") and config.model.attention == "cudnn":
    raise ValueError(f"objective={loss!r} differentiates the network forward (jax.jvp), which the "
                     "fused cuDNN attention kernel does not support; set --config.model.attention=xla")
  if d.gradient_surgery and loss != "psd":
    raise ValueError("distill.gradient_surgery is implemented for psd only")
  if d.learned_weighting not in loss_weights.INPUTS:
    raise ValueError(f"unknown distill.learned_weighting={d.learned_weighting!r}; choose one of "
                     f"{loss_weights.INPUTS}")
  if not 0.0 <= d.diag_fraction < 1.0:
    raise ValueError(f"distill.diag_fraction must lie in [0, 1), got {d.diag_fraction}")
  if d.guidance >= 0 and loss == "fixed_point":
    raise ValueError("distill.guidance applies to flow-map distillation (psd / lsd / esd), not fixed_point")
  if loss == "fixed_point" and d.fixed_point_iters < 1:
    raise ValueError(f"distill.fixed_point_iters must be >= 1, got {d.fixed_point_iters}")


def num_diagonal_rows(batch_size: int, diag_fraction: float) -> int:
  return int(round(batch_size * diag_fraction))


def sample_time_pairs(rng, num: int, boundary_prob: float, t_max: float = 1.0, max_gap=1.0):
  """(τ_s, τ_u, τ_t) for `num` rows: s < u < t, u the midpoint; (0, 1) with prob `boundary_prob`.

  `max_gap` < 1 restricts the gaps t − s (a curriculum: short jumps first, where the teachers rely
  least on the still-untrained long-jump predictions).
  """
  rng_gap, rng_start, rng_boundary = jax.random.split(rng, 3)
  gap = jax.random.uniform(rng_gap, (num,), minval=1e-3, maxval=max_gap)
  start = jax.random.uniform(rng_start, (num,)) * (1.0 - gap)
  boundary = jax.random.uniform(rng_boundary, (num,)) < boundary_prob
  tau_s = jnp.where(boundary, 0.0, start)
  tau_t = jnp.where(boundary, 1.0, start + gap)
  tau_t = jnp.minimum(tau_t, t_max)
  return tau_s, 0.5 * (tau_s + tau_t), tau_t


def make_losses(apply_fn, schedule, vocab_size: int, config):
  """(diagonal_loss, consistency_loss): f(params, frozen_base, tokens, rng, step) and
  f(params, teacher_params, tokens, rng, step), each -> (loss, metrics). The diagonal reads the frozen
  base only when guided; the consistency rows read the EMA (or detached student) teacher."""
  d = config.distill
  loss = config.objective
  t_max = 1.0 if loss == "psd" else d.t_max
  space = state_space.from_config(apply_fn, vocab_size, config)

  prompt_settings = losses.prompt_settings(config)
  diagonal_options = losses.FlowOptions(losses.adaptive_weight(config.flow), prompt_settings)

  def diagonal_loss(params, frozen_base, tokens, rng, step):
    del step
    if d.guidance >= 0:
      return guided_diagonal_loss(params, frozen_base, tokens, rng, space=space, schedule=schedule,
                                  guidance=d.guidance, prompt=prompt_settings)
    return losses.flow_matching_loss(params, tokens, rng, space=space, schedule=schedule, options=diagonal_options)

  def consistency_loss(params, teacher_params, tokens, rng, step):
    rng_time, rng_noise = jax.random.split(rng)
    if d.gap_warmup_steps > 0:  # gaps up to 5% at step 0, growing linearly to the full range
      max_gap = jnp.minimum(1.0, 0.05 + 0.95 * step / d.gap_warmup_steps)
      boundary_prob = jnp.where(step >= d.gap_warmup_steps, d.boundary_prob, 0.0)
    else:
      max_gap, boundary_prob = 1.0, d.boundary_prob
    tau_s, tau_u, tau_t = sample_time_pairs(rng_time, tokens.shape[0], boundary_prob, t_max, max_gap)
    gamma_s, gamma_u, gamma_t = schedule.gamma(tau_s), schedule.gamma(tau_u), schedule.gamma(tau_t)
    if d.teacher == "student":  # the same network: the teacher sees the student's state, detached
      x = space.noisy_state(params, rng_noise, tokens, gamma_s)
      x_teacher = jax.lax.stop_gradient(x)
    else:  # in embedding space each network sees the one draw of ε through its own W
      x, x_teacher = space.noisy_states(params, teacher_params, rng_noise, tokens, gamma_s)
    prompt, conditioning, keep = None, {}, jnp.ones(tokens.shape, jnp.float32)
    if prompt_settings is not None:  # a conditional flow map: the prompt is always given here
      min_len, max_len, _ = prompt_settings  # the prompt is never dropped here
      lengths, _ = prompting.draw_prompt_lengths(jax.random.fold_in(rng, 1), tokens.shape[0], min_len, max_len, 0.0)
      prompt = (tokens, prompting.prefix_mask(lengths, tokens.shape[1]))
      x, conditioning = space.conditional_input(params, x, prompt)
      x_teacher, _ = space.conditional_input(teacher_params, x_teacher, prompt)
      keep = (~prompt[1]).astype(jnp.float32)

    # The teacher network in flow time γ (what the identities of SPEC §3 differentiate).
    def net(x, gs, gt):
      z = space.logits(teacher_params, x, schedule.tau(gs), schedule.tau(gt), **conditioning)
      return z if prompt is None else prompting.clamp_logits(z, *prompt)

    embed = lambda probs: space.embed_probs(teacher_params, probs)
    if space.chunked and prompt is None:  # no [B, L, V] teacher (issue 16)
      hidden_net = lambda x, gs, gt: space.hidden(teacher_params, x, schedule.tau(gs), schedule.tau(gt),
                                                  **conditioning)
      stats = lambda h, skip, emb, tangent: space.hidden_stats(teacher_params, h, skip, with_embedding=emb,
                                                               tangent=tangent)
      head = model_lib.head_params(teacher_params)
      if loss == "psd":
        teacher = distill_losses.psd_teacher_chunked(hidden_net, stats, head, x_teacher, gamma_s, gamma_u, gamma_t)
      else:
        chunked = (distill_losses.lsd_teacher_chunked if loss == "lsd" else distill_losses.esd_teacher_chunked)
        normalise = lambda t: state_space.ratio_teacher(t, space.vocab_chunk, jnp.dtype(space.dtype))
        teacher = chunked(hidden_net, stats, normalise, head, x_teacher, gamma_s, gamma_t, d.min_ratio)
    elif loss == "psd":
      teacher = distill_losses.psd_teacher(net, x_teacher, gamma_s, gamma_u, gamma_t, embed=embed)
    elif loss == "lsd":
      teacher = distill_losses.lsd_teacher(net, x_teacher, gamma_s, gamma_t, d.min_ratio, embed=embed)
    else:
      teacher = distill_losses.esd_teacher(net, x_teacher, gamma_s, gamma_t, d.min_ratio, embed=embed)
    teacher = jax.lax.stop_gradient(teacher)

    # KL(teacher ‖ ψθ) from statistics of the student's output (chunked over V if configured).
    stats = space.output_stats(params, x, tau_s, tau_t, teacher=teacher, **conditioning)
    kl = state_space.kl_to_teacher(stats, teacher)
    if d.adaptive_weighting:  # the detached weight of SPEC §2 with the teacher in place of x1
      weight = losses.AdaptiveWeight(config.flow.weight_power, config.flow.weight_offset)(
          state_space.squared_distance_to_teacher(stats, teacher))
    else:
      weight = jnp.ones_like(kl)
    # Mean over generated positions (all of them without a prompt).
    row_loss = jnp.sum(weight * kl * keep, axis=-1) / jnp.maximum(jnp.sum(keep, axis=-1), 1.0)
    metrics = {"consistency_kl": prompting.masked_mean(kl, keep)}
    if d.learned_weighting != "none":
      log_w = loss_weights.log_weight(params, tau_s, tau_t, d.learned_weighting)
      row_loss = loss_weights.weighted(row_loss, log_w)
      metrics["mean_log_weight"] = jnp.mean(log_w)
    return jnp.mean(row_loss), metrics

  return diagonal_loss, consistency_loss


def guided_diagonal_loss(params, base, tokens, rng, *, space: state_space.StateSpace, schedule, guidance: float,
                         prompt):
  """KL(μ_ω of the frozen base ‖ student's conditional diagonal) on generated positions.

  μ_ω = μ_u + ω (μ_c − μ_u) from two passes of the frozen base (prompt given / prompt dropped),
  projected onto the simplex; the student sees the prompt (always: it is a conditional model).
  Either state space: each network sees the one draw of ε through its own W (`noisy_states`).
  """
  if prompt is None:
    raise ValueError("distill.guidance needs a prompt-trained base (flow.prompt.max_len > 0)")
  rng_time, rng_noise = jax.random.split(rng)
  tau = corruption.stratified_uniform(rng_time, tokens.shape[0])
  base = jax.lax.stop_gradient(base)  # the frozen base (frozen_teacher.py) never trains
  x, x_base = space.noisy_states(params, base, rng_noise, tokens, schedule.gamma(tau))
  lengths, _ = prompting.draw_prompt_lengths(jax.random.fold_in(rng, 1), tokens.shape[0], prompt[0],
                                             prompt[1], 0.0)
  mask = prompting.prefix_mask(lengths, tokens.shape[1])
  target = space.probs(base, x_base, tau, tau, prompt=(tokens, mask), guidance=guidance)
  target = jax.lax.stop_gradient(prompting.project_to_simplex(target))
  x, conditioning = space.conditional_input(params, x, (tokens, mask))
  logits = space.logits(params, x, tau, tau, **conditioning)
  keep = (~mask).astype(jnp.float32)
  loss = prompting.masked_mean(distill_losses.kl_to_teacher(target, logits), keep)
  accuracy = prompting.masked_mean(jnp.argmax(logits, axis=-1) == tokens, keep)
  return loss, {"loss": loss, "accuracy": accuracy}


def project_conflict(g_cons, g_diag):
  """Gradient surgery: removes from g_cons its component along g_diag when the two conflict."""
  dot = sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(g_cons), jax.tree_util.tree_leaves(g_diag)))
  norm_sq = sum(jnp.vdot(b, b) for b in jax.tree_util.tree_leaves(g_diag))
  coef = jnp.where(dot < 0.0, dot / jnp.maximum(norm_sq, 1e-30), 0.0)
  return jax.tree_util.tree_map(lambda a, b: a - coef * b, g_cons, g_diag), dot < 0.0


def make_grad_fn(apply_fn, schedule, vocab_size: int, config):
  """(params, tokens, rng, ema_params, step, frozen_base) -> (grads, metrics) for flow-map distillation
  (psd, lsd, esd); frozen_base is the base run's network when guided (frozen_teacher.py), else None."""
  d = config.distill
  diagonal_loss, consistency_loss = make_losses(apply_fn, schedule, vocab_size, config)
  num_diag = num_diagonal_rows(config.train.batch_size, d.diag_fraction)

  def split(tokens):
    return tokens[:num_diag], tokens[num_diag:]

  def grad_fn(params, tokens, rng, ema_params, step, frozen_base=None):
    teacher_params = ema_params if d.teacher == "ema" else jax.lax.stop_gradient(params)
    rng_diag, rng_cons = jax.random.split(rng)
    diag_tokens, cons_tokens = split(tokens)
    n_diag, n_cons = diag_tokens.shape[0], cons_tokens.shape[0]
    frac = n_diag / (n_diag + n_cons)

    cons_grad = jax.value_and_grad(consistency_loss, has_aux=True)
    (cons, cons_metrics), g_cons = cons_grad(params, teacher_params, cons_tokens, rng_cons, step)
    metrics = dict(cons_metrics, consistency_loss=cons)
    if n_diag == 0:
      return g_cons, dict(metrics, loss=cons)

    diag_grad = jax.value_and_grad(diagonal_loss, has_aux=True)
    (diag, diag_metrics), g_diag = diag_grad(params, frozen_base, diag_tokens, rng_diag, step)
    metrics.update(diagonal_loss=diag, diagonal_accuracy=diag_metrics["accuracy"])
    if d.gradient_surgery:
      g_cons, conflicted = project_conflict(g_cons, g_diag)
      metrics["surgery_applied"] = conflicted.astype(jnp.float32)
    # Row-weighted mix, so the total is the mean over the batch's rows of their own losses.
    grads = jax.tree_util.tree_map(lambda a, b: frac * a + (1 - frac) * b, g_diag, g_cons)
    metrics["loss"] = frac * diag + (1 - frac) * cons
    return grads, metrics

  return grad_fn
