"""The exact Markov posterior (SPEC §9) against brute-force enumeration of every sequence (SPEC §6)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfmjax.data.markov import MarkovSource
from cfmjax.flow import oracles

GAMMAS = np.array([0.0, 0.2, 0.5, 0.8, 0.95, 0.99])


def _all_sequences(vocab: int, length: int) -> np.ndarray:
  return np.array(list(itertools.product(range(vocab), repeat=length)), np.int32)


def _brute_force(source: MarkovSource, length: int) -> oracles.FiniteSupport:
  """All V^L sequences with their exact probabilities under the chain."""
  seqs = _all_sequences(source.vocab_size, length)
  probs = np.exp(source.log_likelihood(seqs))
  assert abs(probs.sum() - 1.0) < 1e-12
  return oracles.FiniteSupport(seqs, probs, source.vocab_size)


def _noisy_states(vocab: int, length: int, seed: int):
  """x_γ for random clean rows at every γ in GAMMAS (float64), with γ [B]."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, size=(len(GAMMAS), length))
  noise = rng.standard_normal((len(GAMMAS), length, vocab))
  gamma = GAMMAS
  x = (1.0 - gamma)[:, None, None] * noise + gamma[:, None, None] * np.eye(vocab)[tokens]
  return x, gamma


@pytest.mark.parametrize("vocab,order,length,concentration", [
    (3, 1, 5, 0.5), (4, 1, 4, 1.0), (3, 2, 5, 0.5), (2, 2, 2, 1.0), (2, 3, 6, 0.3), (3, 3, 4, 1.0)])
def test_markov_posterior_matches_brute_force(vocab, order, length, concentration):
  source = MarkovSource(vocab, order, concentration, seed=7 + order)
  exact = oracles.MarkovPosterior.from_source(source)
  brute = _brute_force(source, length)
  x, gamma = _noisy_states(vocab, length, seed=order)
  with jax.enable_x64(True):
    want = np.asarray(brute.denoiser(jnp.asarray(x, jnp.float64), jnp.asarray(gamma, jnp.float64)))
    got = np.asarray(oracles._markov_forward_backward(
        jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(exact.transition), jnp.asarray(exact.initial),
        vocab, order))
  assert got.shape == (len(GAMMAS), length, vocab)
  np.testing.assert_allclose(got, want, atol=1e-10, rtol=0)
  # The public float32 wrapper agrees to float32 precision.
  np.testing.assert_allclose(np.asarray(exact.denoiser(x, gamma)), want, atol=1e-6)


@pytest.mark.parametrize("order", [1, 2])
def test_context_free_logits_match_brute_force_on_one_position(order):
  vocab = 4
  source = MarkovSource(vocab, order, 0.5, seed=3)
  exact = oracles.MarkovPosterior.from_source(source)
  # One position: the support is the V tokens with the chain's marginal law π.
  brute = oracles.FiniteSupport(np.arange(vocab, dtype=np.int32)[:, None], exact.unigram(), vocab)
  assert abs(exact.unigram().sum() - 1.0) < 1e-12
  x, gamma = _noisy_states(vocab, 1, seed=11)
  with jax.enable_x64(True):
    want = np.asarray(brute.denoiser(jnp.asarray(x), jnp.asarray(gamma)))
  got = np.asarray(jax.nn.softmax(exact.context_free_logits(jnp.asarray(x, jnp.float32),
                                                            jnp.asarray(gamma, jnp.float32)), axis=-1))
  np.testing.assert_allclose(got, want, atol=2e-5)  # context_free_logits is float32 by design
  if order == 1:  # with L = 1 the exact posterior is the context-free one
    np.testing.assert_allclose(np.asarray(exact.denoiser(x, gamma)), want, atol=1e-6)
