"""Prefix conditioning and classifier-free guidance (SPEC §8): prompts, their masks, guided denoisers.

A prompt is a pair (tokens [B, L] int32, mask [B, L] bool): row b's prompt is tokens[b][mask[b]],
a prefix (mask True on positions 0 .. P_b − 1). Prompt positions hold the clean one-hot (γ = 1),
are never noised and carry no loss; the network is told where they are by `prompt_mask`, which
adds a learned vector to those positions (model.prompt_flag).

The unconditional input (prompt dropped, classifier-free guidance): prompt positions hold the zero
vector and the mask is off. Zero is a value a noisy state x_γ = (1 − γ) ε + γ x1 takes with
probability 0, so the network reads it as "unknown", and those positions still carry no loss: the
unconditional model is the law of the generated positions with the prefix marginalised out. (The
other choice, treating dropped positions as ordinary noisy generated positions, would need a state
for them at sampling time that the guided sampler does not have.)

Samplers keep prompt positions fixed by setting ψ = μ = e_prompt there (its embedding W[x] in
embedding space), so every affine update of the state maps the prompt to itself; this, the clean
input, guidance and self-conditioning are data for `state_space.StateSpace.readout`, the same code
in either space. A model trained without prompts (no flag) is prompted the same way, but its state
at prompt positions is left to the updates, which move it along x_γ = (1 − γ) ε + γ e_prompt:
inpainting. The V-space distillation teachers (guided, fixed-point) use `clamp_logits` /
`clamp_state` below.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cfmjax import corruption, state_space

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


def validate_state_space(config, vocab_size: int):
  """The SPEC §8 features that exist in V-space only must not meet the embedding-space state.

  Prompts (training, prompted, guided and block sampling) and self-conditioning are data for
  `state_space.StateSpace` and work in either space for training and sampling; conditional, guided
  and fixed-point distillation are still written against the V-space teachers (distill.py).
  """
  m = config.model
  if state_space.resolve(m.state_space, vocab_size, m.d_model) != "embedding":
    return
  distilling = config.stage == "distill"
  wanted = [name for name, on in (
      ("conditional distillation (flow.prompt.max_len > 0)", distilling and enabled(config)),
      ("distill.guidance >= 0", distilling and config.distill.guidance >= 0),
      ("distill.loss='fixed_point'", distilling and config.distill.loss == "fixed_point"),
  ) if on]
  if wanted:
    why = (f"'auto' picks embedding since vocab_size={vocab_size} > d_model={m.d_model}"
           if m.state_space == "auto" else "model.state_space='embedding'")
    raise ValueError(f"{', '.join(wanted)} need model.state_space='vocab' for now ({why}); "
                     f"set --config.model.state_space=vocab")


def prefix_mask(lengths, seq_len: int):
  """bool [B, L]: True on positions < lengths[b]."""
  return jnp.arange(seq_len)[None, :] < jnp.asarray(lengths)[:, None]


def draw_prompt_lengths(rng, batch_size: int, min_len: int, max_len: int, drop_prob: float):
  """(lengths [B] int32 ~ U{min_len..max_len}, dropped [B] bool ~ Bernoulli(drop_prob))."""
  rng_len, rng_drop = jax.random.split(rng)
  lengths = jax.random.randint(rng_len, (batch_size,), min_len, max_len + 1)
  dropped = jax.random.uniform(rng_drop, (batch_size,)) < drop_prob
  return lengths, dropped


def conditional_input(x, tokens, mask, vocab_size: int):
  """The conditional state: the clean one-hot on prompt positions, x elsewhere."""
  onehot = corruption.one_hot(tokens, vocab_size, x.dtype)
  return jnp.where(mask[..., None], onehot, x)


def unconditional_input(x, mask):
  """The prompt-dropped state: zeros on prompt positions (read as 'unknown'), x elsewhere."""
  return jnp.where(mask[..., None], jnp.zeros_like(x), x)


def clamp_logits(logits, tokens, mask):
  """Logits whose softmax is exactly the prompt's one-hot at prompt positions."""
  onehot = jax.nn.one_hot(tokens, logits.shape[-1], dtype=logits.dtype)
  return jnp.where(mask[..., None], (onehot - 1.0) * _FAR, logits)


def clamp_state(x, tokens, mask):
  return conditional_input(x, tokens, mask, x.shape[-1])


def guided(mu_uncond, mu_cond, guidance):
  """μ_ω = μ_u + ω (μ_c − μ_u), written (1 − ω) μ_u + ω μ_c so that ω = 0 and ω = 1 are exact."""
  return (1.0 - guidance) * mu_uncond + guidance * mu_cond


def project_to_simplex(p, floor: float = 0.0):
  """max(p, floor) renormalised: the guided μ_ω leaves the simplex for ω > 1, a KL target cannot."""
  p = jnp.maximum(p, floor)
  return p / jnp.sum(p, axis=-1, keepdims=True)


def masked_mean(values, weights):
  """Σ w v / Σ w (0 when every weight is 0)."""
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def network_probs(net, x, tau_s, tau_t, *, prompt=None, guidance=None, self_cond=None):
  """ψ (or μ at τ_s = τ_t) per position from `net(x, tau_s, tau_t, **kw) -> logits`, in x's dtype.

  prompt: None or (tokens, mask): the conditional pass sees the clean prefix and its flag and has
  its logits clamped there. guidance: None (conditional only) or ω: then an unconditional pass
  (prompt positions zeroed, no flag) is combined as μ_u + ω (μ_c − μ_u), two passes of B rows
  (the same shapes as the plain call, so ω = 0 and ω = 1 reproduce the plain samplers bit for
  bit). self_cond: the previous estimate μ̂, fed to every pass.
  """
  kwargs = {} if self_cond is None else {"self_cond": self_cond}
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  probs = lambda logits: jax.nn.softmax(logits.astype(dtype), axis=-1)
  if prompt is None:
    if guidance is not None:
      raise ValueError("guidance needs a prompt (the condition to guide towards)")
    return probs(net(x, tau_s, tau_t, **kwargs))
  tokens, mask = prompt
  cond = net(conditional_input(x, tokens, mask, x.shape[-1]), tau_s, tau_t, prompt_mask=mask, **kwargs)
  mu_cond = probs(clamp_logits(cond, tokens, mask))
  if guidance is None:
    return mu_cond
  uncond = net(unconditional_input(x, mask), tau_s, tau_t, **kwargs)
  return guided(probs(clamp_logits(uncond, tokens, mask)), mu_cond, guidance)
