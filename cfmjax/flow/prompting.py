"""Prefix conditioning and classifier-free guidance (SPEC §8): prompts, their masks, guided denoisers.

A prompt is a pair (tokens [B, L] int32, mask [B, L] bool): row b's prompt is tokens[b][mask[b]],
a prefix (mask True on positions 0 .. P_b − 1). Prompt positions hold the clean one-hot (γ = 1),
are never noised and carry no loss; the network is told where they are by `prompt_mask`, which
adds a learned vector to those positions (the prompt flag, ModelConfig.prompt_flag: on whenever
flow.prompt.max_len > 0).

The unconditional input (prompt dropped, classifier-free guidance): prompt positions hold the zero
vector and the mask is off. Zero is a value a noisy state x_γ = (1 − γ) ε + γ x1 takes with
probability 0, so the network reads it as "unknown", and those positions still carry no loss: the
unconditional model is the law of the generated positions with the prefix marginalised out. (The
other choice, treating dropped positions as ordinary noisy generated positions, would need a state
for them at sampling time that the guided sampler does not have.)

Samplers keep prompt positions fixed by setting ψ = μ = e_prompt there (its embedding W[x] in
embedding space), so every affine update of the state maps the prompt to itself; this, the clean
input, guidance and self-conditioning are data for `state_space.StateSpace` (`readout` for the
samplers, `probs` for the guided distillation target, `conditional_input` for the losses), the same
code in either space. A model trained without prompts (no flag) is prompted the same way, but its
state at prompt positions is left to the updates, which move it along x_γ = (1 − γ) ε + γ e_prompt:
inpainting. The flow-map teachers' networks clamp their logits with `clamp_logits` below.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


# Logit of the non-prompt entries at a prompt position: exp(−1e9) is exactly 0 in float32, and
# (unlike −inf) 0 · (−1e9) is 0, so KLs and cross-entropies against a clamped row stay finite.
_FAR = 1e9


def enabled(config) -> bool:
  """Whether the run trains with prompts (flow.prompt.max_len > 0)."""
  return config.flow.prompt.max_len > 0


def validate(config, seq_len: int):
  p = config.flow.prompt
  if p.max_len <= 0:
    return
  if not 0 <= p.min_len <= p.max_len < seq_len:
    raise ValueError(f"flow.prompt needs 0 <= min_len <= max_len < data.seq_len={seq_len}, got "
                     f"min_len={p.min_len}, max_len={p.max_len}")
  if not 0.0 <= p.drop_prob <= 1.0:
    raise ValueError(f"flow.prompt.drop_prob must lie in [0, 1], got {p.drop_prob}")


def prefix_mask(lengths, seq_len: int):
  """bool [B, L]: True on positions < lengths[b]."""
  return jnp.arange(seq_len)[None, :] < jnp.asarray(lengths)[:, None]


def draw_prompt_lengths(rng, batch_size: int, min_len: int, max_len: int, drop_prob: float):
  """(lengths [B] int32 ~ U{min_len..max_len}, dropped [B] bool ~ Bernoulli(drop_prob))."""
  rng_len, rng_drop = jax.random.split(rng)
  lengths = jax.random.randint(rng_len, (batch_size,), min_len, max_len + 1)
  dropped = jax.random.uniform(rng_drop, (batch_size,)) < drop_prob
  return lengths, dropped


def unconditional_input(x, mask):
  """The prompt-dropped state: zeros on prompt positions (read as 'unknown'), x elsewhere."""
  return jnp.where(mask[..., None], jnp.zeros_like(x), x)


def clamp_logits(logits, tokens, mask):
  """Logits whose softmax is exactly the prompt's one-hot at prompt positions."""
  onehot = jax.nn.one_hot(tokens, logits.shape[-1], dtype=logits.dtype)
  return jnp.where(mask[..., None], (onehot - 1.0) * _FAR, logits)


def project_to_simplex(p, floor: float = 0.0):
  """max(p, floor) renormalised: the guided μ_ω leaves the simplex for ω > 1, a KL target cannot."""
  p = jnp.maximum(p, floor)
  return p / jnp.sum(p, axis=-1, keepdims=True)


def masked_mean(values, weights):
  """Σ w v / Σ w (0 when every weight is 0)."""
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)
