"""Prompts, guidance, self-conditioning, fixed points and renoising (SPEC §8)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfmjax.flow import prompting, schedules
from cfmjax.models import model as model_lib, state_space
from cfmjax.objectives import distill_losses, fixed_point
from cfmjax.sampling import flow_map, samplers
from cfmjax.training import train
from tests.conftest import tiny_config

V, L, N = 5, 6, 4
SCHEDULE = schedules.get_schedule("linear", V)
PROMPT_TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, V, (N, L)), jnp.int32)
PROMPT_MASK = prompting.prefix_mask(jnp.array([0, 1, 3, 5]), L)  # a row without prompt, too
PROMPT = (PROMPT_TOKENS, PROMPT_MASK)
ONEHOT = jax.nn.one_hot(PROMPT_TOKENS, V)


def with_prompt(x):
  """The conditional state of a V-space flow: the prompt's one-hot at prompt positions."""
  return jnp.where(PROMPT_MASK[..., None], ONEHOT, x)


def toy_net(x, tau_s, tau_t, prompt_mask=None, self_cond=None):
  """A position-mixing network that would move every position if nothing held the prompt."""
  w = jnp.asarray(np.random.default_rng(1).standard_normal((V, V)), jnp.float32)
  mixed = x + 0.7 * jnp.roll(x, 1, axis=1) + (0.0 if self_cond is None else 0.5 * self_cond)
  flag = 0.0 if prompt_mask is None else 0.3 * prompt_mask[..., None]
  return 3.0 * jnp.tanh(mixed @ w + flag) * (1.0 + tau_s[:, None, None] + 0.5 * tau_t[:, None, None])


def recording(net, seen):
  """`net`, also recording (input, prompt_mask given?) of every call, through a host callback."""
  def wrapped(x, tau_s, tau_t, **kw):
    jax.debug.callback(lambda v, c: seen.append((np.asarray(v), bool(c))), x, "prompt_mask" in kw)
    return net(x, tau_s, tau_t, **kw)
  return wrapped


def _check_prompt_held(seen, allow_unconditional=False):
  assert seen
  mask = np.asarray(PROMPT_MASK)
  for x, conditional in seen:
    if conditional:
      np.testing.assert_array_equal(x[mask], np.asarray(ONEHOT)[mask])
    else:  # the guided sampler's unconditional pass: prompt positions read as 'unknown' (zeros)
      assert allow_unconditional
      np.testing.assert_array_equal(x[mask], 0.0)


@pytest.mark.parametrize("kind", ["euler", "euler_guided", "euler_selfcond", "flowmap", "flowmap_renoise"])
def test_prompt_positions_never_change_in_any_sampler(kind):
  seen = []
  net = recording(toy_net, seen)
  rng = jax.random.key(3)
  if kind.startswith("euler"):
    conditioning = samplers.Conditioning(PROMPT, 2.5 if kind == "euler_guided" else None, kind == "euler_selfcond")
    denoise = lambda x, tau, **k: net(x, tau, tau, **k)
    tokens, mu = samplers.euler_sample(denoise, rng, (N, L, V), SCHEDULE, steps=5, conditioning=conditioning)
  else:
    tokens, mu = flow_map.flowmap_sample(net, rng, (N, L, V), SCHEDULE, steps=3, conditioning=samplers.Conditioning(PROMPT),
                                         renoise=0.7 if kind == "flowmap_renoise" else 0.0)
  jax.effects_barrier()
  _check_prompt_held(seen, allow_unconditional=kind == "euler_guided")
  mask = np.asarray(PROMPT_MASK)
  np.testing.assert_array_equal(np.asarray(tokens)[mask], np.asarray(PROMPT_TOKENS)[mask])
  np.testing.assert_array_equal(np.asarray(mu)[mask], np.asarray(ONEHOT)[mask])
  # ... while generated positions did move away from the prompt's tokens somewhere.
  assert np.any(np.asarray(tokens)[~mask] != np.asarray(PROMPT_TOKENS)[~mask])


@pytest.mark.parametrize("teacher", ["psd", "lsd", "esd"])
def test_distillation_teachers_keep_the_prompt(teacher):
  """With the clamped network (as distill.py builds it) every teacher is the prompt's one-hot there."""
  seen = []
  inner = recording(toy_net, seen)
  net = lambda x, gs, gt: prompting.clamp_logits(inner(x, gs, gt, prompt_mask=PROMPT_MASK), *PROMPT)
  x = with_prompt(jax.random.normal(jax.random.key(4), (N, L, V)))
  gs, gt = jnp.full((N,), 0.2), jnp.full((N,), 0.8)
  if teacher == "psd":
    target = distill_losses.psd_teacher(net, x, gs, 0.5 * (gs + gt), gt)
  elif teacher == "lsd":
    target = distill_losses.lsd_teacher(net, x, gs, gt)
  else:
    target = distill_losses.esd_teacher(net, x, gs, gt)
  jax.effects_barrier()
  _check_prompt_held(seen)
  mask = np.asarray(PROMPT_MASK)
  np.testing.assert_allclose(np.asarray(target)[mask], np.asarray(ONEHOT)[mask], atol=1e-6)


def test_guidance_at_0_and_1_is_the_unconditional_and_conditional_sampler():
  rng = jax.random.key(5)
  denoise = lambda x, tau, **k: toy_net(x, tau, tau, **k)
  run = lambda fn, guidance=None: samplers.euler_sample(fn, rng, (N, L, V), SCHEDULE, steps=6,
                                                       conditioning=samplers.Conditioning(PROMPT, guidance))
  conditional = run(denoise)
  # The unconditional sampler: the same network never told the prompt (zeros there, no flag).
  blind = lambda x, tau, prompt_mask=None: toy_net(prompting.unconditional_input(x, PROMPT_MASK), tau, tau)
  unconditional = run(blind)
  for got, want in ((run(denoise, guidance=1.0), conditional), (run(denoise, guidance=0.0), unconditional)):
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
  # The two references do differ, and ω = 2 extrapolates: its first step's μ is 2 μ_c − μ_u.
  assert not np.array_equal(conditional[1], unconditional[1])
  x0 = with_prompt(jax.random.normal(rng, (N, L, V)))
  tau0 = jnp.zeros((N,))
  mu_c = jax.nn.softmax(prompting.clamp_logits(toy_net(x0, tau0, tau0, prompt_mask=PROMPT_MASK), *PROMPT))
  mu_u = jax.nn.softmax(prompting.clamp_logits(blind(x0, tau0), *PROMPT))
  space = state_space.StateSpace(lambda _, x, ts, tt, **kw: toy_net(x, ts, tt, **kw), V, prompt_flag=True)
  guided = space.probs(None, x0, tau0, tau0, prompt=PROMPT, guidance=2.0)  # the guided distillation target
  np.testing.assert_allclose(guided, 2.0 * mu_c - mu_u, atol=1e-6)


def _tiny_model(self_condition, prompt_flag=False):
  cfg = model_lib.ModelConfig(vocab_size=V, d_model=16, num_layers=1, num_heads=2, mlp_dim=32,
                              time_features=8, self_condition=self_condition, prompt_flag=prompt_flag)
  return model_lib.build(cfg)


def test_self_conditioned_model_with_zero_estimate_is_the_plain_network():
  init_sc, apply_sc = _tiny_model(True)
  _, apply_plain = _tiny_model(False)
  params = nn.meta.unbox(init_sc(jax.random.key(0), 1, L))
  assert np.all(np.asarray(params["self_cond_embed"]["kernel"]) == 0)  # zero-initialised
  # A trained projection (random here) must still vanish at μ̂ = 0: it is linear with no bias.
  params = dict(params, self_cond_embed={"kernel": jax.random.normal(jax.random.key(1), (V, 16))})
  plain_params = {k: v for k, v in params.items() if k != "self_cond_embed"}
  x = jax.random.normal(jax.random.key(2), (N, L, V))
  tau = jnp.linspace(0.1, 0.9, N)
  plain = apply_plain(plain_params, x, tau, tau)
  np.testing.assert_allclose(apply_sc(params, x, tau, tau), plain, atol=1e-6)
  np.testing.assert_allclose(apply_sc(params, x, tau, tau, self_cond=jnp.zeros_like(x)), plain, atol=1e-6)
  mu_hat = jax.nn.softmax(x, axis=-1)
  assert np.max(np.abs(apply_sc(params, x, tau, tau, self_cond=mu_hat) - plain)) > 1e-2  # the path is live
  with pytest.raises(ValueError, match="self_condition is False"):
    apply_plain(plain_params, x, tau, tau, self_cond=mu_hat)
  # Fed the embedded state h = xW, the network skips its first layer and nothing else changes.
  h = x @ model_lib.embedding_matrix(params)
  np.testing.assert_allclose(apply_sc(params, h, tau, tau, embedded=True), plain, atol=1e-5)
  # ... and μ̂ arrives projected as well, μ̂W_sc.
  np.testing.assert_allclose(apply_sc(params, h, tau, tau, embedded=True,
                                      self_cond=mu_hat @ model_lib.self_cond_matrix(params)),
                             apply_sc(params, x, tau, tau, self_cond=mu_hat), atol=1e-5)


def test_renoise_zero_is_the_deterministic_sampler_and_positive_renoise_is_not():
  rng = jax.random.key(6)
  tau_table = np.linspace(0.0, 1.0, 101)
  schedule = schedules.Schedule("square", tau_table, tau_table**2)
  tokens, psi = flow_map.flowmap_sample(toy_net, rng, (N, L, V), schedule, steps=4, renoise=0.0)
  # The deterministic k-step sampler, composed by hand (SPEC §3).
  x = jax.random.normal(rng, (N, L, V))
  taus = [jnp.full((N,), v, jnp.float32) for v in (0.0, 0.25, 0.5, 0.75, 1.0)]
  for a, b in zip(taus[:-1], taus[1:]):
    expected = jax.nn.softmax(toy_net(x, a, b), axis=-1)
    x = flow_map.flow_map_update(x, expected, schedule.gamma(a), schedule.gamma(b))
  # Equal up to float rounding (the sampler runs under lax.scan, the reference op by op).
  np.testing.assert_allclose(psi, expected, atol=1e-6)
  np.testing.assert_array_equal(tokens, jnp.argmax(expected, -1))
  _, psi_noisy = flow_map.flowmap_sample(toy_net, rng, (N, L, V), schedule, steps=4, renoise=0.5)
  assert np.max(np.abs(psi_noisy - expected)) > 1e-2
  with pytest.raises(ValueError, match="renoise"):
    flow_map.flowmap_sample(toy_net, rng, (N, L, V), schedule, steps=2, renoise=1.5)


def test_renoising_preserves_the_marginal_of_the_interpolant():
  """If x* ~ x_{t*} then renoise_to(x*) ~ x_t: checked on the mean and covariance of one token."""
  clean = jax.nn.one_hot(jnp.zeros((20000,), jnp.int32), 3)
  t_star, t = 0.8, 0.5
  x_star = (1 - t_star) * jax.random.normal(jax.random.key(7), clean.shape) + t_star * clean
  x_t = flow_map.renoise_to(jax.random.key(8), x_star, jnp.float32(t_star), jnp.float32(t))
  np.testing.assert_allclose(np.mean(x_t, 0), t * np.asarray(clean[0]), atol=0.01)
  np.testing.assert_allclose(np.cov(np.asarray(x_t).T), (1 - t) ** 2 * np.eye(3), atol=0.01)
  np.testing.assert_array_equal(flow_map.renoise_target(jnp.float32(0.3), 0.0), np.float32(0.3))  # exact
  np.testing.assert_allclose(flow_map.renoise_target(jnp.float32(0.3), 1.0), 1.0, rtol=1e-6)


@pytest.mark.slow
def test_fixed_point_iteration_converges_on_a_trained_self_conditioned_model(tmp_path, cache_dir):
  config = tiny_config(**{"model.self_condition": True, "train.num_steps": 150, "train.checkpoint_every": 150,
                          "train.log_every": 50, "optim.lr": 3e-3, "mesh.data": 1})
  train.train(config, str(tmp_path / "sc"), devices=jax.devices()[:1])
  from cfmjax.run import loading  # noqa: PLC0415
  exp, params, _ = loading.load(str(tmp_path / "sc"))
  assert np.max(np.abs(np.asarray(params["self_cond_embed"]["kernel"]))) > 0  # it learned to use μ̂
  tokens = exp.data.eval_rows(16)
  x = jax.random.normal(jax.random.key(9), tokens.shape + (exp.vocab_size,))
  gamma = jnp.full((16,), 0.5)
  x = (1 - gamma[:, None, None]) * x + gamma[:, None, None] * jax.nn.one_hot(tokens, exp.vocab_size)
  tau = exp.schedule.tau(gamma)
  denoise = lambda x, tau, **kw: exp.apply_fn(params, x, tau, tau, **kw)
  with exp.activate():
    mu, residuals = jax.jit(lambda x: fixed_point.iterate(lambda m: denoise(x, tau, self_cond=m), jnp.zeros_like(x), 8))(x)
  residuals = np.asarray(residuals)
  print("fixed-point residual per iteration (mean L1):", " ".join(f"{r:.2e}" for r in residuals))
  assert residuals[0] > 0.5  # the first estimate is far from μ_0 = 0 ...
  assert residuals[-1] < 1e-4 and residuals[-1] < 1e-3 * residuals[1]  # ... then it converges
  assert np.all(np.diff(residuals[1:]) <= 1e-7)


@pytest.mark.slow
def test_guided_distillation_target_is_the_guided_base():
  """The student's diagonal is trained toward the frozen base's μ_ω: a student equal to the base has
  zero loss at ω = 1 (μ_ω = μ_c, its own conditional output) and a positive one at ω = 2."""
  from cfmjax.objectives import distill  # noqa: PLC0415

  init_fn, apply_fn = _tiny_model(False, prompt_flag=True)
  params = init_fn(jax.random.key(0), 4, 12)
  # adaLN-zero starts every block switched off; perturb all weights so both passes are informative.
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree_util.tree_unflatten(tree, [w + 0.3 * jax.random.normal(k, w.shape) for w, k in zip(leaves, keys)])
  tokens = jax.random.randint(jax.random.key(2), (4, 12), 0, V)
  space = state_space.StateSpace(apply_fn, V, prompt_flag=True)
  loss = lambda p, omega: float(distill.guided_diagonal_loss(  # the frozen base is `params`
      p, params, tokens, jax.random.key(3), space=space, schedule=schedules.get_schedule("linear", V),
      guidance=omega, prompt=(2, 6))[0])
  assert loss(params, 1.0) < 1e-5
  assert loss(params, 2.0) > 1e-3
  # A student that drifts from the base pays at ω = 1 too (the check can fail).
  drifted = dict(params, head=jax.tree_util.tree_map(lambda w: w + 0.5 * jnp.sign(w), params["head"]))
  assert loss(drifted, 1.0) > 1e-3
