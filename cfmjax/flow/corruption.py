"""Noising: times for a batch and the noisy state x_γ = (1 − γ) ε + γ x1 (SPEC §1).

Every place that builds a noisy state goes through this module, so that moving the state from the
V-dimensional simplex into embedding space (SPEC §4) is a change here and in the model's first
layer only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def stratified_uniform(rng, batch_size: int) -> jax.Array:
  """τ_i = (i + u_i) / B: one draw per stratum, so every batch covers [0, 1] evenly.

  Stratifying lowers the variance of the batch loss compared with i.i.d. uniform times, at no cost
  in bias (each τ_i is still marginally uniform once rows are shuffled by the data pipeline).
  """
  u = jax.random.uniform(rng, (batch_size,), jnp.float32)
  return (jnp.arange(batch_size, dtype=jnp.float32) + u) / batch_size


def position_times(rng, tau, length: int, share: float):
  """(row times [B], position times [B, L]): a `share` of the rows (drawn per row) gets an
  independent uniform τ at every position, and the row time the network is conditioned on becomes
  their mean; the other rows keep τ at every position. Rows with mixed noise levels show the network
  positions whose neighbours are cleaner than themselves, where context tells much more about a
  token than when every position is as noisy as it is (issue 12, results/recipe_ablation.md)."""
  rng_rows, rng_tau = jax.random.split(rng)
  mixed = jax.random.bernoulli(rng_rows, share, tau.shape)
  own = jax.random.uniform(rng_tau, tau.shape + (length,), jnp.float32)
  position_tau = jnp.where(mixed[:, None], own, tau[:, None])
  return jnp.where(mixed, jnp.mean(own, axis=1), tau), position_tau


def one_hot(tokens, vocab_size: int, dtype=jnp.float32) -> jax.Array:
  return jax.nn.one_hot(tokens, vocab_size, dtype=dtype)


def interpolate(noise, clean, gamma) -> jax.Array:
  """x_γ = (1 − γ) ε + γ x1, with γ broadcast over every axis after the batch axis."""
  gamma = jnp.reshape(gamma, gamma.shape + (1,) * (clean.ndim - gamma.ndim))
  return (1.0 - gamma) * noise + gamma * clean


def noisy_state(rng, tokens, gamma, vocab_size: int) -> jax.Array:
  """Draws x_γ for clean token ids `tokens` [B, L] at flow times `gamma` [B] (float32 [B, L, V])."""
  noise = jax.random.normal(rng, tokens.shape + (vocab_size,), jnp.float32)
  return interpolate(noise, one_hot(tokens, vocab_size), gamma)


def prior_sample(rng, shape, vocab_size: int) -> jax.Array:
  """The sampler's starting point x_0 = ε ~ N(0, I_V) per position (float32 [*shape, V])."""
  return jax.random.normal(rng, tuple(shape) + (vocab_size,), jnp.float32)
