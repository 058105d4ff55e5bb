"""Training objectives as pure functions of (params, batch, rng).

Base flow (SPEC §2, variational flow matching): cross-entropy of the denoiser μθ(x_γ, γ) against
the clean tokens, at τ stratified-uniform over the batch and γ = g(τ), with an optional detached
weight w = stopgrad((‖μ − x1‖² + c)^(−r)) (`AdaptiveWeight`).

Conditioning (SPEC §8, see prompting.py): with `prompt` = (min_len, max_len, drop_prob) each row
gets a clean prefix of random length (never noised, no loss), dropped with probability drop_prob.
With `self_condition`, half the rows (chosen per row) first run a no-grad pass with μ̂ = 0 and are
then trained with μ̂ = stop_gradient(μ of that pass); the other half train with μ̂ = 0.

Position noise (flow.position_noise): a share of the rows is noised with one τ per position
(`corruption.position_times`); the network gets them as `position_tau`, which its skip term and
posterior input read, and is conditioned on their mean.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cfmjax.flow import corruption, prompting
from cfmjax.models import state_space


def cross_entropy(logits, tokens):
  """−log softmax(logits)[token] per position, float32 [B, L]."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
  return log_z - target


def brier_score(probs, tokens):
  """‖p − e_x1‖² = (Σ_{v≠x1} p_v)² + Σ_{v≠x1} p_v² per position: a sum of nonnegative terms, so
  float32 rounding cannot turn it negative when p is nearly e_x1 (the bound multiplies it by e^λ)."""
  off = jnp.arange(probs.shape[-1]) != tokens[..., None]
  p_off = jnp.where(off, probs, 0.0)
  return jnp.square(jnp.sum(p_off, axis=-1)) + jnp.sum(jnp.square(p_off), axis=-1)


@dataclasses.dataclass(frozen=True)
class AdaptiveWeight:
  """The detached per-position weight of SPEC §2, w = stopgrad((d + offset)^(−power)), for the
  squared distance d of the prediction to its target (‖μ − x1‖², or to a teacher's ψ)."""

  power: float = 0.5
  offset: float = 0.01

  def __call__(self, squared_distance):
    return jax.lax.stop_gradient((squared_distance + self.offset) ** (-self.power))


def adaptive_weight(flow_config) -> AdaptiveWeight | None:
  """The `flow` section's weight (flow.adaptive_weighting, weight_power, weight_offset), or None."""
  if not flow_config.adaptive_weighting:
    return None
  return AdaptiveWeight(flow_config.weight_power, flow_config.weight_offset)


class FlowOptions(NamedTuple):
  """What the base-flow loss adds to plain cross-entropy (module docstring; the config's flow section
  and model.self_condition, `flow_options`)."""
  weighting: AdaptiveWeight | None = None
  prompt: tuple | None = None  # (min_len, max_len, drop_prob) of the clean prefixes
  self_condition: bool = False
  position_noise: float = 0.0  # share of rows noised per position


def prompt_settings(config) -> tuple | None:
  """(min_len, max_len, drop_prob) of flow.prompt, or None for an unconditional model."""
  p = config.flow.prompt
  return (p.min_len, p.max_len, p.drop_prob) if prompting.enabled(config) else None


def flow_options(config) -> FlowOptions:
  return FlowOptions(adaptive_weight(config.flow), prompt_settings(config), bool(config.model.self_condition),
                     float(config.flow.position_noise))


def flow_matching_loss(params, tokens, rng, *, space: state_space.StateSpace, schedule,
                       options: FlowOptions = FlowOptions()):
  """The base-flow loss on one batch of clean token ids [B, L]. Returns (loss, metrics).

  `space` says where the state lives and whether the output is reduced in vocabulary chunks
  (`state_space.StateSpace(apply_fn, V)` is the V-space reference with full logits). The prompt and
  self-conditioning of `options` (module docstring) are data for the network call, the same in either
  space: the clean prefix is the state of clean tokens there (one-hot, or the row W[x] in embedding
  space) and μ̂ is fed as the state space gives it (μ̂, or μ̂W_sc).
  """
  weighting, prompt, self_condition, position_noise = options
  rng_time, rng_noise = jax.random.split(rng)
  rng_prompt, rng_self = jax.random.split(jax.random.fold_in(rng, 1))
  tau = corruption.stratified_uniform(rng_time, tokens.shape[0])
  conditioning, loss_mask = {}, None
  if position_noise > 0:  # a share of rows gets one noise level per position (module docstring)
    tau, conditioning["position_tau"] = corruption.position_times(
        jax.random.fold_in(rng_time, 1), tau, tokens.shape[1], position_noise)
    gamma = schedule.gamma(conditioning["position_tau"])
  else:
    gamma = schedule.gamma(tau)
  x = space.noisy_state(params, rng_noise, tokens, gamma)
  if prompt is not None:  # kept rows see their clean prefix and the flag, dropped rows zeros there
    lengths, dropped = prompting.draw_prompt_lengths(rng_prompt, tokens.shape[0], *prompt)
    mask = prompting.prefix_mask(lengths, tokens.shape[1])
    kept = mask & ~dropped[:, None]
    x = prompting.unconditional_input(x, mask)
    x = jnp.where(kept[..., None], space.clean_state(params, tokens).astype(x.dtype), x)
    conditioning["prompt_mask"] = kept
    loss_mask = (~mask).astype(jnp.float32)  # no loss on prompt positions, kept or dropped
  if self_condition:
    first = space.self_cond_feed(params, x, tau, tau, **conditioning)
    use = jax.random.bernoulli(rng_self, 0.5, (tokens.shape[0], 1, 1))
    conditioning["self_cond"] = jax.lax.stop_gradient(jnp.where(use, first, 0.0))
  # the diagonal s = t of the flow map network
  stats = space.output_stats(params, x, tau, tau, tokens=tokens, **conditioning)
  ce = state_space.cross_entropy(stats)
  if weighting is not None:  # w = stopgrad((‖μ − x1‖² + c)^(−r))
    weight = weighting(state_space.brier_score(stats))
  else:
    weight = jnp.ones_like(ce)
  correct = (stats["argmax"] == tokens).astype(jnp.float32)
  if loss_mask is None:
    loss, mean_ce, accuracy = jnp.mean(weight * ce), jnp.mean(ce), jnp.mean(correct)
  else:  # mean over generated positions only (rows' prompt lengths differ)
    loss, mean_ce, accuracy = (prompting.masked_mean(v, loss_mask) for v in (weight * ce, ce, correct))
  return loss, {"loss": loss, "cross_entropy": mean_ce, "accuracy": accuracy}
