"""The base flow's math against exact oracles (SPEC §1, §2, §6), not against itself."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfmjax.flow import corruption, oracles, schedules
from cfmjax.models import state_space
from cfmjax.objectives import losses
from cfmjax.sampling import samplers


@pytest.mark.parametrize("vocab_size", [2, 8, 1000])
def test_argmax_schedule_matches_monte_carlo(vocab_size):
  """q(γ) from quadrature equals the frequency with which argmax(x_γ) is the clean token."""
  rng = np.random.default_rng(0)
  num = 20_000
  for gamma in (0.05, 0.2, 0.4, 0.6):
    eps = rng.standard_normal((num, vocab_size)).astype(np.float32)
    x = (1 - gamma) * eps
    x[:, 0] += gamma  # the clean token is 0; by symmetry any token would do
    freq = np.mean(np.argmax(x, axis=1) == 0)
    q = schedules.argmax_probability(np.array([gamma]), vocab_size)[0]
    stderr = np.sqrt(q * (1 - q) / num)
    assert abs(freq - q) < 4 * stderr + 1e-3, (gamma, freq, q)


@pytest.mark.parametrize("name", schedules.SCHEDULES)
def test_schedules_are_monotone_bijections(name):
  s = schedules.get_schedule(name, 64)
  tau = jnp.linspace(0.0, 1.0, 1001)
  gamma = np.asarray(s.gamma(tau))
  assert gamma[0] == 0.0 and gamma[-1] == 1.0
  assert np.all(np.diff(gamma) >= 0)
  np.testing.assert_allclose(np.asarray(s.tau(s.gamma(tau[1:-1]))), np.asarray(tau[1:-1]), atol=2e-3)


def test_argmax_schedule_tau_is_rescaled_accuracy():
  s = schedules.get_schedule("argmax", 16)
  gamma = np.array([0.3, 0.5, 0.7])
  q = schedules.argmax_probability(gamma, 16)
  np.testing.assert_allclose(np.asarray(s.tau(gamma)), (16 * q - 1) / 15, atol=1e-4)


def test_unknown_schedule_is_refused():
  with pytest.raises(ValueError, match="unknown schedule"):
    schedules.get_schedule("cosine", 8)


def _toy():
  return oracles.random_finite_support(seed=3, num_sequences=5, length=2, vocab_size=3)


def _toy_batch(toy, rng, num):
  idx = jax.random.choice(rng, len(toy.probs), (num,), p=jnp.asarray(toy.probs))
  return jnp.asarray(toy.sequences)[idx]


def test_exact_denoiser_is_a_probability_and_recovers_data():
  toy = _toy()
  x = toy.one_hot()  # at γ → 1 the state is the data itself
  mu = toy.denoiser(x, jnp.full((len(toy.probs),), 0.999))
  np.testing.assert_allclose(np.asarray(mu), np.asarray(x), atol=1e-5)
  noise = jax.random.normal(jax.random.key(0), (7, 2, 3))
  mu0 = toy.denoiser(noise, jnp.zeros(7))  # at γ = 0 the posterior is the prior
  expected = np.einsum("k,klv->lv", toy.probs, np.asarray(toy.one_hot()))
  np.testing.assert_allclose(np.asarray(mu0), np.broadcast_to(expected, mu0.shape), atol=1e-6)


@pytest.mark.parametrize("schedule_name", ["linear", "mixed"])
def test_loss_is_lowest_at_the_exact_denoiser(schedule_name):
  """E[CE] is minimised by the true posterior: every perturbation of it scores worse."""
  toy = _toy()
  schedule = schedules.get_schedule(schedule_name, toy.vocab_size)
  direction = jax.random.normal(jax.random.key(1), (2, 3))

  def apply_fn(perturbation, x, tau_s, tau_t):
    temperature, shift = perturbation
    logits = toy.denoiser_logits(x, schedule.gamma(tau_t))
    logits = jnp.maximum(logits, -30.0)  # keep perturbed logits finite
    return logits * temperature + shift * direction

  tokens = _toy_batch(toy, jax.random.key(2), 8192)
  space = state_space.StateSpace(apply_fn, 3)
  loss = lambda p: losses.flow_matching_loss(p, tokens, jax.random.key(3), space=space, schedule=schedule)[0]
  exact = float(loss((1.0, 0.0)))
  for perturbation in [(0.7, 0.0), (1.4, 0.0), (1.0, 0.3), (1.0, -0.3)]:
    assert float(loss(perturbation)) > exact + 1e-3, perturbation


def test_euler_sampler_with_exact_denoiser_reproduces_the_toy_distribution():
  toy = _toy()
  schedule = schedules.get_schedule("linear", toy.vocab_size)
  denoise = lambda x, tau: toy.denoiser_logits(x, schedule.gamma(tau))
  num = 4000
  tokens, mu = samplers.euler_sample(denoise, jax.random.key(0), (num, 2, 3), schedule, steps=200)
  tokens = np.asarray(tokens)
  freq = np.array([np.mean(np.all(tokens == s[None], axis=1)) for s in toy.sequences])
  assert freq.sum() > 0.99, "samples left the support"
  tv = 0.5 * np.abs(freq - toy.probs).sum()
  assert tv < 0.04, (freq, toy.probs)
  # And a deliberately wrong denoiser (too cold) is detectably off, so the check has teeth.
  cold = lambda x, tau: 3.0 * jnp.maximum(toy.denoiser_logits(x, schedule.gamma(tau)), -30.0)
  bad, _ = samplers.euler_sample(cold, jax.random.key(0), (num, 2, 3), schedule, steps=200)
  bad_freq = np.array([np.mean(np.all(np.asarray(bad) == s[None], axis=1)) for s in toy.sequences])
  assert 0.5 * np.abs(bad_freq - toy.probs).sum() > 2 * tv


def test_euler_step_lands_on_the_denoiser_at_the_end():
  x = jnp.array([[0.3, -1.0, 2.0]])
  mu = jnp.array([[0.2, 0.5, 0.3]])
  np.testing.assert_allclose(samplers.euler_step(x, mu, 0.8, 1.0), mu)
  np.testing.assert_allclose(samplers.euler_step(x, mu, 0.0, 0.0), x)


def test_noisy_state_statistics():
  tokens = jnp.zeros((4000, 1), jnp.int32)
  gamma = jnp.full((4000,), 0.25)
  x = corruption.noisy_state(jax.random.key(0), tokens, gamma, 4)
  np.testing.assert_allclose(np.asarray(x.mean(axis=(0, 1))), [0.25, 0, 0, 0], atol=0.05)
  np.testing.assert_allclose(np.asarray(x.std(axis=(0, 1))), [0.75] * 4, atol=0.03)
  tau = corruption.stratified_uniform(jax.random.key(1), 8)
  assert np.all((np.floor(np.asarray(tau) * 8)) == np.arange(8))


def test_position_noise_noises_each_position_at_the_time_it_passes_the_network():
  """flow.position_noise: rows with one τ per position. The exact Markov posterior at each position's
  own γ (forward-backward with per-position emissions, SPEC §9) must score best; the same posterior
  read at the row's time, or the context-free one at the right times, must score worse."""
  from cfmjax.data.markov import MarkovSource  # noqa: PLC0415

  markov = MarkovSource(6, 1, 0.2, seed=3)
  post = oracles.MarkovPosterior.from_source(markov)
  schedule = schedules.get_schedule("mixed", 6)
  tokens = jnp.asarray(markov.sample(np.random.default_rng(0), 256, 8))

  def make(kind):
    def apply_fn(_, x, tau_s, tau_t, position_tau=None):
      assert position_tau is not None and position_tau.shape == x.shape[:2]
      gamma = schedule.gamma(tau_s if kind == "row" else position_tau)
      if kind == "context_free":
        return post.context_free_logits(x, gamma)
      return jnp.maximum(post.denoiser_logits(x, gamma), -30.0)
    return apply_fn

  mixed = losses.FlowOptions(position_noise=1.0)
  loss = {kind: float(losses.flow_matching_loss(None, tokens, jax.random.key(1), space=state_space.StateSpace(make(kind), 6),
                                                schedule=schedule, options=mixed)[0])
          for kind in ("exact", "row", "context_free")}
  assert loss["exact"] < loss["context_free"] - 0.02 and loss["exact"] < loss["row"] - 0.05, loss
  # No rows mixed: the loss is the plain one, the network gets no position times.
  context_free = state_space.StateSpace(lambda _, x, ts, tt: post.context_free_logits(x, schedule.gamma(ts)), 6)
  plain = losses.flow_matching_loss(None, tokens, jax.random.key(1), space=context_free, schedule=schedule)
  mixed_none = losses.flow_matching_loss(None, tokens, jax.random.key(1), space=context_free, schedule=schedule,
                                         options=losses.FlowOptions(position_noise=0.0))
  assert float(plain[0]) == float(mixed_none[0])


def test_adaptive_weight_is_the_detached_inverse_root_of_the_brier_score():
  """flow.adaptive_weighting (SPEC §2): loss = mean of stopgrad((‖μ − x1‖² + c)^(−r)) · CE, checked in
  numpy from the logits the network returned; the weight carries no gradient."""
  toy = _toy()
  schedule = schedules.get_schedule("linear", toy.vocab_size)
  tokens = _toy_batch(toy, jax.random.key(2), 64)
  seen = {}

  def apply_fn(scale, x, tau_s, tau_t):
    seen["logits"] = scale * x
    return scale * x

  weighting = losses.AdaptiveWeight(power=0.5, offset=0.01)
  loss_fn = lambda s: losses.flow_matching_loss(s, tokens, jax.random.key(3), space=state_space.StateSpace(apply_fn, 3),
                                                schedule=schedule, options=losses.FlowOptions(weighting))[0]
  loss = float(loss_fn(2.0))
  logits = np.asarray(seen["logits"], np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  onehot = np.eye(3)[np.asarray(tokens)]
  ce = -np.log(np.sum(p * onehot, -1))
  w = (np.sum((p - onehot) ** 2, -1) + 0.01) ** -0.5
  np.testing.assert_allclose(loss, np.mean(w * ce), rtol=1e-5)
  # d/ds of mean(w · CE) with w held fixed, by central differences of the numpy reference
  def ref(s):
    z = s * logits / 2.0
    q = np.exp(z - z.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    return np.mean(w * -np.log(np.sum(q * onehot, -1)))
  np.testing.assert_allclose(float(jax.grad(loss_fn)(2.0)), (ref(2.0 + 1e-4) - ref(2.0 - 1e-4)) / 2e-4, rtol=1e-3)
