"""Gradient accumulation (train.grad_accum_steps): the same update in a fraction of the memory; and
the other step instrumentation of train.py: --profile_steps and the step-time breakdown."""

import json

import jax
import numpy as np
import optax
import pytest

from cfmjax.run import experiment
from cfmjax.training import train
from tests.conftest import TINY_FLAGS, _in_repo, run_cli, tiny_config

MESH = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}


def _grads(config, accum: int, rng):
  exp = experiment.build(config, None, devices=jax.devices())
  state = experiment.init_state(exp, 0)
  tokens = np.asarray(next(exp.data.train_iterator(config.train.batch_size, seed=0)))
  with exp.activate():
    fn = jax.jit(train.accumulate_grads(train.grad_fn_for(exp), accum, exp.batch_sharding))
    grads, metrics = fn(state["params"], train.global_batch(exp, tokens), rng, state["ema_params"], state["step"])
  return exp, state, tokens, jax.device_get(grads), jax.device_get(metrics)


def test_deterministic_objective_gives_the_full_batch_gradient(cache_dir):
  """The AR baseline's loss draws no noise, so 4 microbatches must give the full batch's gradient and
  loss to float tolerance, on a mesh that shards the batch four ways (1 row per shard and microbatch).
  (Parameters after Adam are not
  compared: its first steps are sign(g) · lr, which turns float noise in near-zero gradients into
  differences of a whole learning rate.)"""
  config = tiny_config(**{"objective": "ar", **MESH})
  *_, ref, ref_metrics = _grads(config, 1, jax.random.key(0))
  *_, got, metrics = _grads(config, 4, jax.random.key(0))
  norm = float(optax.tree.norm(ref))
  assert norm > 1e-3  # a gradient worth comparing
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * norm), got, ref)
  assert float(metrics["loss"]) == pytest.approx(float(ref_metrics["loss"]), rel=1e-6)


def test_noised_objective_averages_the_microbatches_gradients(cache_dir):
  """For the flow, microbatch m is rows m, m + k, ... with noise from fold_in(rng, m): the accumulated
  gradient is the mean of grad_fn on exactly those microbatches."""
  rng = jax.random.key(3)
  exp, state, tokens, got, metrics = _grads(tiny_config(**MESH), 2, rng)
  grad_fn = jax.jit(train.grad_fn_for(exp))
  with exp.activate():
    parts = jax.device_get([grad_fn(state["params"], train.global_batch(exp, tokens[m::2]),
                                    jax.random.fold_in(rng, m), state["ema_params"], state["step"])
                            for m in range(2)])
  want = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, parts[0][0], parts[1][0])
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), got, want)
  assert float(metrics["loss"]) == pytest.approx((float(parts[0][1]["loss"]) + float(parts[1][1]["loss"])) / 2,
                                                 rel=1e-5)


def test_batch_that_does_not_split_is_refused():
  with pytest.raises(ValueError, match=r"train.grad_accum_steps=3.*multiple of"):
    experiment.build(tiny_config(**{"train.grad_accum_steps": 3}), None, devices=jax.devices()[:1])


@pytest.mark.slow
def test_profile_steps_flag_and_step_time_breakdown(tmp_path, cache_dir):
  """`cfmjax train --profile_steps=2,3` with 2 microbatches per step: a trace is written, and every
  logged row splits the step time into data wait, compute, checkpointing and evaluation that add up to
  the measured step time."""
  workdir = tmp_path / "w"
  with _in_repo():
    run_cli("train", "--config=experiments/base_flow/markov_tiny.py", f"--workdir={workdir}", *TINY_FLAGS,
            "--config.data.markov.vocab_size=8", "--config.train.num_steps=4", "--config.train.grad_accum_steps=2",
            "--profile_steps=2,3")
  assert list((workdir / "profile").rglob("*.xplane.pb")), "no trace written"
  rows = [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for r in rows:
    parts = [r[f"time_{k}_s"] for k in ("data", "compute", "checkpoint", "eval")]
    assert min(parts) >= 0
    assert sum(parts) == pytest.approx(1.0 / r["steps_per_sec"], rel=1e-3)
  assert any(r["time_checkpoint_s"] > 0 for r in rows if r["step"] % 2 == 0)  # checkpoint_every=2


def test_profile_steps_are_checked_before_training(tmp_path):
  with pytest.raises(ValueError, match=r"train.profile_steps='3'"):
    train.train(tiny_config(**{"train.profile_steps": "3"}), str(tmp_path / "w"))
