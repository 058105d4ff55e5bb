"""Exact oracles (SPEC §6): the truth that losses, samplers and bounds are tested against.

Finite-support data: K sequences s_j (each L tokens) with probabilities π_j. Given x_γ, the
posterior over which sequence produced it is w_j ∝ π_j exp(−‖x − γ s_j‖² / (2(1 − γ)²)) (the noise
is N(0, (1 − γ)² I) around γ s_j, jointly over all positions), and the exact denoiser is
E[x1 | x_γ = x] = Σ_j w_j s_j. Its logarithm is a valid "logits" output, so the exact denoiser can be
dropped in wherever the network's `apply_fn` is expected.
"""

from __future__ import annotations

import dataclasses
import functools

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


# ----------------------------------------------------------------------------------------------
# Markov sources (SPEC §9): exact and context-free posteriors of x1 given x_γ.


def emission_logits(x, gamma):
  """γ x/(1 − γ)² per position and token: log p(x | token) up to a per-position constant (SPEC §9)."""
  gamma = jnp.reshape(gamma, gamma.shape + (1,) * (x.ndim - gamma.ndim))
  return gamma * x / jnp.square(1.0 - gamma)


@dataclasses.dataclass(frozen=True)
class MarkovPosterior:
  """E[x1 | x_γ] for an order-k Markov chain by forward-backward (SPEC §9), in float64.

  The noisy sequence is a hidden Markov model whose hidden state at position l ≥ k − 1 is the
  k-tuple of the last tokens (a context index c, most recent token least significant, as in
  `data.markov`); the token entering the tuple emits exp(γ x_{l,v}/(1 − γ)²). The first tuple is
  drawn from the chain's stationary law over contexts and carries the emissions of its k tokens.

  Cost per call: O(B · L · V^(k+1)) as batched [B, V] × [V, V] matmuls, one per context suffix.
  `denoiser`/`denoiser_logits` take and return jax arrays ([B, L, V], γ [B]) and can stand in for
  the network wherever a logits function of (x, γ) is expected.
  """

  transition: np.ndarray  # float64 [V**k, V]
  initial: np.ndarray  # float64 [V**k], stationary law of the contexts
  vocab_size: int
  order: int

  @classmethod
  def from_source(cls, markov) -> "MarkovPosterior":
    return cls(np.asarray(markov.transition, np.float64), np.asarray(markov.initial, np.float64),
               markov.vocab_size, markov.order)

  def unigram(self) -> np.ndarray:
    """The stationary marginal π of one token, float64 [V] (every position has this law)."""
    return self.initial.reshape(-1, self.vocab_size).sum(axis=0)

  def context_free_logits(self, x, gamma):
    """log π_k + γ x_k/(1 − γ)²: the posterior of a model that ignores the other positions."""
    log_pi = jnp.log(jnp.maximum(jnp.asarray(self.unigram(), jnp.float32), 1e-30))
    return log_pi + emission_logits(x.astype(jnp.float32), gamma.astype(jnp.float32))

  def denoiser(self, x, gamma):
    """E[x1 | x_γ = x], [B, L, V] float32 (computed in float64)."""
    with jax.enable_x64(True):
      probs = _markov_forward_backward(jnp.asarray(x, jnp.float64), jnp.asarray(gamma, jnp.float64),
                                       jnp.asarray(self.transition), jnp.asarray(self.initial),
                                       self.vocab_size, self.order)
      return np.asarray(probs, np.float32)

  def denoiser_logits(self, x, gamma):
    return jnp.log(jnp.maximum(jnp.asarray(self.denoiser(x, gamma)), 1e-30))


@functools.partial(jax.jit, static_argnums=(4, 5))
def _markov_forward_backward(x, gamma, transition, initial, vocab: int, order: int):
  batch, length, _ = x.shape
  if length < order:
    raise ValueError(f"sequences of length {length} are shorter than the chain's order {order}")
  log_e = emission_logits(x, gamma)
  # Subtracting each position's maximum keeps exp finite up to γ → 1 (it cancels in the posterior).
  emit = jnp.exp(log_e - jnp.max(log_e, axis=-1, keepdims=True))  # [B, L, V]
  rest = vocab ** (order - 1)
  trans = transition.reshape(vocab, rest, vocab)  # [oldest digit, younger digits, next token]
  place = vocab ** jnp.arange(order - 1, -1, -1)
  digits = (jnp.arange(vocab**order)[:, None] // place[None, :]) % vocab  # [V^k, k], oldest first

  def normalise(a):
    return a / jnp.sum(a, axis=-1, keepdims=True)

  # The first state (position k − 1): stationary context law times its k tokens' emissions.
  first = initial[None, :] * jnp.prod(jnp.stack(
      [emit[:, j, :][:, digits[:, j]] for j in range(order)], axis=0), axis=0)
  first = normalise(first)

  def forward(alpha, e):
    # α'(rest, v) = e(v) Σ_old α(old, rest) T(old, rest, v): one [B, V] × [V, V] matmul per `rest`.
    a = alpha.reshape(batch, vocab, rest)
    nxt = jnp.einsum("bor,orv->brv", a, trans) * e[:, None, :]
    nxt = normalise(nxt.reshape(batch, -1))
    return nxt, nxt

  emits_after = jnp.moveaxis(emit[:, order:, :], 1, 0)  # [L − k, B, V]
  _, alphas = jax.lax.scan(forward, first, emits_after)
  alphas = jnp.concatenate([first[None], alphas], axis=0)  # states at positions k−1 .. L−1

  def backward(beta, e):
    # β(old, rest) = Σ_v T(old, rest, v) e(v) β'(rest, v)
    b = beta.reshape(batch, rest, vocab) * e[:, None, :]
    prev = jnp.einsum("orv,brv->bor", trans, b).reshape(batch, -1)
    prev = normalise(prev)
    return prev, prev

  last = jnp.ones_like(first) / first.shape[-1]
  _, betas = jax.lax.scan(backward, last, emits_after, reverse=True)
  betas = jnp.concatenate([betas, last[None]], axis=0)
  state_post = normalise(alphas * betas)  # [L − k + 1, B, V^k]
  # Positions k−1 .. L−1: the newest digit of the state. Positions 0 .. k−2: older digits of the first state.
  newest = state_post.reshape(-1, batch, rest, vocab).sum(axis=2)
  first_post = state_post[0]
  older = [jnp.zeros((batch, vocab), x.dtype).at[:, digits[:, j]].add(first_post) for j in range(order - 1)]
  out = jnp.concatenate([jnp.stack(older, axis=1) if older else jnp.zeros((batch, 0, vocab), x.dtype),
                         jnp.moveaxis(newest, 0, 1)], axis=1)
  return out
