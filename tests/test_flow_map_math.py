"""Flow maps and their distillation teachers against the exact flow map of a toy (SPEC §3, §6).

The truth: for finite-support data the denoiser μ(x, γ) is exact, and integrating its velocity
with RK4 in float64 gives the exact flow map X_{s,t} and hence the exact ψ(x, s, t). A network
that IS that flow map must be a fixed point of every teacher; a perturbed one must not be.
Everything runs in float64 (scoped to this module, so other test files keep float32).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfmjax.flow import corruption, oracles, schedules
from cfmjax.objectives import distill_losses
from cfmjax.sampling import flow_map

TOY = oracles.random_finite_support(seed=3, num_sequences=5, length=2, vocab_size=3)
RK4_STEPS = 200  # in u = −log(1 − γ); the step is ≤ 0.01 for the test intervals (t ≤ 0.8)
SAMPLER_RK4_STEPS = 256  # for (0, 1): u runs to −log(1e-6) ≈ 14, where μ has long settled
T_MAX = 1.0 - 1e-6  # the RK4 map stops here; at t = 1 the velocity is 0/0, and ψ(x, s, 1 − 1e-6)
                    # differs from ψ(x, s, 1) only by μ's (negligible) motion over that last stretch


@pytest.fixture(autouse=True)
def _float64():
  with jax.enable_x64(True):
    yield


# --- the exact flow map ---------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames="num_steps")
def rk4_flow(x, gamma_s, gamma_t, num_steps=RK4_STEPS):
  """(X_{s,t}(x), ψ(x, s, t)) of the toy's exact flow, per example (γ's are [B]).

  Integrated in u = −log(1 − γ), where dx/du = μ(x, γ) − x has no 1/(1 − γ) blow-up. ψ is not read
  off X by (X − keep·x)/jump (cancellation when t − s is small) but integrated alongside: solving
  the linear ODE gives ψ = ∫ μ e^u du / ∫ e^u du over [u_s, u_t], a weighted average of μ along the
  path, so it stays on the simplex to rounding. Weights are carried as e^{u − u_t} ≤ 1 (no
  overflow). A `lax.scan`, so jax.jvp goes through it in x, s and t.
  """
  u_s, u_t = -jnp.log1p(-gamma_s), -jnp.log1p(-gamma_t)
  h = (u_t - u_s) / num_steps
  col = lambda a: a[:, None, None]

  def field(u, state):
    y, _, _ = state
    w = jnp.exp(u - u_t)
    mu = TOY.denoiser(y, -jnp.expm1(-u))
    return mu - y, col(w) * mu, w

  def step(state, i):
    u = u_s + i * h
    add = lambda st, k, c: jax.tree.map(lambda a, b: a + (col(c) if a.ndim == 3 else c) * b, st, k)
    k1 = field(u, state)
    k2 = field(u + 0.5 * h, add(state, k1, 0.5 * h))
    k3 = field(u + 0.5 * h, add(state, k2, 0.5 * h))
    k4 = field(u + h, add(state, k3, h))
    incr = jax.tree.map(lambda a, b, c, d: a + 2 * b + 2 * c + d, k1, k2, k3, k4)
    return add(state, incr, h / 6.0), None

  init = (x, jnp.zeros_like(x), jnp.zeros_like(gamma_s))
  (x_t, weighted_mu, weight), _ = jax.lax.scan(step, init, jnp.arange(num_steps))
  return x_t, weighted_mu / col(jnp.where(weight > 0, weight, 1.0))


def make_exact_net(num_steps=RK4_STEPS):
  """net(x, s, t) = log ψ_exact(x, s, t) for s < t and log μ(x, t) on the diagonal, in flow time."""

  def net(x, gamma_s, gamma_t):
    off = gamma_t > gamma_s
    # The RK4 branch is evaluated on every row; give diagonal rows a dummy interval so it stays finite.
    t = jnp.where(off, jnp.minimum(gamma_t, T_MAX), 0.5 * (1.0 + gamma_s))
    _, psi = rk4_flow(x, gamma_s, t, num_steps)
    probs = jnp.where(off[:, None, None], psi, TOY.denoiser(x, gamma_t))
    return jnp.log(jnp.maximum(probs, jnp.finfo(probs.dtype).tiny))

  return jax.jit(net)


EXACT_NET = make_exact_net()
SHIFT = np.random.default_rng(7).standard_normal((2, 3))


def perturbed(net, scale=1.3, shift=0.5):
  """The same diagonal, but an off-diagonal ψ that is sharpened and biased: no longer its flow map."""

  def bad(x, gamma_s, gamma_t):
    z = net(x, gamma_s, gamma_t)
    off = (gamma_t > gamma_s)[:, None, None]
    return jnp.where(off, scale * z + shift * jnp.asarray(SHIFT, z.dtype), z)

  return bad


TEACHERS = {
    "psd": lambda net, x, s, t: distill_losses.psd_teacher(net, x, s, distill_losses.midpoint(s, t), t),
    "lsd": distill_losses.lsd_teacher,
    "esd": distill_losses.esd_teacher,
}
PERTURBATION = {"exact": (1.0, 0.0), "perturbed": (1.3, 0.5)}  # (scale, shift) for perturbed()


@functools.partial(jax.jit, static_argnames="name")
def teacher_of(name, x, s, t, scale, shift):
  """A teacher built from perturbed(EXACT_NET, scale, shift); (1, 0) is the exact net itself.

  The perturbation is traced, so the exact and perturbed nets share one compilation per teacher.
  """
  return TEACHERS[name](perturbed(EXACT_NET, scale, shift), x, s, t)


def on_distribution_batch(seed, t_values=(0.5, 0.8), batch=16):
  """x_s = (1 − s) ε + s x1 with x1 from the toy, cycling through the pairs {0.1, 0.3} × t_values.

  One batch size everywhere, so each jitted function compiles once.
  """
  pairs = [(s, t) for s in (0.1, 0.3) for t in t_values]
  pairs = np.array([pairs[i % len(pairs)] for i in range(batch)])
  s, t = jnp.asarray(pairs[:, 0]), jnp.asarray(pairs[:, 1])
  k_data, k_noise = jax.random.split(jax.random.key(seed))
  idx = jax.random.choice(k_data, len(TOY.probs), (len(pairs),), p=jnp.asarray(TOY.probs))
  x1 = TOY.one_hot(jnp.float64)[idx]
  eps = jax.random.normal(k_noise, x1.shape, jnp.float64)
  return corruption.interpolate(eps, x1, s), s, t


# --- 1. the exact map itself ----------------------------------------------------------------------

def test_exact_flow_map_is_a_consistent_flow_map():
  x, s, t = on_distribution_batch(0)
  x_t, psi = rk4_flow(x, s, t)
  np.testing.assert_allclose(np.sum(psi, -1), 1.0, atol=1e-12)
  assert np.all(np.asarray(psi) >= 0)
  # The mean-denoiser form reproduces the ODE's endpoint ...
  np.testing.assert_allclose(flow_map.flow_map_update(x, psi, s, t), x_t, atol=1e-9)
  # ... and ψ read off the endpoint the textbook way agrees with the integrated average.
  keep = ((1 - t) / (1 - s))[:, None, None]
  np.testing.assert_allclose((x_t - keep * x) / (1 - keep), psi, atol=1e-9)
  # Semigroup: X_{u,t} ∘ X_{s,u} = X_{s,t}.
  u = distill_losses.midpoint(s, t)
  x_u = flow_map.flow_map_update(x, rk4_flow(x, s, u)[1], s, u)
  x_ut = flow_map.flow_map_update(x_u, rk4_flow(x_u, u, t)[1], u, t)
  np.testing.assert_allclose(x_ut, x_t, atol=1e-9)


def test_flow_map_update_endpoints():
  x = jnp.array([[[0.3, -1.0, 2.0]]])
  psi = jnp.array([[[0.2, 0.5, 0.3]]])
  np.testing.assert_allclose(flow_map.flow_map_update(x, psi, jnp.array([0.4]), jnp.array([0.4])), x)
  np.testing.assert_allclose(flow_map.flow_map_update(x, psi, jnp.array([0.4]), jnp.array([1.0])), psi)
  np.testing.assert_allclose(flow_map.flow_map_update(x, psi, jnp.array([1.0]), jnp.array([1.0])), x)
  # On the simplex it stays on the simplex.
  y = flow_map.flow_map_update(psi[:, :, ::-1], psi, jnp.array([0.2]), jnp.array([0.7]))
  np.testing.assert_allclose(jnp.sum(y, -1), 1.0)


# --- 2., 3. teachers: fixed point at the exact map, corrective elsewhere ---------------------------

# LSD is checked at t = 0.5 only: for later t see test_lsd_teacher_caps_psi_once_the_denoiser_has_decided.
T_VALUES = {"psd": (0.5, 0.8), "lsd": (0.5,), "esd": (0.5, 0.8)}


def _residual(name, which, seed):
  net = perturbed(EXACT_NET, *PERTURBATION[which])
  x, s, t = on_distribution_batch(seed, T_VALUES[name])
  teacher = teacher_of(name, x, s, t, *PERTURBATION[which])
  psi = jax.nn.softmax(net(x, s, t), axis=-1)
  np.testing.assert_allclose(np.sum(teacher, -1), 1.0, atol=1e-12)
  return float(jnp.max(jnp.abs(teacher - psi)))


@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_teacher_is_fixed_at_the_exact_flow_map(name):
  residual = max(_residual(name, "exact", seed) for seed in (1, 2))
  print(f"{name} exact residual {residual:.2e}")
  assert residual < 1e-7, residual


@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_teacher_corrects_a_perturbed_flow_map(name):
  residual = _residual(name, "perturbed", 1)
  print(f"{name} perturbed residual {residual:.2e}")
  assert residual > 1e-2, residual


def test_lsd_teacher_caps_psi_once_the_denoiser_has_decided():
  """Late in the flow the clamped LSD teacher is not ψ even for the exact map; this pins down why.

  The identity reads μ(X_{s,t}(x), t) = ψ · r with r = 1 + g δ. By t = 0.8 the toy's posterior has
  decided, so μ at the landing point is nearly one-hot while ψ (an average of μ along the whole
  path) still weights the other tokens: there r = μ/ψ is far below 1e-3 (down to 1e-10). The clamp
  r ≥ min_ratio then turns the teacher into normalise(min(ψ, μ(X_{s,t}(x), t)/min_ratio)): it caps
  ψ at 1/min_ratio times the landing-point denoiser, i.e. it pulls ψ toward the sharper μ. (No clamp
  does not rescue it: r would be needed to ~1e-10 absolute, beyond even this float64 oracle.)
  """
  x, s, t = on_distribution_batch(1, (0.8,))
  psi = jax.nn.softmax(EXACT_NET(x, s, t), axis=-1)
  mu_landing = TOY.denoiser(flow_map.flow_map_update(x, psi, s, t), t)
  capped = jnp.minimum(psi, mu_landing / 1e-3)
  capped = capped / jnp.sum(capped, -1, keepdims=True)
  teacher = teacher_of("lsd", x, s, t, *PERTURBATION["exact"])
  print(f"lsd exact residual at t = 0.8: {float(jnp.max(jnp.abs(teacher - psi))):.2e}")
  assert float(jnp.max(jnp.abs(teacher - psi))) > 1e-2
  np.testing.assert_allclose(teacher, capped, atol=1e-6)


# --- 4. the JVPs inside LSD and ESD ---------------------------------------------------------------

def test_time_derivative_matches_finite_differences():
  x, s, t = on_distribution_batch(3)
  _, dz = jax.jit(functools.partial(distill_losses.time_derivative, EXACT_NET))(x, s, t)
  h = 1e-5  # truncation ~h² z''' ≲ 1e-7 here, rounding ~1e-16 |z| / h ≲ 1e-9
  fd = (EXACT_NET(x, s, t + h) - EXACT_NET(x, s, t - h)) / (2 * h)
  np.testing.assert_allclose(dz, fd, rtol=1e-6, atol=1e-6)
  assert float(jnp.max(jnp.abs(dz))) > 1e-2  # not trivially zero


def test_material_derivative_matches_finite_differences():
  x, s, t = on_distribution_batch(4)
  mu = jax.nn.softmax(EXACT_NET(x, s, s), axis=-1)
  b = distill_losses.base_velocity(mu, x, s)
  _, dz = jax.jit(functools.partial(distill_losses.material_derivative, EXACT_NET))(x, s, t, b)
  h = 1e-5
  fd = (EXACT_NET(x + h * b, s + h, t) - EXACT_NET(x - h * b, s - h, t)) / (2 * h)
  np.testing.assert_allclose(dz, fd, rtol=1e-6, atol=1e-6)
  assert float(jnp.max(jnp.abs(dz))) > 1e-2


# --- degenerate pairs, float32, jit: with a small smooth stand-in network ------------------------

def smooth_net(x, gamma_s, gamma_t):
  """A differentiable (x, s, t) -> logits with no flow-map structure, for shape/dtype checks."""
  w = jnp.asarray(np.random.default_rng(0).standard_normal((3, 3)), x.dtype)
  s, t = gamma_s[:, None, None].astype(x.dtype), gamma_t[:, None, None].astype(x.dtype)
  return jnp.tanh(x @ w) * (1.0 + t - 0.5 * s) + 0.3 * (t - s) * x


@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_teachers_are_finite_on_the_diagonal_and_in_float32(name):
  rng = np.random.default_rng(1)
  x64 = jnp.asarray(rng.standard_normal((5, 2, 3)))
  s = jnp.array([0.2, 0.5, 0.7, 0.0, 1.0])
  t = jnp.array([0.6, 0.5, 0.9, 1.0, 1.0])  # rows 1 and 4 are diagonal, 3 is the (0, 1) pair
  teacher = jax.jit(functools.partial(TEACHERS[name], smooth_net))
  out64 = teacher(x64, s, t)
  out32 = teacher(x64.astype(jnp.float32), s.astype(jnp.float32), t.astype(jnp.float32))
  assert out64.dtype == jnp.float64 and out32.dtype == jnp.float32
  assert np.all(np.isfinite(out64)) and np.all(np.isfinite(out32))
  np.testing.assert_allclose(out32, out64, atol=1e-4)
  # On the diagonal (s = t = 1 included) every teacher is the denoiser itself.
  mu = jax.nn.softmax(smooth_net(x64, t, t), axis=-1)
  np.testing.assert_allclose(out64[1::3], mu[1::3], atol=1e-12)
  # A loss that masks out diagonal rows still has a finite gradient.
  off = (t > s)[:, None]
  loss = lambda logits: jnp.sum(jnp.where(off, distill_losses.kl_to_teacher(out32, logits), 0.0))
  assert np.all(np.isfinite(jax.grad(loss)(smooth_net(x64, s, t).astype(jnp.float32))))


# --- 5. the sampler -------------------------------------------------------------------------------

def _support_frequencies(tokens):
  tokens = np.asarray(tokens)
  return np.array([np.mean(np.all(tokens == seq[None], axis=1)) for seq in TOY.sequences])


def test_one_step_exact_flow_map_reproduces_the_toy_distribution():
  schedule = schedules.get_schedule("linear", TOY.vocab_size)
  exact = make_exact_net(SAMPLER_RK4_STEPS)
  as_flowmap_fn = lambda net: (lambda x, tau_s, tau_t: net(x.astype(jnp.float64), tau_s, tau_t))
  num = 3000
  sample = lambda net: flow_map.flowmap_sample(as_flowmap_fn(net), jax.random.key(0), (num, 2, 3),
                                               schedule, steps=1)
  tokens, psi = sample(exact)
  assert tokens.shape == (num, 2) and tokens.dtype == jnp.int32 and psi.dtype == jnp.float64
  freq = _support_frequencies(tokens)
  assert freq.sum() > 0.99, "samples left the support"
  tv = 0.5 * np.abs(freq - TOY.probs).sum()
  assert tv < 0.04, (tv, freq, TOY.probs)
  # One step lands on (nearly) one-hot points: the map has carried noise all the way to data.
  assert float(jnp.mean(jnp.max(psi, -1))) > 0.99
  # A biased map: it reads its input off by a fixed offset. (Perturbing ψ's logits would not do at
  # k = 1: ψ(x, 0, 1) is one-hot to within 1e-100, so no moderate logit shift moves its argmax.)
  offset = jnp.asarray(SHIFT)
  bad_tokens, _ = sample(lambda x, s, t: exact(x + offset, s, t))
  bad_tv = 0.5 * np.abs(_support_frequencies(bad_tokens) - TOY.probs).sum()
  print(f"one-step TV: exact {tv:.3f}, perturbed {bad_tv:.3f}")
  assert bad_tv > max(2 * tv, 0.08), (bad_tv, tv)


def test_sampler_steps_on_the_tau_grid_and_updates_in_gamma():
  """k steps on a non-linear schedule equal the hand-composed maps (τ to the net, γ to X)."""
  # γ = τ², tabulated like the real non-linear schedules (and cheaper to build than argmax).
  tau_table = np.linspace(0.0, 1.0, 101)
  schedule = schedules.Schedule("square", tau_table, tau_table**2)
  def flowmap_fn(x, tau_s, tau_t):
    return smooth_net(x, tau_s, tau_t) + 2.0 * tau_t[:, None, None] * x
  rng = jax.random.key(5)
  tokens, psi = flow_map.flowmap_sample(flowmap_fn, rng, (4, 2, 3), schedule, steps=4)
  assert psi.dtype == jnp.float32
  x = corruption.prior_sample(rng, (4, 2), 3)
  taus = [jnp.full((4,), v, jnp.float32) for v in (0.0, 0.25, 0.5, 0.75, 1.0)]
  for a, b in zip(taus[:-1], taus[1:]):
    expected_psi = jax.nn.softmax(flowmap_fn(x, a, b), axis=-1)
    x = flow_map.flow_map_update(x, expected_psi, schedule.gamma(a), schedule.gamma(b))
  np.testing.assert_allclose(psi, expected_psi, atol=1e-6)
  np.testing.assert_allclose(psi, x, atol=1e-6)  # the last step lands exactly on ψ
  np.testing.assert_array_equal(tokens, jnp.argmax(expected_psi, -1))


# --- 6. the loss ----------------------------------------------------------------------------------

def test_kl_to_teacher():
  rng = np.random.default_rng(2)
  teacher = jax.nn.softmax(jnp.asarray(3.0 * rng.standard_normal((4, 2, 5))), axis=-1)
  teacher = teacher.at[0, 0].set(jnp.array([0.0, 0.5, 0.5, 0.0, 0.0]))  # zeros: 0 log 0 = 0
  student = jnp.asarray(rng.standard_normal((4, 2, 5)))
  kl = distill_losses.kl_to_teacher(teacher, student)
  assert kl.shape == (4, 2) and np.all(np.asarray(kl) > 0)
  same = distill_losses.kl_to_teacher(teacher, jnp.log(jnp.maximum(teacher, 1e-300)))
  np.testing.assert_allclose(same, 0.0, atol=1e-12)
  grad = jax.grad(lambda z: jnp.sum(distill_losses.kl_to_teacher(teacher, z)))(student)
  np.testing.assert_allclose(grad, jax.nn.softmax(student, axis=-1) - teacher, atol=1e-12)
  # The teacher is a constant: no gradient flows into it.
  teacher_grad = jax.grad(lambda p: jnp.sum(distill_losses.kl_to_teacher(p, student)))(teacher)
  np.testing.assert_array_equal(teacher_grad, 0.0)
