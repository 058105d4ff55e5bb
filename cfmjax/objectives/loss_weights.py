"""Learnable loss weights w(s) or w(s, t) for the consistency loss (uncertainty weighting).

Each row's loss L is replaced by exp(−w) · L + w, with w a small MLP of the row's times. For fixed
L the minimum is at w = log L, so the network learns, per time pair, how hard that pair is and
rescales it to contribute evenly: consistency errors differ by orders of magnitude between short
and long jumps, and a fixed weighting lets one end dominate the gradient.
The weight network's parameters live beside the model's, under params["loss_weight"].
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from cfmjax.models.model import sinusoidal_features

INPUTS = ("none", "s", "st")
PARAMS_KEY = "loss_weight"


class LossWeightNet(nn.Module):
  inputs: str  # "s" or "st"
  features: int = 64

  @nn.compact
  def __call__(self, tau_s, tau_t):
    feats = sinusoidal_features(tau_s, self.features)
    if self.inputs == "st":
      feats = jnp.concatenate([feats, sinusoidal_features(tau_t, self.features)], axis=-1)
    h = nn.silu(nn.Dense(self.features)(feats))
    # Zero-initialised output: training starts from the unweighted loss (w = 0).
    return nn.Dense(1, kernel_init=nn.initializers.zeros_init())(h)[:, 0]


def weighted(row_losses, log_weight):
  """exp(−w) · L + w per row."""
  return jnp.exp(-log_weight) * row_losses + log_weight


def attach(init_fn, apply_fn, inputs: str):
  """Wraps a model's (init_fn, apply_fn) so that its params also hold the weight network's."""
  if inputs == "none":
    return init_fn, apply_fn
  if inputs not in INPUTS:
    raise ValueError(f"unknown distill.learned_weighting={inputs!r}; choose one of {INPUTS}")
  net = LossWeightNet(inputs)

  def init_with_weights(rng, batch_size, length):
    params = dict(init_fn(rng, batch_size, length))
    tau = jnp.zeros((batch_size,), jnp.float32)
    params[PARAMS_KEY] = net.init(rng, tau, tau)["params"]
    return params

  def apply_model(params, *args, **kwargs):
    return apply_fn({k: v for k, v in params.items() if k != PARAMS_KEY}, *args, **kwargs)

  return init_with_weights, apply_model


def log_weight(params, tau_s, tau_t, inputs: str):
  return LossWeightNet(inputs).apply({"params": params[PARAMS_KEY]}, tau_s, tau_t)
