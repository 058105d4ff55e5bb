"""A float64 sampler state (sample.precision, samplers.py): the state and updates widen, the network
keeps its dtype, and x64 does not leak out of the sampler's scope."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfmjax.flow import oracles, schedules
from cfmjax.sampling import flow_map, samplers


def _setup():
  toy = oracles.random_finite_support(seed=0, num_sequences=5, length=2, vocab_size=3, concentration=1.0)
  schedule = schedules.get_schedule("linear", toy.vocab_size)
  seen = []

  def denoise(x, tau, *_):
    seen.append((x.dtype, tau.dtype, bool(jax.config.jax_enable_x64)))  # at trace time
    return toy.denoiser_logits(x, schedule.gamma(tau)).astype(jnp.float32)

  return toy, schedule, denoise, seen


def _run(sampler, precision, **kw):
  with samplers.x64_scope(precision):
    fn = jax.jit(lambda rng: sampler(rng, precision))
    jaxpr = str(jax.make_jaxpr(lambda rng: sampler(rng, precision))(jax.random.key(0)))
    tokens = np.asarray(fn(jax.random.key(0))[0])
  return tokens, jaxpr


@pytest.mark.parametrize("kind", ["euler", "flowmap", "flowmap_renoise"])
def test_float64_state_keeps_the_network_in_float32_and_does_not_leak(kind):
  toy, schedule, denoise, seen = _setup()
  num, steps = 512, 64
  if kind == "euler":
    sampler = lambda rng, p: samplers.euler_sample(denoise, rng, (num, 2, 3), schedule, steps, precision=p)
  else:
    eta = 0.5 if kind == "flowmap_renoise" else 0.0
    jump = lambda x, tau_s, tau_t: denoise(x, tau_s)  # ψ(x, s, t) = μ(x, s): Euler as a flow map
    sampler = lambda rng, p: flow_map.flowmap_sample(jump, rng, (num, 2, 3), schedule, steps, renoise=eta, precision=p)
  narrow, jaxpr32 = _run(sampler, "float32")
  seen.clear()
  wide, jaxpr64 = _run(sampler, "float64")
  assert not jax.config.jax_enable_x64 and jnp.zeros(1).dtype == jnp.float32  # nothing leaked
  assert seen and all(s == (jnp.float32, jnp.float32, False) for s in seen), seen  # the network: f32, x64 off
  assert f"f64[{num},2,3]" in jaxpr64 and "f64" not in jaxpr32  # the state itself is float64
  # The same draws and the same network: the samples differ only where rounding flips a token.
  assert np.mean(np.all(narrow == wide, axis=1)) > 0.9
  freq = np.array([np.mean(np.all(wide == s[None], axis=1)) for s in toy.sequences])
  assert freq.sum() > 0.99


def test_float64_euler_matches_float64_flowmap_of_the_denoiser():
  _, schedule, denoise, _ = _setup()
  euler = lambda rng, p: samplers.euler_sample(denoise, rng, (256, 2, 3), schedule, 16, precision=p)
  jump = lambda x, tau_s, tau_t: denoise(x, tau_s)
  fm = lambda rng, p: flow_map.flowmap_sample(jump, rng, (256, 2, 3), schedule, 16, precision=p)
  np.testing.assert_array_equal(_run(euler, "float64")[0], _run(fm, "float64")[0])


def test_float64_needs_the_x64_scope():
  _, schedule, denoise, _ = _setup()
  with pytest.raises(ValueError, match="x64"):
    samplers.euler_sample(denoise, jax.random.key(0), (4, 2, 3), schedule, 4, precision="float64")
  with pytest.raises(ValueError, match="precision"):
    samplers.euler_sample(denoise, jax.random.key(0), (4, 2, 3), schedule, 4, precision="bfloat16")
