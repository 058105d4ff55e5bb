"""Embedding-space state and vocabulary-chunked outputs against the V-space reference (SPEC §4).

The reference is always the V-dimensional computation (one-hot data, ε ∈ R^V, full logits and the
textbook softmax / cross-entropy / KL), never the embedding path itself:
- deterministic parts agree to float tolerance when both paths get the same ε (noise="project");
- the Cholesky noise ξCᵀ has the mean and covariance of εW (Monte Carlo, tolerance from n);
- the W-gradient through the noise agrees with the V path's in expectation (Monte Carlo);
- a tiny model trains with the same loss trajectory on both paths.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfmjax.flow import schedules
from cfmjax.models import model as model_lib, state_space
from cfmjax.objectives import distill, distill_losses, fixed_point, losses
from cfmjax.sampling import flow_map, samplers
from tests.conftest import run_steps, tiny_config

VOCAB, LENGTH, BATCH = 40, 6, 4
CFG = model_lib.ModelConfig(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2, mlp_dim=32, time_features=8)


@pytest.fixture(scope="module")
def net():
  init_fn, apply_fn = model_lib.build(CFG)
  params = nn.meta.unbox(init_fn(jax.random.key(0), 1, LENGTH))
  # adaLN-zero starts every block switched off; wake the gates up so the test sees a real network.
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda p: p + 0.2 * rng.standard_normal(p.shape).astype(np.float32), params)
  return apply_fn, params


def _spaces(apply_fn, chunk=0):
  vocab = state_space.StateSpace(apply_fn, VOCAB)
  embedded = state_space.StateSpace(apply_fn, VOCAB, embedded=True, vocab_chunk=chunk, noise="project")
  return vocab, embedded


def _close(a, b, atol=2e-5, rtol=1e-4):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=rtol)


@pytest.fixture(scope="module")
def conditioned_net():
  """The same network with the self-conditioning input and the prompt flag (SPEC §8)."""
  cfg = dataclasses.replace(CFG, self_condition=True, prompt_flag=True)
  init_fn, apply_fn = model_lib.build(cfg)
  params = nn.meta.unbox(init_fn(jax.random.key(0), 1, LENGTH))
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map(lambda p: p + 0.2 * rng.standard_normal(p.shape).astype(np.float32), params)
  return apply_fn, params


# --- deterministic parts --------------------------------------------------------------------------

def test_noisy_state_is_the_projection_of_the_vocab_state(net):
  apply_fn, params = net
  vocab, embedded = _spaces(apply_fn)
  tokens = jax.random.randint(jax.random.key(1), (BATCH, LENGTH), 0, VOCAB)
  gamma = jnp.array([0.0, 0.3, 0.7, 1.0])
  x = vocab.noisy_state(params, jax.random.key(2), tokens, gamma)
  h = embedded.noisy_state(params, jax.random.key(2), tokens, gamma)
  w = model_lib.embedding_matrix(params)
  _close(h, x @ w)
  # The data part: a row gather equals onehot @ W, exactly.
  np.testing.assert_array_equal(h[-1], np.asarray(jnp.take(w, tokens[-1], axis=0)))
  # The network sees the same input either way.
  _close(apply_fn(params, h, gamma, gamma, embedded=True), apply_fn(params, x, gamma, gamma), atol=1e-4)


def test_conditioning_is_the_same_in_either_space(conditioned_net):
  """Prompts (a prompt-trained model, and inpainting for one without the flag), guidance and
  self-conditioning are data for StateSpace.readout: the embedding-space samplers (vocab chunks)
  track xW of the V-space run token for token, prompt positions come out as the prompt, and the
  prompted, self-conditioned training loss is the V-space one."""
  apply_fn, params = conditioned_net
  schedule = schedules.get_schedule("mixed", VOCAB)
  w = np.asarray(model_lib.embedding_matrix(params))
  prompt_tokens = jax.random.randint(jax.random.key(7), (BATCH, LENGTH), 0, VOCAB)
  mask = jnp.arange(LENGTH)[None, :] < jnp.array([2, 0, 3, 5])[:, None]
  prompt = (prompt_tokens, mask)
  for flag in (True, False):
    vocab = state_space.StateSpace(apply_fn, VOCAB, prompt_flag=flag)
    embedded = state_space.StateSpace(apply_fn, VOCAB, embedded=True, vocab_chunk=16, noise="project",
                                      prompt_flag=flag)
    runs = [functools.partial(samplers.euler_sample, conditioning=samplers.Conditioning(prompt, self_condition=True)),
            functools.partial(flow_map.flowmap_sample, conditioning=samplers.Conditioning(prompt), renoise=0.5)]
    if flag:  # guidance needs a prompt-trained model
      runs.append(functools.partial(samplers.euler_sample, conditioning=samplers.Conditioning(prompt, 1.5, True)))
    for run in runs:
      ref_tokens, ref_mu = run(vocab.bind(params), jax.random.key(3), (BATCH, LENGTH, VOCAB), schedule, 5)
      tokens, mu_w = run(embedded.bind(params), jax.random.key(3), (BATCH, LENGTH, VOCAB), schedule, 5)
      np.testing.assert_array_equal(tokens, ref_tokens)
      np.testing.assert_array_equal(np.asarray(tokens)[np.asarray(mask)], np.asarray(prompt_tokens)[np.asarray(mask)])
      _close(mu_w, np.asarray(ref_mu) @ w, atol=1e-5)
    if not flag:
      with pytest.raises(ValueError, match="no prompt flag"):
        samplers.euler_sample(vocab.bind(params), jax.random.key(3), (BATCH, LENGTH, VOCAB), schedule, 2,
                              conditioning=samplers.Conditioning(prompt, guidance=1.5))
  tokens = jax.random.randint(jax.random.key(8), (BATCH, LENGTH), 0, VOCAB)
  vocab = state_space.StateSpace(apply_fn, VOCAB, prompt_flag=True)
  embedded = state_space.StateSpace(apply_fn, VOCAB, embedded=True, vocab_chunk=16, noise="project", prompt_flag=True)
  loss = functools.partial(losses.flow_matching_loss, tokens=tokens, rng=jax.random.key(9), schedule=schedule,
                           options=losses.FlowOptions(prompt=(1, 4, 0.3), self_condition=True))
  (ref, _), ref_grad = jax.value_and_grad(lambda p: loss(p, space=vocab), has_aux=True)(params)
  (val, _), grad = jax.value_and_grad(lambda p: loss(p, space=embedded), has_aux=True)(params)
  _close(val, ref, atol=1e-5)
  _close(grad["head"]["kernel"], ref_grad["head"]["kernel"], atol=1e-4)


def test_conditioned_distillation_is_the_same_in_either_space(conditioned_net):
  """Guided distillation's diagonal, fixed-point distillation and the prompted consistency loss (a
  conditional flow map) in embedding space give the V-space reference's loss and gradient, with a
  frozen base (and an EMA teacher) whose weights differ from the student's: each network sees the one
  draw of ε through its own W, and the base's μ̂ input is μ̂W_sc of its own W_sc."""
  apply_fn, params = conditioned_net
  rng = np.random.default_rng(2)
  other = jax.tree_util.tree_map(lambda p: p + 0.1 * rng.standard_normal(p.shape).astype(np.float32), params)
  student = params
  schedule = schedules.get_schedule("mixed", VOCAB)
  tokens = jax.random.randint(jax.random.key(10), (BATCH, LENGTH), 0, VOCAB)
  rng_loss = jax.random.key(11)

  def space(kind):
    return state_space.StateSpace(apply_fn, VOCAB, embedded=kind == "embedding", noise="project", prompt_flag=True)

  def consistency(kind):
    c = tiny_config(**{"objective": "psd", "flow.prompt.max_len": 4,
                       "flow.prompt.min_len": 1, "model.state_space": kind, "model.embedded_noise": "project",
                       "model.d_model": CFG.d_model})  # flow.prompt.max_len > 0: the prompt flag is on
    _, loss = distill.make_losses(apply_fn, schedule, VOCAB, c)
    return lambda p, teacher: loss(p, teacher, tokens, rng_loss, 0)

  objectives = {  # f(student, frozen base or EMA teacher)
      "guided": lambda kind: lambda p, base: distill.guided_diagonal_loss(
          p, base, tokens, rng_loss, space=space(kind), schedule=schedule, guidance=1.5, prompt=(1, 4)),
      "fixed_point": lambda kind: lambda p, base: fixed_point.fixed_point_loss(
          p, base, tokens, rng_loss, space=space(kind), schedule=schedule, num_iters=2),
      "prompted_psd": consistency,
  }
  for name, objective in objectives.items():
    (ref, _), ref_grad = jax.value_and_grad(objective("vocab"), has_aux=True)(student, other)
    (got, _), grad = jax.value_and_grad(objective("embedding"), has_aux=True)(student, other)
    assert float(ref) > 1e-3, name  # a loss that is not trivially zero
    _close(got, ref, atol=1e-5)
    for path in (("head", "kernel"), ("embed", "kernel")):
      g, g_ref = grad, ref_grad
      for key in path:
        g, g_ref = g[key], g_ref[key]
      assert float(jnp.max(jnp.abs(g_ref))) > 1e-6, (name, path)
      _close(g, g_ref, atol=1e-4)
    # The teacher never trains: the loss reads it under stop_gradient, in either space.
    teacher_grad = jax.grad(lambda t: objective("embedding")(student, t)[0])(other)
    assert all(float(jnp.max(jnp.abs(leaf))) == 0.0 for leaf in jax.tree_util.tree_leaves(teacher_grad)), name


def test_samplers_carry_the_projected_state(net):
  """Euler and the k-step flow map (also renoising) in embedding space (ψW from vocab chunks) track
  xW of the V run."""
  apply_fn, params = net
  vocab, embedded = _spaces(apply_fn, chunk=16)
  schedule = schedules.get_schedule("mixed", VOCAB)
  w = np.asarray(model_lib.embedding_matrix(params))
  renoising = functools.partial(flow_map.flowmap_sample, renoise=0.5)  # fresh noise: εW of the same ε
  for sampler, steps in ((samplers.euler_sample, 6), (flow_map.flowmap_sample, 3), (renoising, 3)):
    ref_tokens, ref_mu = sampler(vocab.bind(params), jax.random.key(3), (BATCH, LENGTH, VOCAB), schedule, steps)
    tokens, mu_w = sampler(embedded.bind(params), jax.random.key(3), (BATCH, LENGTH, VOCAB), schedule, steps)
    np.testing.assert_array_equal(tokens, ref_tokens)
    assert mu_w.dtype == jnp.float32 and mu_w.shape == (BATCH, LENGTH, CFG.d_model)
    _close(mu_w, np.asarray(ref_mu) @ w, atol=1e-5)


@pytest.mark.parametrize("loss", ["psd", "lsd", "esd"])
def test_teachers_agree_between_state_spaces(net, loss):
  """PSD's composed jump, LSD's JVP in t and ESD's JVP in (s, x) along (μW − h)/(1 − s)."""
  apply_fn, params = net
  vocab, embedded = _spaces(apply_fn)
  tokens = jax.random.randint(jax.random.key(4), (BATCH, LENGTH), 0, VOCAB)
  gs, gu, gt = jnp.array([0.1, 0.2, 0.0, 0.5]), jnp.array([0.3, 0.4, 0.5, 0.6]), jnp.array([0.5, 0.6, 0.9, 0.7])

  def teacher(space):
    x = space.noisy_state(params, jax.random.key(5), tokens, gs)
    net_fn = lambda y, a, b: space.logits(params, y, a, b)
    embed = lambda p: space.embed_probs(params, p)
    if loss == "psd":
      return distill_losses.psd_teacher(net_fn, x, gs, gu, gt, embed=embed)
    fn = distill_losses.lsd_teacher if loss == "lsd" else distill_losses.esd_teacher
    return fn(net_fn, x, gs, gt, embed=embed)

  ref, got = teacher(vocab), teacher(embedded)
  assert float(jnp.max(jnp.abs(ref - jnp.mean(ref, -1, keepdims=True)))) > 1e-3  # not uniform
  # float32 through two contraction orders (xW inside the network vs h given): ESD's JVP reaches
  # 1.3e-5 on one entry of 960 with these weights
  _close(got, ref, atol=2e-5)


def test_chunked_statistics_and_gradients_match_full_logits():
  """CE, KL-to-teacher, Brier, argmax and ψW from vocab chunks (with a padded last chunk)."""
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.standard_normal((3, 5, 8)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((8, 37)), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(37), jnp.float32)
  w = jnp.asarray(rng.standard_normal((37, 6)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 37, (3, 5)))
  teacher = jax.nn.softmax(jnp.asarray(2 * rng.standard_normal((3, 5, 37)), jnp.float32), -1)

  def objective(hidden, kernel, bias, chunk):
    s = state_space.vocab_stats((hidden, None), (kernel, bias), chunk=chunk, tokens=tokens, teacher=teacher,
                                embedding=w)
    return (jnp.sum(state_space.cross_entropy(s)) + jnp.sum(state_space.kl_to_teacher(s, teacher))
            + jnp.sum(state_space.brier_score(s)) + jnp.sum(state_space.squared_distance_to_teacher(s, teacher))), s

  logits = hidden @ kernel + bias
  probs = jax.nn.softmax(logits, -1)
  for chunk in (10,):  # 4 chunks, the last one padded
    (_, s), grads = jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True)(hidden, kernel, bias, chunk)
    _close(state_space.cross_entropy(s), losses.cross_entropy(logits, tokens))
    _close(state_space.kl_to_teacher(s, teacher), distill_losses.kl_to_teacher(teacher, logits))
    _close(state_space.brier_score(s), losses.brier_score(probs, tokens))
    _close(state_space.squared_distance_to_teacher(s, teacher), jnp.sum(jnp.square(probs - teacher), -1))
    _close(s["mean_embedding"], probs @ w)
    np.testing.assert_array_equal(s["argmax"], jnp.argmax(logits, -1))

    def reference(hidden, kernel, bias):
      z = hidden @ kernel + bias
      p = jax.nn.softmax(z, -1)
      return (jnp.sum(losses.cross_entropy(z, tokens)) + jnp.sum(distill_losses.kl_to_teacher(teacher, z))
              + jnp.sum(losses.brier_score(p, tokens)) + jnp.sum(jnp.square(p - teacher)))

    for got, ref in zip(grads, jax.grad(reference, argnums=(0, 1, 2))(hidden, kernel, bias)):
      _close(got, ref, atol=1e-4)


# --- the noise: distribution and W-gradient -------------------------------------------------------

def _covariance_z_scores(samples, cov):
  """(sample cov − cov) / its standard error, entrywise: Var of a Gaussian sample covariance
  entry is (Σ_ii Σ_jj + Σ_ij²)/n."""
  n = samples.shape[0]
  emp = np.cov(samples.T)
  se = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
  return (emp - cov) / se


def test_cholesky_noise_has_the_law_of_projected_noise():
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.standard_normal((24, 5)) / 5.0, jnp.float32)
  w_t = w + jnp.asarray(0.3 * rng.standard_normal((24, 5)) / 5.0, jnp.float32)  # an EMA teacher's W
  n_samples = 40_000
  n, n_t = state_space.draw_noise(jax.random.key(0), (n_samples,), w, w_t)
  joint = np.concatenate([np.asarray(n), np.asarray(n_t)], axis=1).astype(np.float64)
  w_cat = np.concatenate([np.asarray(w), np.asarray(w_t)], axis=1).astype(np.float64)
  cov = w_cat.T @ w_cat
  # Mean 0 (z-scores of the means) and covariance [[WᵀW, WᵀW_t], [W_tᵀW, W_tᵀW_t]].
  mean_z = joint.mean(0) / np.sqrt(np.diag(cov) / n_samples)
  assert np.max(np.abs(mean_z)) < 4.5, mean_z
  z = _covariance_z_scores(joint, cov)
  assert np.max(np.abs(z)) < 5.0, np.max(np.abs(z))
  # Teeth: the covariance test rejects noise drawn with an identity factor (ξ itself).
  assert np.max(np.abs(_covariance_z_scores(np.asarray(jax.random.normal(jax.random.key(1), (n_samples, 5))),
                                            cov[:5, :5]))) > 10
  # Same ε, same W: the teacher's view is the student's (its own ε-part has no variance left).
  n, n_t = state_space.draw_noise(jax.random.key(2), (1000,), w, w)
  _close(n_t, n, atol=1e-4)


def _mc_gradient(loss_of_noise, draw, w, key, batches=12):
  """Mean and standard error, over independent batches, of ∇_W mean_i loss(noise_i)."""
  grad = jax.jit(jax.grad(lambda w, k: jnp.mean(loss_of_noise(*draw(k, w)))))
  g = np.stack([np.asarray(grad(w, k)) for k in jax.random.split(key, batches)])
  return g.mean(0), g.std(0, ddof=1) / np.sqrt(batches)


def test_noise_gradient_matches_the_vocab_path_in_expectation():
  """∇_W E[f(εW, stopgrad(g(εW_t)))]: Rao-Blackwellised Cholesky draws vs ε ∈ R^V (Stein: ≠ 0)."""
  rng = np.random.default_rng(2)
  vocab, d = 12, 4
  w = jnp.asarray(rng.standard_normal((vocab, d)) / 2.0, jnp.float32)
  w_t = w + jnp.asarray(0.5 * rng.standard_normal((vocab, d)) / 2.0, jnp.float32)
  a, b = jnp.asarray(rng.standard_normal(d), jnp.float32), jnp.asarray(rng.standard_normal(d), jnp.float32)
  base = lambda n, _: jnp.tanh(n @ a + 0.5)
  with_teacher = lambda n, n_t: jnp.tanh(n @ a + 0.5) * jax.lax.stop_gradient(jnp.tanh(n_t @ b) + 1.5)
  for f, teacher in ((base, None), (with_teacher, w_t)):
    draws = {mode: (lambda k, w, mode=mode: state_space.draw_noise(k, (20_000,), w, teacher, mode))
             for mode in ("project", "cholesky")}
    ref, ref_se = _mc_gradient(f, draws["project"], w, jax.random.key(3))
    got, got_se = _mc_gradient(f, draws["cholesky"], w, jax.random.key(4))
    assert np.max(np.abs(ref) / ref_se) > 8  # the V path's noise gradient is clearly non-zero
    z = (got - ref) / np.sqrt(ref_se**2 + got_se**2)
    assert np.max(np.abs(z)) < 4.5, z


# --- end to end -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _cached_trajectory(overrides):
  return run_steps(_config(**dict(overrides)))


def _config(**overrides):
  # V = 48 > D = 32, so "auto" picks the embedding path; one device (compiles fastest).
  return tiny_config(**{"data.markov.vocab_size": 48, "mesh.data": 1, **overrides})


@pytest.mark.slow
def test_training_gives_the_same_loss_trajectory_on_both_paths(cache_dir):
  ref, _ = _cached_trajectory((("model.state_space", "vocab"),))
  projected, _ = _cached_trajectory((("model.embedded_noise", "project"), ("model.vocab_chunk", 20)))
  np.testing.assert_allclose(projected, ref, rtol=1e-4)
  # The Cholesky draw is another sample of the same noise: same ballpark, not the same numbers.
  drawn, _ = _cached_trajectory(())
  assert np.all(np.isfinite(drawn)) and np.all(np.abs(drawn - ref) < 0.2 * ref)


# PSD in the default tier; LSD and ESD (one compile each) in the slow tier.
@pytest.mark.parametrize("loss", ["psd", pytest.param("lsd", marks=pytest.mark.slow),
                                  pytest.param("esd", marks=pytest.mark.slow)])
def test_consistency_loss_and_gradient_agree_between_paths(net, loss):
  """Each distillation loss with an EMA teacher (its own W, adaptive weighting on): the V-space
  reference with full logits against the vocabulary-chunked paths, in embedding space and in V-space,
  all fed the same ε. V = 40 in chunks of 16 leaves a padded last chunk. PSD's chunked teacher is
  a MixtureTeacher (no [B, L, V] array, issue 16); the reference builds it as full probabilities."""
  apply_fn, params = net
  teacher_params = jax.tree_util.tree_map(lambda p: 0.9 * p, params)
  config = _config(**{"objective": loss, "distill.mode": "joint",
                      "distill.adaptive_weighting": True})
  schedule = schedules.get_schedule("linear", VOCAB)
  tokens = jax.random.randint(jax.random.key(6), (BATCH, LENGTH), 0, VOCAB)
  results = []
  for kind, chunk in (("vocab", 0), ("embedding", 16), ("vocab", 16)):
    with config.unlocked():
      config.model.state_space, config.model.vocab_chunk, config.model.embedded_noise = kind, chunk, "project"
      config.model.d_model = CFG.d_model
    _, consistency = distill.make_losses(apply_fn, schedule, VOCAB, config)
    fn = jax.jit(jax.value_and_grad(consistency, has_aux=True))
    results.append(fn(params, teacher_params, tokens, jax.random.key(7), 0))
  (ref, _), ref_grad = results[0]
  assert float(ref) > 1e-3  # a teacher and student that disagree: the comparison has something to compare
  for (got, _), got_grad in results[1:]:
    _close(got, ref, rtol=1e-4)
    jax.tree_util.tree_map(lambda a, b: _close(a, b, atol=1e-4, rtol=1e-3), got_grad, ref_grad)


# --- precision and memory -------------------------------------------------------------------------

@pytest.mark.slow
def test_bfloat16_training_keeps_float32_weights_optimizer_and_sampler_state(cache_dir):
  losses_bf16, state = _cached_trajectory((("model.dtype", "bfloat16"), ("model.vocab_chunk", 20)))
  ref, _ = _cached_trajectory(())
  assert np.all(np.isfinite(losses_bf16)) and np.all(np.abs(losses_bf16 - ref) < 0.05 * ref)
  dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves((state["params"], state["opt_state"]))
            if jnp.issubdtype(leaf.dtype, jnp.floating)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  config = _config(**{"model.dtype": "bfloat16"})
  _, apply_fn = model_lib.build(model_lib.model_config_from(config, 48))
  space = state_space.from_config(apply_fn, 48, config)
  assert space.embedded
  _, mu_w = samplers.euler_sample(space.bind(jax.device_get(state["params"])), jax.random.key(0), (2, 16, 48),
                                  schedules.get_schedule("linear", 48), 3)
  assert mu_w.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(mu_w)))


def test_remat_policies_under_scan_give_the_same_gradients(net):
  _, params = net
  tokens = jax.random.randint(jax.random.key(8), (BATCH, LENGTH), 0, VOCAB)
  x = jax.nn.one_hot(tokens, VOCAB) + 0.1
  tau = jnp.full((BATCH,), 0.5)
  grads = {}
  for policy in model_lib.REMAT_POLICIES:
    _, apply_fn = model_lib.build(model_lib.ModelConfig(**{**CFG.__dict__, "remat": policy}))
    loss = lambda p, apply_fn=apply_fn: jnp.mean(losses.cross_entropy(apply_fn(p, x, tau, tau), tokens))
    grads[policy] = jax.jit(jax.grad(loss))(params)
  for policy in ("full", "dots"):
    jax.tree_util.tree_map(lambda a, b: _close(a, b, atol=1e-6), grads[policy], grads["none"])
