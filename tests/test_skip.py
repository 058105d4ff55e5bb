"""The skip parametrisation (SPEC §9): an untrained skip model is the context-free posterior.

References are independent of model.py: the V-space form from the Markov oracle, the embedding form
from the Gaussian likelihood of h = xW given each token, evaluated with scipy in float64.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from cfmjax.data.markov import MarkovSource
from cfmjax.flow import oracles, schedules
from cfmjax.models import model as model_lib, state_space


def _untrained(vocab, d_model, log_prior, posterior_input=False):
  cfg = model_lib.ModelConfig(vocab_size=vocab, d_model=d_model, num_layers=1, num_heads=2, mlp_dim=32,
                              time_features=8, skip=True, schedule="mixed", gate_init=0.5,
                              posterior_input=posterior_input)
  init_fn, apply_fn = model_lib.build(cfg)
  params = nn.meta.unbox(init_fn(jax.random.key(0), 1, 6))
  # Zero network output: the head kernel starts at zero under model.skip; the bias is the prior.
  assert not np.any(np.asarray(params["head"]["kernel"]))
  params = dict(params, head=dict(params["head"], bias=jnp.asarray(log_prior, jnp.float32)))
  return cfg, apply_fn, params


def _noisy(rng, tokens, gamma, vocab):
  g = gamma.reshape(gamma.shape + (1,) * (3 - gamma.ndim))  # γ per row [B] or per position [B, L]
  return ((1 - g) * rng.normal(size=tokens.shape + (vocab,)) + g * np.eye(vocab)[tokens]).astype(np.float32)


@pytest.mark.parametrize("posterior_input", [False, True])
def test_vocab_form_equals_the_context_free_posterior_of_the_markov_oracle(posterior_input):
  markov = MarkovSource(12, 2, 0.3, seed=4)
  post = oracles.MarkovPosterior.from_source(markov)
  cfg, apply_fn, params = _untrained(12, 16, np.log(post.unigram()), posterior_input)
  rng = np.random.default_rng(0)
  tokens = markov.sample(rng, 4, 6)
  tau = jnp.asarray([0.05, 0.3, 0.6, 0.9], jnp.float32)
  gamma = np.asarray(schedules.get_schedule("mixed", 12).gamma(tau))
  x = _noisy(rng, tokens, gamma, 12)
  got = jax.nn.log_softmax(apply_fn(params, jnp.asarray(x), tau, tau))
  want = jax.nn.log_softmax(post.context_free_logits(jnp.asarray(x), jnp.asarray(gamma)))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4)


@pytest.mark.parametrize("vocab,d_model", [(12, 16), (40, 16)])
def test_position_times_give_each_position_its_own_context_free_posterior(vocab, d_model):
  """flow.position_noise: with one τ per position, the untrained skip model is the context-free
  posterior at each position's own γ (the row time only conditions the blocks), in either form."""
  markov = MarkovSource(vocab, 1, 0.3, seed=5)
  post = oracles.MarkovPosterior.from_source(markov)
  cfg, apply_fn, params = _untrained(vocab, d_model, np.log(post.unigram()), posterior_input=True)
  apply_fn = jax.jit(apply_fn)  # one compiled program per shape instead of one per op
  rng = np.random.default_rng(3)
  tokens = markov.sample(rng, 3, 6)
  position_tau = jnp.asarray(rng.uniform(0.05, 0.95, (3, 6)), jnp.float32)
  gamma = np.asarray(schedules.get_schedule("mixed", vocab).gamma(position_tau))
  x = jnp.asarray(_noisy(rng, tokens, gamma, vocab))
  row_tau = jnp.mean(position_tau, axis=1)
  got = jax.nn.log_softmax(apply_fn(params, x, row_tau, row_tau, position_tau=position_tau))
  if vocab <= d_model:  # V-space form: the Markov oracle's context-free posterior at γ per position
    want = jax.nn.log_softmax(post.context_free_logits(x, jnp.asarray(gamma)))
  else:  # embedding form: position (b, l) as the per-row path (checked against scipy above) gives it,
    # for row b repeated once per position, each copy at that position's time
    copies = jnp.repeat(x, 6, axis=0)
    per_row = jax.nn.log_softmax(apply_fn(params, copies, position_tau.reshape(-1), position_tau.reshape(-1)))
    want = per_row.reshape(3, 6, 6, vocab)[:, jnp.arange(6), jnp.arange(6)]
  np.testing.assert_allclose(np.exp(got), np.exp(want), atol=5e-4)
  # The row's own time is not what the evidence is read at: the output differs from one.
  at_row_time = jax.nn.log_softmax(apply_fn(params, x, row_tau, row_tau))
  assert np.max(np.abs(np.exp(at_row_time) - np.exp(want))) > 0.1


@pytest.mark.parametrize("vocab,d_model,posterior_input", [(40, 16, False), (24, 8, False), (40, 16, True)])
def test_embedding_form_equals_the_gaussian_posterior_given_h(vocab, d_model, posterior_input):
  rng = np.random.default_rng(1)
  log_prior = np.log(rng.dirichlet(np.ones(vocab)))
  cfg, apply_fn, params = _untrained(vocab, d_model, log_prior, posterior_input)
  w = np.asarray(model_lib.embedding_matrix(params), np.float64)
  tokens = rng.integers(0, vocab, (3, 6))
  tau = jnp.asarray([0.2, 0.5, 0.8], jnp.float32)
  gamma = np.asarray(schedules.get_schedule("mixed", vocab).gamma(tau), np.float64)
  x = _noisy(rng, tokens, gamma, vocab).astype(np.float64)
  h = x @ w
  got = np.asarray(jax.nn.log_softmax(apply_fn(params, jnp.asarray(h, jnp.float32), tau, tau, embedded=True)))
  sigma = w.T @ w
  for b in range(3):
    # h | k ~ N(γ W_k, (1 − γ)² WᵀW): the exact context-free posterior given only h.
    cov = (1 - gamma[b]) ** 2 * sigma
    loglik = np.stack([stats.multivariate_normal(gamma[b] * w[k], cov).logpdf(h[b]) for k in range(vocab)], -1)
    want = log_prior + loglik
    want = want - np.logaddexp.reduce(want, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.exp(got[b]), np.exp(want), atol=2e-4)
  # The V-space call computes h = xW itself and must give the same logits (SPEC §4).
  via_x = apply_fn(params, jnp.asarray(x, jnp.float32), tau, tau)
  np.testing.assert_allclose(np.asarray(jax.nn.log_softmax(via_x)), got, atol=1e-3)


@pytest.mark.parametrize("vocab,d_model", [(40, 16), (12, 16)])
def test_chunked_statistics_carry_the_skip_term(vocab, d_model):
  """vocab_stats over chunks (a padded last one included) equals the full logits' statistics."""
  rng = np.random.default_rng(2)
  cfg, apply_fn, params = _untrained(vocab, d_model, np.log(rng.dirichlet(np.ones(vocab))))
  params = dict(params, head=dict(params["head"], kernel=jnp.asarray(rng.normal(size=(d_model, vocab)) * 0.1, jnp.float32)))
  tokens = jnp.asarray(rng.integers(0, vocab, (2, 6)))
  tau = jnp.asarray([0.3, 0.95], jnp.float32)
  gamma = np.asarray(schedules.get_schedule("mixed", vocab).gamma(tau))
  x = jnp.asarray(_noisy(rng, np.asarray(tokens), gamma, vocab))
  embedded = vocab > d_model
  state = x @ model_lib.embedding_matrix(params) if embedded else x
  full = state_space.StateSpace(apply_fn, vocab, embedded=embedded)
  chunked = state_space.StateSpace(apply_fn, vocab, embedded=embedded, vocab_chunk=7)
  a = full.output_stats(params, state, tau, tau, tokens=tokens)
  b = chunked.output_stats(params, state, tau, tau, tokens=tokens)
  for key in ("lse", "target", "sum_sq"):
    np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), rtol=1e-4, atol=1e-3)
  np.testing.assert_array_equal(np.asarray(a["argmax"]), np.asarray(b["argmax"]))


@pytest.mark.parametrize("vocab,d_model", [(40, 16), (12, 16)])
def test_posterior_input_reads_the_context_free_posterior_in_either_entry_point(vocab, d_model):
  """model.posterior_input feeds softmax(evidence) · E (E: the `posterior_embed` table), computed
  from h = xW, so the V-space and embedded calls agree with a trained (nonzero) head and the
  samplers' affine updates still commute with the first layer (SPEC §4)."""
  rng = np.random.default_rng(3)
  cfg, apply_fn, params = _untrained(vocab, d_model, np.log(rng.dirichlet(np.ones(vocab))), True)
  params = dict(params, head=dict(params["head"], kernel=jnp.asarray(rng.normal(size=(d_model, vocab)), jnp.float32)))
  tokens = rng.integers(0, vocab, (2, 6))
  tau = jnp.asarray([0.4, 0.9], jnp.float32)
  gamma = np.asarray(schedules.get_schedule("mixed", vocab).gamma(tau))
  x = jnp.asarray(_noisy(rng, tokens, gamma, vocab))
  via_x = apply_fn(params, x, tau, tau)
  via_h = apply_fn(params, x @ model_lib.embedding_matrix(params), tau, tau, embedded=True)
  np.testing.assert_allclose(np.asarray(via_x), np.asarray(via_h), rtol=1e-3, atol=1e-3)
  # Removing the posterior table changes the output: the input is really read.
  zeroed = dict(params, posterior_embed=jnp.zeros_like(params["posterior_embed"]))
  assert np.max(np.abs(np.asarray(apply_fn(zeroed, x, tau, tau) - via_x))) > 1e-2
  # Vocabulary chunks (a padded last one included) give the same input as the full softmax.
  skip = model_lib.skip_terms(cfg, model_lib.embedding_matrix(params), x, x @ model_lib.embedding_matrix(params), tau)
  table = params["posterior_embed"]
  full = model_lib.posterior_embedding(skip, table, 0)
  np.testing.assert_allclose(np.asarray(model_lib.posterior_embedding(skip, table, 7)), np.asarray(full),
                             rtol=1e-4, atol=1e-4)
