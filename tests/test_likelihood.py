"""The likelihood bound (SPEC §5) against the exact NLL of a finite-support toy (SPEC §6)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfmjax.data.markov import MarkovSource
from cfmjax.evaluation import likelihood
from cfmjax.flow import oracles, schedules
from cfmjax.models import state_space


def _estimate(denoise_fn, toy, tokens, seed):
  settings = likelihood.BoundSettings(num_points=256, points_per_call=32)
  fn = jax.jit(lambda t, r: likelihood.sequence_bounds(denoise_fn, t, r, toy.vocab_size, settings=settings)[0])
  return np.asarray(fn(jnp.asarray(tokens), jax.random.key(seed)), np.float64)


def test_bound_is_tight_at_the_exact_denoiser_and_loose_when_perturbed():
  toy = oracles.random_finite_support(seed=1, num_sequences=6, length=3, vocab_size=4, concentration=2.0)
  rng = np.random.default_rng(0)
  tokens = toy.sequences[rng.choice(len(toy.probs), size=1024, p=toy.probs)]
  true_nll = toy.nll(tokens)

  exact = lambda x, gamma: toy.denoiser_logits(x, gamma)
  bound = _estimate(exact, toy, tokens, seed=0)
  diff = bound - true_nll  # paired: same sequences
  mean, stderr = diff.mean(), diff.std(ddof=1) / np.sqrt(len(diff))
  print(f"exact denoiser: bound {bound.mean():.4f} vs true NLL {true_nll.mean():.4f} "
        f"(diff {mean:.4f} +- {stderr:.4f})")
  assert abs(mean) < 4 * stderr + 1e-3
  assert abs(bound.mean() / true_nll.mean() - 1) < 0.02

  # A too-flat denoiser (logits cooled by 0.6) is not the posterior: its bound is clearly looser.
  flat = lambda x, gamma: 0.6 * jnp.maximum(toy.denoiser_logits(x, gamma), -30.0)
  loose = _estimate(flat, toy, tokens, seed=0)
  gap = loose - true_nll
  print(f"perturbed denoiser: bound {loose.mean():.4f} (gap {gap.mean():.4f} +- "
        f"{gap.std(ddof=1) / np.sqrt(len(gap)):.4f})")
  assert gap.mean() > 5 * gap.std(ddof=1) / np.sqrt(len(gap))
  assert loose.mean() > 1.05 * true_nll.mean()


def test_summary_reports_per_token_bound_and_stderr():
  s = likelihood.summarize(np.array([10.0, 12.0, 14.0]), length=4)
  assert s["metric"] == "nll_bound_per_token" and s["num_tokens"] == 12
  assert np.isclose(s["value"], 3.0) and np.isclose(s["ppl_bound"], np.exp(3.0))
  assert np.isclose(s["stderr"], 2.0 / np.sqrt(3) / 4)


def _compile(fn):
  jitted = jax.jit(fn)
  return lambda params, tokens, rng: jitted(params, jnp.asarray(tokens), rng)


def _toy_rows(toy, num, seed):
  rng = np.random.default_rng(seed)
  return toy.sequences[rng.choice(len(toy.probs), size=num, p=toy.probs)]


def test_importance_sampled_bound_is_unbiased_and_selected_on_its_own_split():
  """λ1 and the proposal fitted on a selection split; the report split's bound with the exact
  denoiser matches both −log π and the plain stratified estimator within their standard errors,
  and a perturbed denoiser's is clearly above."""
  toy = oracles.random_finite_support(seed=1, num_sequences=6, length=3, vocab_size=4, concentration=2.0)
  report, selection = _toy_rows(toy, 768, 0), _toy_rows(toy, 128, 1)
  true_nll = toy.nll(report)
  exact = lambda x, gamma: toy.denoiser_logits(x, gamma)
  terms = likelihood.Terms(likelihood.denoiser_terms(exact, toy.vocab_size))
  settings = likelihood.BoundSettings(num_points=64, batch_size=256, points_per_call=16)
  record = likelihood.bound_with_selection(_compile, terms, None, report, selection, settings=settings, seed=3)
  length = report.shape[1]
  sel = record["selection"]
  assert sel["num_rows"] == 128 and sel["lambda_max"] in sel["candidates"]
  assert len(sel["candidate_values"]) == len(likelihood.CANDIDATES)
  assert np.isclose(sum(sel["proposal_masses"]), 1.0) and sel["proposal_edges"][-1] == record["lambda_max"]
  truth = true_nll.mean() / length
  print(f"IS, λ1={record['lambda_max']}: {record['value']:.4f} +- {record['stderr']:.4f} vs {truth:.4f}")
  assert abs(record["value"] - truth) < 4 * record["stderr"] + 1e-3

  # The plain stratified estimator at the same λ1 on the same rows agrees with it.
  plain = np.asarray(jax.jit(lambda t, r: likelihood.sequence_bounds(
      exact, t, r, toy.vocab_size, lambda_max=record["lambda_max"], settings=settings)[0])(
          jnp.asarray(report), jax.random.key(5)), np.float64)
  plain_se = plain.std(ddof=1) / np.sqrt(len(plain)) / length
  assert abs(plain.mean() / length - truth) < 4 * plain_se + 1e-3
  assert abs(plain.mean() / length - record["value"]) < 4 * np.hypot(plain_se, record["stderr"]) + 1e-3

  flat = lambda x, gamma: 0.6 * jnp.maximum(toy.denoiser_logits(x, gamma), -30.0)
  loose = likelihood.bound_with_selection(_compile, likelihood.Terms(likelihood.denoiser_terms(flat, toy.vocab_size)),
                                          None, report, selection, settings=settings, seed=3)
  print(f"perturbed, λ1={loose['lambda_max']}: {loose['value']:.4f} +- {loose['stderr']:.4f}")
  assert loose["value"] - truth > 5 * loose["stderr"] and loose["value"] > 1.05 * truth


def test_endpoint_selection_never_reads_the_report_split():
  toy = oracles.random_finite_support(seed=2, num_sequences=5, length=3, vocab_size=4, concentration=1.0)
  report, selection = _toy_rows(toy, 64, 0), _toy_rows(toy, 64, 1)
  flat = lambda x, gamma: 0.7 * jnp.maximum(toy.denoiser_logits(x, gamma), -30.0)
  terms = likelihood.Terms(likelihood.denoiser_terms(flat, toy.vocab_size))
  seen = []

  def spying_compile(fn):  # the first compiled function is the pilot: record what it is fed
    run = _compile(fn)
    index = len(seen)
    seen.append([])

    def call(params, tokens, rng):
      seen[index].append(np.array(tokens))
      return run(params, tokens, rng)
    return call

  kw = dict(settings=likelihood.BoundSettings(num_points=16, batch_size=32), seed=0)
  clean = likelihood.bound_with_selection(spying_compile, terms, None, report, selection, **kw)
  pilot_rows = np.concatenate(seen[0])
  assert {tuple(r) for r in pilot_rows} <= {tuple(r) for r in selection}
  poisoned = (report + 1) % toy.vocab_size  # mostly off the toy's support: a very different bound
  seen.clear()
  other = likelihood.bound_with_selection(spying_compile, terms, None, poisoned, selection, **kw)
  assert other["selection"] == clean["selection"]
  assert other["lambda_max"] == clean["lambda_max"]
  assert abs(other["value"] - clean["value"]) > 3 * (other["stderr"] + clean["stderr"])


def test_proposal_points_are_stratified_in_the_cdf_with_inverse_density_weights():
  edges, masses = likelihood.fitted_proposal([-2.0, 0.0, 1.0, 4.0], [1.0, 5.0, 0.5], defensive=0.1)
  lam, weight = likelihood.proposal_points(jax.random.key(0), 4096, 8, edges, masses)
  lam, weight = np.asarray(lam), np.asarray(weight)
  assert (lam >= -2).all() and (lam <= 4).all()
  # ∫ f dλ on [-2, 4]: 6 for f = 1, 30 for f = λ² + 1 (unbiased per row); uniform masses are exact for f = 1.
  for f, integral in ((np.ones_like(lam), 6.0), (lam**2 + 1, 30.0)):
    est = np.sum(f * weight, axis=1)
    assert abs(est.mean() - integral) < 4 * est.std(ddof=1) / np.sqrt(len(est))
  lam, weight = likelihood.proposal_points(jax.random.key(1), 16, 8, *likelihood.uniform_proposal(-2.0, 4.0))
  assert np.allclose(np.asarray(weight), 6.0 / 8)
  strata = np.floor((np.asarray(lam) + 2.0) / 0.75).astype(int)
  assert (strata == np.arange(8)[None, :]).all()


_BOUND_SPACES = {"vocab": {"model.state_space": "vocab"},
                 "project": {"model.state_space": "embedding", "model.embedded_noise": "project"},
                 "chunked": {"model.state_space": "embedding", "model.embedded_noise": "project",
                             "model.vocab_chunk": 7},
                 "cholesky": {"model.state_space": "embedding"}}


def _network_bounds(names, auto=("project",)):
  """evaluate.likelihood_bound of one random network (V = 40 > D = 32) through each named state space
  of _BOUND_SPACES, as the V-space bound (bound_space="vocab"); those in `auto` also with bound_space="auto"."""
  from tests.conftest import tiny_config

  from cfmjax.evaluation import evaluate
  from cfmjax.run import experiment

  records, params = {}, None
  settings = likelihood.BoundSettings(num_points=16, batch_size=16, candidates=(-2.0, 1.0))
  for name in names:
    config = tiny_config(**{"data.seq_len": 8, "data.markov.vocab_size": 40, **_BOUND_SPACES[name]})
    exp = experiment.build(config, None, devices=jax.devices()[:1])
    params = params if params is not None else experiment.init_state(exp, 0)["ema_params"]
    records[name] = evaluate.likelihood_bound(exp, params, 16, seed=0, selection_rows=8, settings=settings,
                                              bound_space="vocab")
    assert records[name]["report_rows"] == [0, 16] and records[name]["selection_rows"] == [16, 24]
    assert records[name]["bound_space"] == "vocab"
    if name in auto:  # V = 40 > D = 32 in embedding space: auto is the h-diffusion's bound
      records[name + "_auto"] = evaluate.likelihood_bound(exp, params, 16, seed=0, selection_rows=8,
                                                          settings=settings)
      assert records[name + "_auto"]["bound_space"] == "embedding"
  return records


def test_network_bound_is_the_same_through_either_state_space():
  """evaluate.likelihood_bound calls the network through the experiment's state space: with the
  embedding state drawn by projecting the same V-space noise (embedded_noise="project"), with and
  without a chunked head, the V-space bound (bound_space="vocab") is reproduced. With V > D, "auto"
  picks the embedding bound (the same with vocabulary chunks: the slow test below)."""
  records = _network_bounds(("vocab", "project", "chunked"))
  assert records["vocab"]["state_space"] == "vocab" and records["project"]["state_space"] == "embedding"
  ref = records["vocab"]
  for name in ("project", "chunked"):
    assert records[name]["lambda_max"] == ref["lambda_max"]
    np.testing.assert_allclose(records[name]["value"], ref["value"], rtol=1e-4)
    np.testing.assert_allclose(records[name]["selection"]["candidate_values"],
                               ref["selection"]["candidate_values"], rtol=1e-4)


@pytest.mark.slow
def test_network_bound_with_the_cholesky_draw_and_the_chunked_embedding_bound():
  """The default embedding noise (a Cholesky draw, not a projection of V-space noise) gives the V-space
  bound within 4 combined standard errors where both select the same endpoint; the embedding bound
  (bound_space="auto") is the same with and without vocabulary chunks."""
  records = _network_bounds(("vocab", "project", "chunked", "cholesky"), auto=("project", "chunked"))
  np.testing.assert_allclose(records["chunked_auto"]["value"], records["project_auto"]["value"], rtol=1e-4)
  ref, chol = records["vocab"], records["cholesky"]
  print({k: (r["value"], r["stderr"], r["lambda_max"]) for k, r in records.items()})
  if chol["lambda_max"] == ref["lambda_max"]:
    assert abs(chol["value"] - ref["value"]) < 4 * np.hypot(chol["stderr"], ref["stderr"])


# ----------------------------------------------------------------------------------------------
# The embedding-space bound: the ELBO of the diffusion of h = xW itself (likelihood.py).


def _h_posterior_logits(toy, w):
  """The exact denoiser given h only, written here from scratch: with CCᵀ = WᵀW, ĥ = C⁻¹h and
  Ŵ = WC⁻ᵀ, the posterior over the K support sequences is w_j ∝ π_j exp(−Σ_l ‖ĥ_l − γŴ_{s_jl}‖²/(2(1−γ)²));
  its per-position marginals are μ (returned as log μ)."""
  w = np.asarray(w, np.float64)
  chol = np.linalg.cholesky(w.T @ w)
  w_hat = np.linalg.solve(chol, w.T).T  # [V, D]
  points = jnp.asarray(w_hat[toy.sequences], jnp.float32)  # [K, L, D]
  chol_inv = jnp.asarray(np.linalg.inv(chol), jnp.float32)
  support = toy.one_hot()  # [K, L, V]
  log_pi = jnp.log(jnp.asarray(toy.probs, jnp.float32))

  def logits(h, gamma):
    h_hat = jnp.einsum("ed,bld->ble", chol_inv, h.astype(jnp.float32))
    g = gamma.astype(jnp.float32)[:, None, None, None]
    dist = jnp.sum(jnp.square(h_hat[:, None] - g * points[None]), axis=(-1, -2))  # [B, K]
    post = jax.nn.softmax(log_pi[None] - dist / (2.0 * jnp.square(1.0 - g[:, :, 0, 0])), axis=-1)
    mu = jnp.einsum("bk,klv->blv", post, support)
    return jnp.log(jnp.maximum(mu, jnp.finfo(jnp.float32).tiny))

  return logits


def _embedded_estimate(denoise_fn, toy, tokens, seed, embedding=None, num_points=256):
  settings = likelihood.BoundSettings(num_points=num_points, points_per_call=32)
  fn = jax.jit(lambda t, r: likelihood.sequence_bounds(denoise_fn, t, r, toy.vocab_size, embedding=embedding,
                                                       settings=settings)[0])
  return np.asarray(fn(jnp.asarray(tokens), jax.random.key(seed)), np.float64)


def test_embedding_bound_is_tight_at_the_exact_posterior_given_h():
  """V = 6 > D = 3, L = 2, fixed W: the bound with the exact denoiser given h lands within its SE of
  −log π (per sequence, averaged); a cooled one is clearly above. Also through the importance-sampled,
  selected bound (prior from the tokens' leverages)."""
  toy = oracles.random_finite_support(seed=3, num_sequences=6, length=2, vocab_size=6, concentration=2.0)
  w = np.random.default_rng(7).normal(size=(6, 3))
  tokens = _toy_rows(toy, 1024, 0)
  true_nll = toy.nll(tokens)
  exact = _h_posterior_logits(toy, w)

  bound = _embedded_estimate(exact, toy, tokens, seed=0, embedding=w)
  diff = bound - true_nll
  mean, stderr = diff.mean(), diff.std(ddof=1) / np.sqrt(len(diff))
  print(f"embedding, exact posterior given h: {bound.mean():.4f} vs {true_nll.mean():.4f} ({mean:.4f} +- {stderr:.4f})")
  assert abs(mean) < 4 * stderr + 1e-3
  assert abs(bound.mean() / true_nll.mean() - 1) < 0.03

  flat = lambda h, gamma: 0.6 * jnp.maximum(exact(h, gamma), -30.0)
  loose = _embedded_estimate(flat, toy, tokens, seed=0, embedding=w)
  gap = loose - true_nll
  print(f"embedding, cooled: {loose.mean():.4f} (gap {gap.mean():.4f} +- {gap.std(ddof=1) / np.sqrt(len(gap)):.4f})")
  assert gap.mean() > 5 * gap.std(ddof=1) / np.sqrt(len(gap))
  assert loose.mean() > 1.05 * true_nll.mean()

  report, selection = tokens[:768], _toy_rows(toy, 128, 1)
  terms = likelihood.Terms(likelihood.embedded_denoiser_terms(exact, w), likelihood.embedded_prior_fn(w))
  record = likelihood.bound_with_selection(_compile, terms, None, report, selection, seed=3,
                                           settings=likelihood.BoundSettings(num_points=64, batch_size=256))
  truth = toy.nll(report).mean() / report.shape[1]
  print(f"embedding IS, λ1={record['lambda_max']}: {record['value']:.4f} +- {record['stderr']:.4f} vs {truth:.4f}")
  assert abs(record["value"] - truth) < 4 * record["stderr"] + 1e-3


def test_embedding_bound_with_square_invertible_w_is_the_vocab_bound():
  """D = V, W invertible: ŴŴᵀ = I, so the whitened Brier is the V-space Brier and the leverages are 1;
  with the same (cooled, not exact) denoiser read through x = hW⁻¹ both bounds agree within their SE."""
  toy = oracles.random_finite_support(seed=1, num_sequences=6, length=3, vocab_size=4, concentration=2.0)
  w = np.random.default_rng(3).normal(size=(4, 4)) + 2.0 * np.eye(4)
  w_inv = jnp.asarray(np.linalg.inv(w), jnp.float32)
  flat = lambda x, gamma: 0.6 * jnp.maximum(toy.denoiser_logits(x, gamma), -30.0)
  flat_h = lambda h, gamma: flat(jnp.einsum("bld,dv->blv", h, w_inv), gamma)
  tokens = _toy_rows(toy, 1024, 0)
  vocab = _embedded_estimate(flat, toy, tokens, seed=0, num_points=128)
  emb = _embedded_estimate(flat_h, toy, tokens, seed=1, embedding=w, num_points=128)
  se = lambda a: a.std(ddof=1) / np.sqrt(len(a))
  print(f"D = V: vocab {vocab.mean():.4f} +- {se(vocab):.4f}, embedding {emb.mean():.4f} +- {se(emb):.4f}, "
        f"true {toy.nll(tokens).mean():.4f}")
  assert abs(vocab.mean() - emb.mean()) < 4 * np.hypot(se(vocab), se(emb))
  assert vocab.mean() > 1.05 * toy.nll(tokens).mean()  # a loose bound, so the agreement is not just the NLL's
  prior = likelihood.embedded_prior_fn(w)(None, jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(prior), 3.0, rtol=1e-4)


def _markov_posterior_space(posterior, schedule, vocab_size):
  """The chain's exact posterior as a V-space StateSpace of a prompt-trained model: positions under
  prompt_mask are read as certain (γ → 1), the others at the row's γ."""
  visible = 1.0 - 1e-4  # certain in float64 (as in bench/trunk_probe.py)

  def logits_fn(_, x, tau_s, tau_t, prompt_mask=None):
    gamma = jnp.broadcast_to(schedule.gamma(tau_t)[:, None], x.shape[:2])
    if prompt_mask is not None:
      gamma = jnp.where(prompt_mask, visible, gamma)
    probs = jax.pure_callback(lambda a, g: posterior.denoiser(np.asarray(a), np.asarray(g)),
                              jax.ShapeDtypeStruct(x.shape, jnp.float32), x, gamma)
    return jnp.log(jnp.maximum(probs, 1e-30))

  return state_space.StateSpace(logits_fn, vocab_size, prompt_flag=True)


def test_conditional_bound_is_tight_at_the_exact_posterior_given_the_context():
  """Rows (tokens, scored): the first 3 of 6 positions are clean context, the rest bounded. With the
  exact posterior given that context as the denoiser, the bound matches −log p(rest | prefix) of an
  order-2 chain (exact, forward algorithm) within its standard error; every position scored is the
  plain-rows bound, and that matches −log p(row)."""
  vocab, length, prefix, n = 4, 6, 3, 2048
  source = MarkovSource(vocab, order=2, concentration=0.5, seed=3)
  posterior = oracles.MarkovPosterior.from_source(source)
  schedule = schedules.get_schedule("linear", vocab)
  terms = likelihood.state_space_terms(_markov_posterior_space(posterior, schedule, vocab), schedule)
  tokens = source.sample(np.random.default_rng(0), n, length).astype(np.int32)
  scored = np.ones((n, length), np.float32)
  scored[:, :prefix] = 0.0
  # λ1 and an importance proposal from other rows (lower variance than uniform λ)
  selection = source.sample(np.random.default_rng(1), 128, length).astype(np.int32)
  settings = likelihood.BoundSettings(num_points=128, points_per_call=16, batch_size=128)
  run_pilot = jax.jit(lambda p, t, r: likelihood.pilot_terms(
      functools.partial(terms.terms_fn, p), t, r, settings=settings, prior_fn=functools.partial(terms.prior_fn, p)))
  fitted = likelihood.select_endpoint(run_pilot, None, selection, settings=settings)
  report = jax.jit(likelihood.report_fn(terms, settings, lambda_max=fitted["lambda_max"], proposal=fitted["proposal"]))
  key = jax.random.key(5)
  bound = np.asarray(report(None, (jnp.asarray(tokens), jnp.asarray(scored)), key)[0], np.float64)
  exact = -(source.log_likelihood(tokens) - source.log_likelihood(tokens[:, :prefix]))
  diff = bound - exact
  stderr = diff.std(ddof=1) / np.sqrt(n)
  print(f"conditional bound {bound.mean():.4f} vs exact −log p(rest | prefix) {exact.mean():.4f} "
        f"(diff {diff.mean():.4f} +- {stderr:.4f})")
  assert abs(diff.mean()) < 3 * stderr + 2e-3  # a context read as noisy evidence is ~0.06 above

  # The context is used: the joint NLL of the whole row is the prefix's plus this, so the prefix's
  # NLL must be clearly positive, and the bound on all six positions near −log p(row).
  everything = np.asarray(report(None, (jnp.asarray(tokens), jnp.ones((n, length), jnp.float32)), key)[0])
  plain = np.asarray(report(None, jnp.asarray(tokens), key)[0])
  np.testing.assert_allclose(everything, plain, rtol=1e-6)
  joint = -source.log_likelihood(tokens)
  assert abs((plain - joint).mean()) < 4 * (plain - joint).std(ddof=1) / np.sqrt(n) + 2e-3
  assert (joint - exact).mean() > 1.0  # the prefix carries > 1 nat, so conditioning matters here
