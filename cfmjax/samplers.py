"""Samplers: pure functions from (denoiser, rng, shape) to token ids.

A `denoise_fn(x, tau) -> logits` is the base network on its diagonal, μθ(x, γ) = softmax(logits)
at γ = g(τ). Grids are uniform in model time τ (SPEC §2). The state is kept in float32 whatever
the network's activation dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cfmjax import corruption, prompting, state_space


def euler_step(x, mu, gamma_now, gamma_next):
  """x' = ((1 − γ')/(1 − γ)) x + ((γ' − γ)/(1 − γ)) μ  (SPEC §2); at γ' = 1 this is exactly μ."""
  keep = (1.0 - gamma_next) / (1.0 - gamma_now)
  return keep * x + (1.0 - keep) * mu


def euler_sample(denoise_fn, rng, num_samples: int, length: int, vocab_size: int, schedule,
                 steps: int, *, space=None, prompt=None, guidance=None, self_condition: bool = False):
  """Many-step Euler sampler of the base flow. Returns (tokens [N, L] int32, last μ [N, L, V]).

  Runs as one `lax.scan` over the grid, so the network is compiled once whatever `steps` is.
  `space` (a `state_space.BoundStateSpace`) replaces `denoise_fn` and the V-space state: the state
  is then whatever it draws (h = xW in embedding space) and the second output is μ in that space (μW).
  Conditioning (SPEC §8): `prompt` = (tokens [N, L], mask [N, L]) keeps the masked positions fixed
  at the prompt's one-hot; `guidance` = ω mixes in the unconditional denoiser (needs a prompt);
  `self_condition` feeds the last estimate μ̂ back (0 at the first step). With any of them on,
  `denoise_fn(x, tau, **kw)` must accept the model's `prompt_mask=` / `self_cond=` keywords. The
  conditioned sampler runs in V-space only (`space` must be None then).
  """
  if steps < 1:
    raise ValueError(f"the Euler sampler needs steps >= 1, got {steps}")
  if prompt is not None or guidance is not None or self_condition:
    if space is not None:
      raise ValueError("prompts, guidance and self-conditioning run in V-space: give denoise_fn, not "
                       "space= (model.state_space='vocab')")
    return _conditioned_euler_sample(denoise_fn, rng, num_samples, length, vocab_size, schedule, steps,
                                     prompt=prompt, guidance=guidance, self_condition=self_condition)
  space = space or state_space.logits_readout(lambda x, tau_s, tau_t: denoise_fn(x, tau_t), vocab_size)
  tau_grid = jnp.linspace(0.0, 1.0, steps + 1, dtype=jnp.float32)
  gamma_grid = schedule.gamma(tau_grid)
  x0 = space.prior(rng, (num_samples, length))

  def step(carry, i):
    x, _, _ = carry
    tau = jnp.full((num_samples,), tau_grid[i])
    mu, tokens = space.readout(x, tau, tau)
    return (euler_step(x, mu.astype(jnp.float32), gamma_grid[i], gamma_grid[i + 1]), mu, tokens), None

  tau_probe = jnp.zeros((num_samples,), jnp.float32)
  mu0, tokens0 = jax.eval_shape(space.readout, x0, tau_probe, tau_probe)
  init = (x0, jnp.zeros(mu0.shape, jnp.float32), jnp.zeros(tokens0.shape, jnp.int32))
  (_, mu_last, tokens), _ = jax.lax.scan(step, init, jnp.arange(steps))
  return tokens, mu_last


def _conditioned_euler_sample(denoise_fn, rng, num_samples, length, vocab_size, schedule, steps, *,
                              prompt, guidance, self_condition):
  """The V-space Euler sampler with a prompt, guidance and/or self-conditioning (SPEC §8)."""
  tau_grid = jnp.linspace(0.0, 1.0, steps + 1, dtype=jnp.float32)
  gamma_grid = schedule.gamma(tau_grid)
  x0 = corruption.prior_sample(rng, (num_samples, length), vocab_size)
  if prompt is not None:
    x0 = prompting.clamp_state(x0, *prompt)
  net = lambda x, tau_s, tau_t, **kw: denoise_fn(x, tau_s, **kw)

  def step(carry, i):
    x, mu_prev = carry
    tau = jnp.full((num_samples,), tau_grid[i])
    mu = prompting.network_probs(net, x, tau, tau, prompt=prompt, guidance=guidance,
                                 self_cond=mu_prev if self_condition else None)
    x_next = euler_step(x, mu, gamma_grid[i], gamma_grid[i + 1])
    if prompt is not None:
      x_next = prompting.clamp_state(x_next, *prompt)
    return (x_next, mu), None

  (_, mu_last), _ = jax.lax.scan(step, (x0, jnp.zeros_like(x0)), jnp.arange(steps))
  return jnp.argmax(mu_last, axis=-1).astype(jnp.int32), mu_last
