"""Flow maps in mean-denoiser form (SPEC §3): the update X_{s,t} and the k-step sampler.

A flow map network ψθ(x, s, t) = softmax(fθ(x, τ_s, τ_t)) is a distribution per position, and the
map itself is the affine combination

  X_{s,t}(x) = ((1 − t)/(1 − s)) x + ((t − s)/(1 − s)) ψθ(x, s, t),

so it stays on the simplex whenever x does, is the identity at s = t and lands on ψ at t = 1. All
flow algebra is in flow time γ; the network is conditioned on model time τ with γ = g(τ).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cfmjax import state_space



def broadcast_time(gamma, like):
  """Reshapes per-example times [B] so they broadcast over every axis of `like` after the batch."""
  gamma = jnp.asarray(gamma)
  return jnp.reshape(gamma, gamma.shape + (1,) * (like.ndim - gamma.ndim))


def safe_divide(num, den):
  """num / den, dividing by 1 instead where den == 0 (so 0/0 reads as 0).

  Only ever hit at a degenerate time pair (s = t = 1, or s = t in a ratio that the pair makes
  irrelevant). It keeps such rows finite, which matters even when a loss masks them out: a NaN in
  a masked branch still turns the gradient into NaN (0 · NaN).
  """
  return num / jnp.where(den == 0, jnp.ones_like(den), den)


def flow_map_update(x, psi, gamma_s, gamma_t):
  """X_{s,t}(x) = ((1 − t)/(1 − s)) x + ((t − s)/(1 − s)) ψ, with γ_s, γ_t [B] broadcast over [B, ...].

  The weight on x is written as 1 − (weight on ψ), so s = t gives exactly x and t = 1 gives
  exactly ψ, with no 0/0 at s = t = 1.
  """
  dtype = jnp.result_type(x, psi)
  s = broadcast_time(gamma_s, x).astype(dtype)
  t = broadcast_time(gamma_t, x).astype(dtype)
  jump = safe_divide(t - s, 1.0 - s)
  return (1.0 - jump) * x + jump * psi


def flowmap_sample(flowmap_fn, rng, num_samples: int, length: int, vocab_size: int, schedule,
                   steps: int, *, space=None):
  """k-step flow-map sampler (SPEC §3). Returns (tokens [N, L] int32, last ψ [N, L, V]).

  `flowmap_fn(x, tau_s, tau_t) -> logits` takes model times; the grid is uniform in τ and the
  updates use γ = g(τ). The state is float32, or float64 when the network answers in float64
  (exact oracles in tests), so that a bfloat16 network never degrades the state. Runs as one
  `lax.scan`, so the network is compiled once whatever `steps` is. `space` (a
  `state_space.BoundStateSpace`) replaces `flowmap_fn` and the V-space state, as in
  `samplers.euler_sample`: the state is then h = xW and the second output ψW.
  """
  if steps < 1:
    raise ValueError(f"the flow-map sampler needs steps >= 1, got {steps}")
  space = space or state_space.logits_readout(flowmap_fn, vocab_size)
  x0 = space.prior(rng, (num_samples, length))
  tau_probe = jnp.zeros((num_samples,), jnp.float32)
  out, tokens0 = jax.eval_shape(space.readout, x0, tau_probe, tau_probe)
  dtype = jnp.promote_types(out.dtype, jnp.float32)
  x0 = x0.astype(dtype)
  tau_grid = jnp.linspace(0.0, 1.0, steps + 1, dtype=jnp.float32)
  gamma_grid = jnp.asarray(schedule.gamma(tau_grid)).astype(dtype)

  def step(carry, i):
    x, _, _ = carry
    tau_s = jnp.full((num_samples,), tau_grid[i])
    tau_t = jnp.full((num_samples,), tau_grid[i + 1])
    psi, tokens = space.readout(x, tau_s, tau_t)
    gamma_s = jnp.full((num_samples,), gamma_grid[i])
    gamma_t = jnp.full((num_samples,), gamma_grid[i + 1])
    return (flow_map_update(x, psi.astype(dtype), gamma_s, gamma_t), psi.astype(dtype), tokens), None

  init = (x0, jnp.zeros(out.shape, dtype), jnp.zeros(tokens0.shape, jnp.int32))
  (_, psi_last, tokens), _ = jax.lax.scan(step, init, jnp.arange(steps))
  return tokens, psi_last
