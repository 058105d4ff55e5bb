"""Exact oracles (SPEC §6): the truth that losses, samplers and bounds are tested against.

Finite-support data: K sequences s_j (each L tokens) with probabilities π_j. Given x_γ, the
posterior over which sequence produced it is w_j ∝ π_j exp(−‖x − γ s_j‖² / (2(1 − γ)²)) (the noise
is N(0, (1 − γ)² I) around γ s_j, jointly over all positions), and the exact denoiser is
E[x1 | x_γ = x] = Σ_j w_j s_j. Its logarithm is a valid "logits" output, so the exact denoiser can be
dropped in wherever the network's `apply_fn` is expected.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class FiniteSupport:
  sequences: np.ndarray  # int [K, L]
  probs: np.ndarray  # float [K], sums to 1
  vocab_size: int

  def one_hot(self, dtype=jnp.float32):
    return jax.nn.one_hot(jnp.asarray(self.sequences), self.vocab_size, dtype=dtype)  # [K, L, V]

  def posterior(self, x, gamma):
    """w [B, K]: posterior over the K support sequences given x_γ [B, L, V] at γ [B]."""
    support = self.one_hot(x.dtype)
    gamma = gamma.astype(x.dtype)[:, None]
    # ‖x − γ s‖² = ‖x‖² − 2γ⟨x, s⟩ + γ²‖s‖²; ‖s‖² = L for every one-hot sequence, so it cancels.
    cross = jnp.einsum("blv,klv->bk", x, support)
    logits = jnp.log(jnp.asarray(self.probs, x.dtype))[None, :] + (gamma * cross) / jnp.square(1.0 - gamma)
    return jax.nn.softmax(logits, axis=-1)

  def denoiser(self, x, gamma):
    """E[x1 | x_γ = x], [B, L, V]."""
    return jnp.einsum("bk,klv->blv", self.posterior(x, gamma), self.one_hot(x.dtype))

  def denoiser_logits(self, x, gamma):
    return jnp.log(jnp.maximum(self.denoiser(x, gamma), jnp.finfo(x.dtype).tiny))

  def nll(self, sequences) -> np.ndarray:
    """−log π of each given sequence (inf outside the support)."""
    seqs = np.asarray(sequences)
    out = np.full(len(seqs), np.inf)
    for j, s in enumerate(self.sequences):
      out[np.all(seqs == s[None], axis=1)] = -np.log(self.probs[j])
    return out


def random_finite_support(seed: int, num_sequences: int, length: int, vocab_size: int,
                          concentration: float = 1.0) -> FiniteSupport:
  """K distinct random sequences with Dirichlet(concentration) probabilities."""
  rng = np.random.default_rng(seed)
  if num_sequences > vocab_size**length:
    raise ValueError("more support sequences requested than there are distinct sequences")
  codes = rng.choice(vocab_size**length, size=num_sequences, replace=False)
  seqs = np.stack([(codes // vocab_size**i) % vocab_size for i in range(length)], axis=1)
  probs = rng.dirichlet(np.full(num_sequences, concentration))
  return FiniteSupport(seqs.astype(np.int32), probs, vocab_size)
