"""Training: sharding invariance, exact resume, NaN stop, config errors."""

import json
import os

import jax
import numpy as np
import pytest

from cfmjax.run import experiment, loading
from cfmjax.training import train
from tests.conftest import run_steps, tiny_config


def _losses(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _run_steps(config, devices, num_steps=3):
  """Per-step losses of a fresh run on `devices` with the mesh in `config`, and its parameters."""
  losses, state = run_steps(config, devices, num_steps)
  return losses, jax.device_get(state["params"])


def test_same_losses_on_one_device_and_on_8_device_meshes(cache_dir):
  assert jax.device_count() == 8
  ref, ref_params = _run_steps(tiny_config(), jax.devices()[:1])
  for data, fsdp, tensor in [(2, 1, 4), (1, 8, 1)]:
    cfg = tiny_config(**{"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor})
    got, params = _run_steps(cfg, jax.devices())
    np.testing.assert_allclose(got, ref, rtol=2e-5, err_msg=f"mesh {(data, fsdp, tensor)}")
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           params, ref_params)


def test_ar_gradient_at_one_row_per_shard_on_a_2x2x2_mesh(cache_dir):
  """One row per data shard on a mesh with data, fsdp and tensor axes: the AR's gradient equals the
  single-device one. It did not while the adaLN modulation was tensor-sharded: XLA's involuntary full
  rematerialisation of its split (tests/test_aot.py) gave wrong adaLN and embedding gradients with a
  right loss (jax 0.10.2, GSPMD and Shardy alike); the "modulation" sharding rule removed both."""
  grads = {}
  for name, mesh, devices in [("one", {}, jax.devices()[:1]),
                              ("2x2x2", {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}, jax.devices())]:
    config = tiny_config(**{"objective": "ar", "train.batch_size": 4, **mesh})
    exp = experiment.build(config, None, devices=devices)
    state = experiment.init_state(exp, 0)
    tokens = np.asarray(next(exp.data.train_iterator(4, seed=0)))
    with exp.activate():
      grads[name] = jax.device_get(jax.jit(train.grad_fn_for(exp))(
          state["params"], train.global_batch(exp, tokens), jax.random.key(0), state["ema_params"], state["step"])[0])
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         grads["2x2x2"], grads["one"])


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, cache_dir):
  """Stopping after step 2 and resuming gives the same losses at steps 3-4 as one straight run."""
  full = tmp_path / "full"
  train.train(tiny_config(), str(full))
  split = tmp_path / "split"
  train.train(tiny_config(**{"train.num_steps": 2}), str(split))
  assert sorted(_losses(split)) == [1, 2]
  train.train(tiny_config(), str(split))  # resumes from the step-2 checkpoint
  a, b = _losses(full), _losses(split)
  assert sorted(b) == [1, 2, 3, 4]
  for s in (3, 4):
    assert a[s] == pytest.approx(b[s], rel=1e-6), (s, a[s], b[s])
  # The data stream resumed too: a restart from scratch would replay batch 1 at step 3.
  assert a[3] != pytest.approx(a[1], rel=1e-3)


@pytest.mark.slow
def test_non_finite_loss_stops_naming_the_step(tmp_path, cache_dir):
  # Without the skip term: its zero-initialised head and float32 skip logits keep the loss finite
  # for longer than this test's few steps, and the test is about the stop, not the recipe.
  config = tiny_config(**{"optim.lr": 1e30, "optim.clip_norm": 1e30, "optim.warmup_steps": 1,
                          "train.num_steps": 6, "model.skip": False})
  with pytest.raises(train.NonFiniteLossError, match=r"at step \d"):
    train.train(config, str(tmp_path / "nan"))


def test_bad_batch_for_mesh_fails_before_compiling(cache_dir):
  config = tiny_config(**{"train.batch_size": 12, "mesh.data": 8})
  with pytest.raises(ValueError, match="not divisible by the 8 data-parallel shards"):
    experiment.build(config, None)


def test_mesh_larger_than_devices_is_refused(cache_dir):
  config = tiny_config(**{"mesh.data": 4, "mesh.fsdp": 4})
  with pytest.raises(ValueError, match="needs 16 devices but 8 are available"):
    experiment.build(config, None)


def test_build_reads_the_config_once_and_never_rewrites_it(cache_dir):
  """What a run derives (vocabulary, prompt flag, state space, mesh) lives in the experiment's typed
  views, not in the config: the config given is left as it was, and the experiment's is frozen."""
  config = tiny_config(**{"mesh.data": -1, "flow.prompt.max_len": 4, "data.markov.vocab_size": 40})
  asked = json.loads(config.to_json_best_effort())
  exp = experiment.build(config, None)
  assert json.loads(config.to_json_best_effort()) == asked == json.loads(exp.config.to_json_best_effort())
  assert (exp.vocab_size, exp.model_config.prompt_flag, exp.state_space_kind) == (40, True, "embedding")
  assert dict(exp.mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1} and exp.config.mesh.data == -1
  with pytest.raises(AttributeError, match="immutable"):
    exp.config.model.d_model = 64


def test_a_saved_mesh_that_does_not_fit_this_machine_is_replaced_for_loading_only():
  assert loading.mesh_for_this_machine({"data": 2, "fsdp": 2, "tensor": 2}) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert loading.mesh_for_this_machine({"data": 4, "fsdp": 4, "tensor": 1}) == {"data": -1, "fsdp": 1, "tensor": 1}


def test_a_checkpoint_of_another_model_layout_is_refused_naming_the_parameters(tmp_path):
  """Resuming with a model switch that adds parameters fails at once with the differing names and the
  fix, and the checkpoint is not set aside as damaged."""
  from cfmjax.run import checkpointing  # noqa: PLC0415

  train.train(tiny_config(**{"train.num_steps": 2}), str(tmp_path))
  with pytest.raises(checkpointing.TreeMismatchError, match=r"this model has parameters it lacks \(.*mix"):
    train.train(tiny_config(**{"train.num_steps": 4, "model.local_mix": 1}), str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
