"""Training objectives as pure functions of (params, batch, rng).

Base flow (SPEC §2, variational flow matching): cross-entropy of the denoiser μθ(x_γ, γ) against
the clean tokens, at τ stratified-uniform over the batch and γ = g(τ), with an optional detached
weight w = stopgrad((‖μ − x1‖² + c)^(−r)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cfmjax import corruption, state_space


def cross_entropy(logits, tokens):
  """−log softmax(logits)[token] per position, float32 [B, L]."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
  return log_z - target


def brier_score(probs, tokens):
  """‖p − e_x1‖² per position, computed without materialising the one-hot vector."""
  p_target = jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.square(probs), axis=-1) - 2.0 * p_target + 1.0


def adaptive_weight(logits, tokens, power: float = 0.5, offset: float = 0.01):
  """w = stopgrad((‖μ − x1‖² + c)^(−r)): up-weights positions the model already nearly solves."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return jax.lax.stop_gradient((brier_score(probs, tokens) + offset) ** (-power))


def flow_matching_loss(params, tokens, rng, *, apply_fn, schedule, vocab_size: int,
                       adaptive_weighting: bool = False, weight_power: float = 0.5,
                       weight_offset: float = 0.01, space=None):
  """The base-flow loss on one batch of clean token ids [B, L]. Returns (loss, metrics).

  `space` (a `state_space.StateSpace`) says where the state lives and whether the output is reduced
  in vocabulary chunks; None is the V-space reference with full logits from `apply_fn`.
  """
  space = space or state_space.StateSpace(apply_fn, vocab_size)
  rng_time, rng_noise = jax.random.split(rng)
  tau = corruption.stratified_uniform(rng_time, tokens.shape[0])
  gamma = schedule.gamma(tau)
  x = space.noisy_state(params, rng_noise, tokens, gamma)
  # the diagonal s = t of the flow map network
  stats = space.output_stats(params, x, tau, tau, tokens=tokens)
  ce = state_space.cross_entropy(stats)
  if adaptive_weighting:  # w = stopgrad((‖μ − x1‖² + c)^(−r))
    weight = jax.lax.stop_gradient((state_space.brier_score(stats) + weight_offset) ** (-weight_power))
  else:
    weight = jnp.ones_like(ce)
  loss = jnp.mean(weight * ce)
  accuracy = jnp.mean(stats["argmax"] == tokens)
  return loss, {"loss": loss, "cross_entropy": jnp.mean(ce), "accuracy": accuracy}
