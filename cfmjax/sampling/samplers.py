"""Samplers: pure functions from (denoiser, rng, shape) to token ids.

A `denoise_fn(x, tau) -> logits` is the base network on its diagonal, μθ(x, γ) = softmax(logits)
at γ = g(τ). Grids are uniform in model time τ (SPEC §2). The state is kept in float32 whatever
the network's activation dtype, or in float64 with precision="float64" (`sample.precision`).

Float64 sampler state. The state x (or h), the γ grid and the affine updates are float64; the
network is still called in its own dtype, on the state rounded to float32, inside
`jax.enable_x64(False)` (so nothing in it is promoted), and its output is cast back. JAX fixes
dtypes at trace time, so the whole sampler must be traced and run under `jax.enable_x64(True)`:
`inference.generate` scopes that around its jitted call (`x64_scope`), and x64 is off again after it.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cfmjax.models import state_space


PRECISIONS = ("float32", "float64")


class Conditioning(NamedTuple):
  """What a sampler's denoiser is conditioned on (SPEC §8), the same in either state space:
  `prompt` = (tokens [N, L], mask [N, L]) fixes the masked positions; `guidance` = ω mixes in the
  unconditional denoiser (needs a prompt); `self_condition` feeds the last estimate μ̂ back (0 at
  the first step)."""
  prompt: tuple | None = None
  guidance: float | None = None
  self_condition: bool = False


def as_space(network, vocab_size: int, sees_both_times: bool):
  """A sampler's network as a `state_space.BoundStateSpace`: itself, or the V-space readout of a plain
  function of the state (`logits_fn(x, tau_s, tau_t, **kw)`, or `denoise_fn(x, tau, **kw)` when not
  `sees_both_times`)."""
  if isinstance(network, state_space.BoundStateSpace):
    return network
  fn = network if sees_both_times else (lambda x, tau_s, tau_t, **kw: network(x, tau_t, **kw))
  return state_space.logits_readout(fn, vocab_size)


def state_dtype(precision: str):
  """The sampler state's dtype; float64 needs x64 on at trace time (`x64_scope`)."""
  if precision not in PRECISIONS:
    raise ValueError(f"unknown sampler precision {precision!r}; choose one of {PRECISIONS}")
  if precision == "float64":
    if not jax.config.jax_enable_x64:
      raise ValueError("a float64 sampler state needs the sampler traced and run under jax.enable_x64(True) "
                       "(samplers.x64_scope; inference.generate does this)")
    return jnp.float64
  return jnp.float32


def x64_scope(precision: str):
  """The context a sampler of this precision is traced and run in (x64 on for float64 only)."""
  return jax.enable_x64(True) if precision == "float64" else contextlib.nullcontext()


def network_scope(precision: str):
  """The context network calls run in: x64 off under a float64 sampler (the network keeps its dtype)."""
  return jax.enable_x64(False) if precision == "float64" else contextlib.nullcontext()


def euler_step(x, mu, gamma_now, gamma_next):
  """x' = ((1 − γ')/(1 − γ)) x + ((γ' − γ)/(1 − γ)) μ  (SPEC §2); at γ' = 1 this is exactly μ."""
  keep = (1.0 - gamma_next) / (1.0 - gamma_now)
  return keep * x + (1.0 - keep) * mu


def euler_sample(network, rng, shape, schedule, steps: int, *, conditioning: Conditioning = Conditioning(),
                 precision: str = "float32"):
  """Many-step Euler sampler of the base flow. Returns (tokens [N, L] int32, last μ [N, L, V]).

  `network`: a `state_space.BoundStateSpace` (the state is then whatever it draws, h = xW in
  embedding space, and the second output is μ in that space, μW), or a plain `denoise_fn(x, tau,
  **kw) -> logits` on the V-space state. `shape` = (N, L, V). Runs as one `lax.scan` over the grid, so
  the network is compiled once whatever `steps` is. `conditioning` is data for the state space's
  readout, the same in either space (a plain `denoise_fn` must then accept the model's
  `prompt_mask=` / `self_cond=` keywords). `precision`: the state's dtype, "float32" or "float64"
  (module docstring).
  """
  num_samples, length, vocab_size = shape
  prompt, guidance, self_condition = conditioning
  dtype = state_dtype(precision)
  if steps < 1:
    raise ValueError(f"the Euler sampler needs steps >= 1, got {steps}")
  space = as_space(network, vocab_size, sees_both_times=False)
  tau_grid = jnp.linspace(0.0, 1.0, steps + 1, dtype=jnp.float32)
  gamma_grid = schedule.gamma(tau_grid.astype(dtype))
  with network_scope(precision):
    x0 = space.prior(rng, (num_samples, length))  # the same draw whatever the precision
  net_dtype = x0.dtype

  def readout(x, tau, fed):
    if precision == "float32":
      return space.readout(x, tau, tau, prompt=prompt, guidance=guidance, self_cond=fed)
    with network_scope(precision):
      return space.readout(x.astype(net_dtype), tau, tau, prompt=prompt, guidance=guidance, self_cond=fed)

  def step(carry, i):
    x, _, _, fed = carry
    tau = jnp.full((num_samples,), tau_grid[i])
    mu, tokens, fed = readout(x, tau, fed)
    x_next = space.clamp(euler_step(x, mu.astype(dtype), gamma_grid[i], gamma_grid[i + 1]), prompt)
    return (x_next, mu, tokens, fed), None

  fed0 = jnp.zeros(x0.shape, net_dtype) if self_condition else None  # μ̂ = 0 (or 0·W_sc) first
  tau_probe = jnp.zeros((num_samples,), jnp.float32)
  mu0, tokens0, _ = jax.eval_shape(readout, x0, tau_probe, fed0)
  x0 = x0.astype(dtype) if precision == "float64" else x0
  init = (space.clamp(x0, prompt), jnp.zeros(mu0.shape, mu0.dtype), jnp.zeros(tokens0.shape, jnp.int32), fed0)
  (_, mu_last, tokens, _), _ = jax.lax.scan(step, init, jnp.arange(steps))
  return tokens, mu_last
