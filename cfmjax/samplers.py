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

import jax
import jax.numpy as jnp

from cfmjax import corruption, prompting, state_space


PRECISIONS = ("float32", "float64")


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


def euler_sample(denoise_fn, rng, num_samples: int, length: int, vocab_size: int, schedule,
                 steps: int, *, space=None, prompt=None, guidance=None, self_condition: bool = False,
                 precision: str = "float32"):
  """Many-step Euler sampler of the base flow. Returns (tokens [N, L] int32, last μ [N, L, V]).

  Runs as one `lax.scan` over the grid, so the network is compiled once whatever `steps` is.
  `space` (a `state_space.BoundStateSpace`) replaces `denoise_fn` and the V-space state: the state
  is then whatever it draws (h = xW in embedding space) and the second output is μ in that space (μW).
  Conditioning (SPEC §8): `prompt` = (tokens [N, L], mask [N, L]) keeps the masked positions fixed
  at the prompt's one-hot; `guidance` = ω mixes in the unconditional denoiser (needs a prompt);
  `self_condition` feeds the last estimate μ̂ back (0 at the first step). With any of them on,
  `denoise_fn(x, tau, **kw)` must accept the model's `prompt_mask=` / `self_cond=` keywords. The
  conditioned sampler runs in V-space only (`space` must be None then). `precision`: the state's
  dtype, "float32" or "float64" (see the module docstring).
  """
  dtype = state_dtype(precision)
  if steps < 1:
    raise ValueError(f"the Euler sampler needs steps >= 1, got {steps}")
  if prompt is not None or guidance is not None or self_condition:
    if space is not None:
      raise ValueError("prompts, guidance and self-conditioning run in V-space: give denoise_fn, not "
                       "space= (model.state_space='vocab')")
    return _conditioned_euler_sample(denoise_fn, rng, num_samples, length, vocab_size, schedule, steps,
                                     prompt=prompt, guidance=guidance, self_condition=self_condition,
                                     precision=precision)
  space = space or state_space.logits_readout(lambda x, tau_s, tau_t: denoise_fn(x, tau_t), vocab_size)
  tau_grid = jnp.linspace(0.0, 1.0, steps + 1, dtype=jnp.float32)
  gamma_grid = schedule.gamma(tau_grid.astype(dtype))
  with network_scope(precision):
    x0 = space.prior(rng, (num_samples, length))  # the same draw whatever the precision
  net_dtype = x0.dtype

  def readout(x, tau):
    if precision == "float32":
      return space.readout(x, tau, tau)
    with network_scope(precision):
      return space.readout(x.astype(net_dtype), tau, tau)

  def step(carry, i):
    x, _, _ = carry
    tau = jnp.full((num_samples,), tau_grid[i])
    mu, tokens = readout(x, tau)
    return (euler_step(x, mu.astype(dtype), gamma_grid[i], gamma_grid[i + 1]), mu, tokens), None

  tau_probe = jnp.zeros((num_samples,), jnp.float32)
  mu0, tokens0 = jax.eval_shape(readout, x0, tau_probe)
  x0 = x0.astype(dtype) if precision == "float64" else x0
  init = (x0, jnp.zeros(mu0.shape, jnp.float32), jnp.zeros(tokens0.shape, jnp.int32))
  (_, mu_last, tokens), _ = jax.lax.scan(step, init, jnp.arange(steps))
  return tokens, mu_last


def _conditioned_euler_sample(denoise_fn, rng, num_samples, length, vocab_size, schedule, steps, *,
                              prompt, guidance, self_condition, precision="float32"):
  """The V-space Euler sampler with a prompt, guidance and/or self-conditioning (SPEC §8)."""
  dtype = state_dtype(precision)
  tau_grid = jnp.linspace(0.0, 1.0, steps + 1, dtype=jnp.float32)
  gamma_grid = schedule.gamma(tau_grid.astype(dtype))
  with network_scope(precision):
    x0 = corruption.prior_sample(rng, (num_samples, length), vocab_size)
  x0 = x0.astype(dtype) if precision == "float64" else x0
  if prompt is not None:
    x0 = prompting.clamp_state(x0, *prompt)
  net = lambda x, tau_s, tau_t, **kw: denoise_fn(x, tau_s, **kw)

  def step(carry, i):
    x, mu_prev = carry
    tau = jnp.full((num_samples,), tau_grid[i])
    if precision == "float32":
      mu = prompting.network_probs(net, x, tau, tau, prompt=prompt, guidance=guidance,
                                   self_cond=mu_prev if self_condition else None)
    else:
      with network_scope(precision):
        mu = prompting.network_probs(net, x.astype(jnp.float32), tau, tau, prompt=prompt, guidance=guidance,
                                     self_cond=mu_prev.astype(jnp.float32) if self_condition else None)
      mu = mu.astype(dtype)
    x_next = euler_step(x, mu, gamma_grid[i], gamma_grid[i + 1])
    if prompt is not None:
      x_next = prompting.clamp_state(x_next, *prompt)
    return (x_next, mu), None

  (_, mu_last), _ = jax.lax.scan(step, (x0, jnp.zeros_like(x0)), jnp.arange(steps))
  return jnp.argmax(mu_last, axis=-1).astype(jnp.int32), mu_last
