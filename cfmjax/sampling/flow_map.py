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

from cfmjax.models import state_space
from cfmjax.sampling import samplers


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


def renoise_target(gamma_t, renoise):
  """The time t* ≥ t the renoising sampler jumps to before adding noise back down to t.

  CTM's γ-sampling, in this interpolant's noise-to-signal ratio ρ(t) = (1 − t)/t:
  ρ(t*) = sqrt(1 − η²) ρ(t), i.e. t* = t / (1 − (1 − sqrt(1 − η²))(1 − t)). η = 0 gives t* = t
  exactly (the deterministic sampler), η = 1 gives t* = 1 (jump to the data estimate, then fully
  renoise).
  """
  return gamma_t / (1.0 - (1.0 - jnp.sqrt(1.0 - renoise ** 2)) * (1.0 - gamma_t))


def renoise_to(rng, x_star, gamma_star, gamma_t, noise=None):
  """From x at time t* down to t ≤ t*: (t/t*) x + σ ξ, σ² = (1 − t)² − (t (1 − t*)/t*)².

  If x_{t*} = (1 − t*) ε + t* x1 then the result is (1 − t) ε' + t x1 in law, with fresh noise.
  `noise`: ξ itself (e.g. εW in embedding space); None draws ξ ~ N(0, I) like x_star.
  """
  ratio = safe_divide(gamma_t, gamma_star)
  sigma = jnp.sqrt(jnp.maximum((1.0 - gamma_t) ** 2 - (ratio * (1.0 - gamma_star)) ** 2, 0.0))
  if noise is None:
    noise = jax.random.normal(rng, x_star.shape, x_star.dtype)
  return ratio * x_star + sigma * noise


def flowmap_sample(network, rng, shape, schedule, steps: int, *,
                   conditioning: samplers.Conditioning = samplers.Conditioning(), renoise: float = 0.0,
                   precision: str = "float32"):
  """k-step flow-map sampler (SPEC §3). Returns (tokens [N, L] int32, last ψ [N, L, V]).

  `network`: a `state_space.BoundStateSpace` (the state is then h = xW in embedding space and the
  second output ψW, as in `samplers.euler_sample`), or a plain `flowmap_fn(x, tau_s, tau_t) -> logits`
  on the V-space state; `shape` = (N, L, V). The grid is uniform in τ and the updates use γ = g(τ).
  The state is float32, or float64 when the network answers in float64 (exact oracles in tests), so
  that a bfloat16 network never degrades the state. Runs as one `lax.scan`, so the network is
  compiled once whatever `steps` is.

  `conditioning.prompt` = (tokens, mask) keeps those positions fixed, in either space
  (`StateSpace.readout`; a plain `flowmap_fn` must then accept the model's `prompt_mask=`); guidance
  and self-conditioning are not the flow map's (a map distilled with distill.guidance has its ω built
  in). `renoise` = η ∈ [0, 1] is
  CTM-style stochastic sampling: each step jumps past its end time t to t* (`renoise_target`) and
  adds fresh noise back down to t (drawn by `space.prior` when given: εW in embedding space); η = 0
  is the deterministic sampler, and the last step (t = 1) is always deterministic.

  `precision` = "float64" keeps the state, the γ grid and the updates in float64 while the network
  runs in its own dtype on the state rounded to float32 (traced under x64: `samplers.x64_scope`).
  """
  num_samples, length, vocab_size = shape
  prompt = conditioning.prompt
  if conditioning.guidance is not None or conditioning.self_condition:
    raise ValueError("the flow-map sampler takes a prompt only: guidance is built into a map distilled with "
                     "distill.guidance, and self-conditioning is the base flow's")
  wide = samplers.state_dtype(precision) == jnp.float64
  net_scope = lambda: samplers.network_scope(precision)
  if steps < 1:
    raise ValueError(f"the flow-map sampler needs steps >= 1, got {steps}")
  if not 0.0 <= renoise <= 1.0:
    raise ValueError(f"renoise must lie in [0, 1] (0 = deterministic), got {renoise}")
  # A plain function's renoising draws renoise_to's own N(0, I) in the state's dtype.
  draw_noise = network.prior if isinstance(network, state_space.BoundStateSpace) else None
  space = samplers.as_space(network, vocab_size, sees_both_times=True)
  with net_scope():
    x0 = space.prior(rng, (num_samples, length))  # the same draw as without renoising, at any precision
  net_dtype = x0.dtype
  rng_renoise = jax.random.fold_in(rng, 0x5EED)

  def net_readout(x, tau_s, tau_t):
    psi, tokens, _ = space.readout(x, tau_s, tau_t, prompt=prompt)
    return psi, tokens

  def readout(x, tau_s, tau_t):
    if not wide:
      return net_readout(x, tau_s, tau_t)
    with net_scope():
      return net_readout(x.astype(net_dtype), tau_s, tau_t)

  tau_probe = jnp.zeros((num_samples,), jnp.float32)
  out, tokens0 = jax.eval_shape(readout, x0, tau_probe, tau_probe)
  dtype = jnp.promote_types(out.dtype, jnp.float64 if wide else jnp.float32)
  x0 = x0.astype(dtype)
  x0 = space.clamp(x0, prompt)
  tau_grid = jnp.linspace(0.0, 1.0, steps + 1, dtype=jnp.float32)
  gamma_grid = jnp.asarray(schedule.gamma(tau_grid.astype(dtype) if wide else tau_grid)).astype(dtype)

  def step(carry, i):
    x, _, _ = carry
    gamma_t = gamma_grid[i + 1]
    gamma_star = renoise_target(gamma_t, renoise).astype(dtype)
    tau_s = jnp.full((num_samples,), tau_grid[i])
    # The grid's own τ when there is no overshoot (no round trip through the schedule's inverse).
    tau_star = jnp.where(gamma_star == gamma_t, tau_grid[i + 1], schedule.tau(gamma_star).astype(jnp.float32))
    tau_t = jnp.full((num_samples,), tau_star)
    psi, tokens = readout(x, tau_s, tau_t)
    psi = psi.astype(dtype)
    gamma_s = jnp.full((num_samples,), gamma_grid[i])
    x_star = flow_map_update(x, psi, gamma_s, jnp.full((num_samples,), gamma_star))
    if renoise == 0.0:  # t* = t: renoise_to would add 0 · noise
      x_next = x_star
    else:
      rng_step = jax.random.fold_in(rng_renoise, i)
      if wide:  # the float32 draw of the narrow sampler, widened
        with net_scope():
          noise = (draw_noise or (lambda r, shape: jax.random.normal(r, shape + (vocab_size,), jnp.float32)))(
              rng_step, (num_samples, length))
        noise = noise.astype(dtype)
      else:
        noise = None if draw_noise is None else draw_noise(rng_step, (num_samples, length)).astype(dtype)
      x_next = renoise_to(rng_step, x_star, gamma_star, gamma_t, noise=noise)
    x_next = space.clamp(x_next, prompt)
    return (x_next, psi, tokens), None

  init = (x0, jnp.zeros(out.shape, dtype), jnp.zeros(tokens0.shape, jnp.int32))
  (_, psi_last, tokens), _ = jax.lax.scan(step, init, jnp.arange(steps))
  return tokens, psi_last
