"""Samplers: pure functions from (denoiser, rng, shape) to token ids.

A `denoise_fn(x, tau) -> logits` is the base network on its diagonal, μθ(x, γ) = softmax(logits)
at γ = g(τ). Grids are uniform in model time τ (SPEC §2). The state is kept in float32 whatever
the network's activation dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cfmjax import corruption


def euler_step(x, mu, gamma_now, gamma_next):
  """x' = ((1 − γ')/(1 − γ)) x + ((γ' − γ)/(1 − γ)) μ  (SPEC §2); at γ' = 1 this is exactly μ."""
  keep = (1.0 - gamma_next) / (1.0 - gamma_now)
  return keep * x + (1.0 - keep) * mu


def euler_sample(denoise_fn, rng, num_samples: int, length: int, vocab_size: int, schedule,
                 steps: int):
  """Many-step Euler sampler of the base flow. Returns (tokens [N, L] int32, last μ [N, L, V]).

  Runs as one `lax.scan` over the grid, so the network is compiled once whatever `steps` is.
  """
  if steps < 1:
    raise ValueError(f"the Euler sampler needs steps >= 1, got {steps}")
  tau_grid = jnp.linspace(0.0, 1.0, steps + 1, dtype=jnp.float32)
  gamma_grid = schedule.gamma(tau_grid)
  x0 = corruption.prior_sample(rng, (num_samples, length), vocab_size)

  def step(carry, i):
    x, _ = carry
    tau = jnp.full((num_samples,), tau_grid[i])
    mu = jax.nn.softmax(denoise_fn(x, tau).astype(jnp.float32), axis=-1)
    return (euler_step(x, mu, gamma_grid[i], gamma_grid[i + 1]), mu), None

  (_, mu_last), _ = jax.lax.scan(step, (x0, jnp.zeros_like(x0)), jnp.arange(steps))
  return jnp.argmax(mu_last, axis=-1).astype(jnp.int32), mu_last
