"""Distillation stage: handoff across meshes, each loss runs, config errors, gradient surgery."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfmjax import distill, train
from tests.conftest import tiny_config
from tests.test_cli import TINY, cfmjax


def test_handoff_from_a_different_mesh_and_each_loss_runs(tmp_path, cache_dir):
  base = tmp_path / "base"
  env = {"CFMJAX_CACHE": str(cache_dir)}
  cfmjax("train", "--config=experiments/base_flow/markov_tiny.py", f"--workdir={base}", *TINY,
         "--config.train.num_steps=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", env_extra=env)
  # PSD through the command line, on a mesh of another shape than the base run's (2x2x2 -> 8x1x1).
  psd = tmp_path / "psd"
  proc = cfmjax("distill", "--config=experiments/flow_map/markov_tiny_psd.py", f"--workdir={psd}",
                f"--config.init_from={base}", "--config.train.num_steps=2", "--config.train.batch_size=16",
                "--config.train.log_every=1", "--config.mesh.data=8", env_extra=env)
  assert "initialised from" in proc.stderr
  cfmjax("eval", f"--workdir={psd}", "--sampler=flowmap", "--steps=1,2", "--num_samples=16", env_extra=env)
  results = json.loads((psd / "eval" / "results.json").read_text())
  assert [(r["sampler"], r["steps"]) for r in results] == [("flowmap", 1), ("flowmap", 2)]
  # LSD and ESD on a single-device process: a third layout, and a much cheaper compile of the JVPs.
  one_device = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  for loss in ("lsd", "esd"):
    cfmjax("distill", f"--config=experiments/flow_map/markov_tiny_{loss}.py", f"--workdir={tmp_path / loss}",
           f"--config.init_from={base}", "--config.train.num_steps=2", "--config.train.batch_size=16",
           "--config.train.log_every=1", env_extra=one_device)
  for loss in ("psd", "lsd", "esd"):
    records = [json.loads(l) for l in (tmp_path / loss / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["consistency_kl"]) and r["consistency_kl"] >= 0 for r in records)
    saved = json.loads((tmp_path / loss / "config.json").read_text())
    assert saved["model"]["d_model"] == 32  # inherited from the base run, not the distill file


def _distill_config(**overrides):
  c = tiny_config(**{"stage": "distill", "distill.mode": "joint", **overrides})
  return c


def test_joint_self_distillation_from_scratch(tmp_path, cache_dir):
  config = _distill_config(**{"distill.loss": "esd", "distill.teacher": "student", "mesh.data": 1})
  last = train.train(config, str(tmp_path / "joint"), devices=jax.devices()[:1])
  assert np.isfinite(last["loss"]) and last["step"] == 4


@pytest.mark.parametrize("overrides,message", [
    ({"distill.mode": "two_stage"}, "needs --config.init_from"),
    ({"distill.loss": "lsd", "model.attention": "cudnn"}, "does not support"),
    ({"distill.loss": "xyz"}, "unknown distill.loss"),
    ({"distill.loss": "esd", "distill.gradient_surgery": True}, "psd only"),
])
def test_bad_distill_configs_are_refused(overrides, message):
  with pytest.raises(ValueError, match=message):
    distill.validate(_distill_config(**overrides))


def test_gradient_surgery_removes_only_the_conflicting_component():
  g_diag = {"w": jnp.array([1.0, 0.0])}
  conflicting = {"w": jnp.array([-1.0, 1.0])}
  projected, applied = distill.project_conflict(conflicting, g_diag)
  np.testing.assert_allclose(projected["w"], [0.0, 1.0])
  assert bool(applied)
  agreeing = {"w": jnp.array([1.0, 1.0])}
  same, applied = distill.project_conflict(agreeing, g_diag)
  np.testing.assert_allclose(same["w"], agreeing["w"])
  assert not bool(applied)


def test_time_pairs_are_ordered_and_hit_the_boundary():
  s, u, t = distill.sample_time_pairs(jax.random.key(0), 10_000, boundary_prob=0.1)
  s, u, t = map(np.asarray, (s, u, t))
  assert np.all(s < t) and np.all(s <= u) and np.all(u <= t) and s.min() >= 0 and t.max() <= 1
  boundary = (s == 0) & (t == 1)
  assert 0.08 < boundary.mean() < 0.12


def test_learned_weights_train_and_sit_at_log_of_the_loss(tmp_path, cache_dir):
  from cfmjax import loss_weights  # noqa: PLC0415

  # exp(-w) L + w is minimised at w = log L: the gradient in w vanishes there and nowhere else.
  grad = jax.grad(lambda w: loss_weights.weighted(jnp.array(0.3), w))
  assert abs(float(grad(jnp.log(0.3)))) < 1e-6 and abs(float(grad(0.0))) > 0.5
  config = _distill_config(**{"distill.loss": "psd", "distill.learned_weighting": "st", "mesh.data": 1,
                              "train.num_steps": 3})
  last = train.train(config, str(tmp_path / "weighted"), devices=jax.devices()[:1])
  assert np.isfinite(last["loss"]) and "mean_log_weight" in last


def test_gap_curriculum_limits_the_jumps():
  s, _, t = distill.sample_time_pairs(jax.random.key(1), 5000, boundary_prob=0.0, max_gap=0.05)
  gaps = np.asarray(t - s)
  assert gaps.max() <= 0.05 + 1e-6 and gaps.min() > 0
