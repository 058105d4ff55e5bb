"""Distillation stage: handoff across meshes, each loss runs, config errors, gradient surgery."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfmjax import objectives
from cfmjax.objectives import distill, frozen_teacher, loss_weights
from cfmjax.run import configs, experiment, export, handoff, loading, run_record
from cfmjax.training import train
from tests.conftest import REPO_ROOT as REPO
from tests.conftest import assert_same_tree, run_cli, tiny_config


def test_handoff_restores_the_base_ema_weights_exactly_onto_another_mesh(markov_base, tmp_path):
  """The base ran on a 2x2x2 mesh; the distillation starts on 8x1x1 from exactly its EMA weights
  (params and EMA alike), and a frozen teacher (guided here; fixed point keeps one the same way) is the
  base too."""
  base = str(markov_base[0])
  _, base_ema, step = loading.load(base)  # the base's EMA weights, on its own mesh
  assert step == 4
  base_ema = jax.device_get(base_ema)
  for guidance in (-1.0, 1.0):  # plain PSD; guided PSD, which keeps the base frozen beside the student
    config = configs.from_file(os.path.join(REPO, "experiments", "flow_map", "markov_tiny_psd.py"))
    with config.unlocked():
      config.init_from = base
      config.distill.guidance = guidance
      config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 8, 1, 1
    config, _ = handoff.inherit_base_config(config, str(tmp_path / f"psd_{guidance}"))
    exp = experiment.build(config, None)
    state = handoff.start_from_base(exp, experiment.init_state(exp, config.seed))
    for key in ("params", "ema_params"):
      got = state[key]
      network = {k: v for k, v in got.items() if k != loss_weights.PARAMS_KEY}
      assert set(network) == set(base_ema)
      assert_same_tree(network, base_ema)
      leaf = jax.tree_util.tree_leaves(network)[0]
      assert dict(leaf.sharding.mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert (frozen_teacher.STATE_KEY in state) == (guidance >= 0)
    if guidance >= 0:  # beside the parameters, not inside them: no EMA or optimizer copy of it
      assert_same_tree(state[frozen_teacher.STATE_KEY], base_ema)


def test_a_distillation_records_its_request_and_the_base_sections_apart(markov_base, tmp_path):
  """config.json keeps what was asked for; the base's sections go to run.json, and the loader merges
  them back (schema 4): the flow map loads with the base's model, without the base run."""
  workdir = tmp_path / "psd"
  request = configs.override(configs.from_file(os.path.join(REPO, "experiments", "flow_map", "markov_tiny_psd.py")),
                             {"init_from": str(markov_base[0]), "mesh.data": 8})
  asked = json.loads(request.to_json_best_effort())
  config, sections = handoff.inherit_base_config(request, str(workdir))
  assert json.loads(request.to_json_best_effort()) == asked  # left as written
  exp = experiment.build(config, None)
  (workdir / "checkpoints").mkdir(parents=True)  # as `cfmjax train` makes it
  run_record.write_config(request, str(workdir))
  run_record.append_start(exp, str(workdir), 0, sections)
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["d_model"] == asked["model"]["d_model"] != 32 and "vocab_size" not in saved["model"]
  assert loading.load_config(str(workdir)).model.d_model == exp.model_config.d_model == 32  # the base's
  assert loading.saved_vocab_size(str(workdir)) == exp.vocab_size == 12


def test_fixed_point_from_a_base_without_self_conditioning_is_refused_naming_the_key(markov_base, tmp_path):
  """Before the step compiles (it used to fail inside the first step with a model error)."""
  config = configs.from_file(os.path.join(REPO, "experiments", "conditional", "markov_tiny_fixed_point.py"))
  with config.unlocked():
    config.init_from = str(markov_base[0])
  config, _ = handoff.inherit_base_config(config, str(tmp_path / "fixed_point"))
  with pytest.raises(ValueError, match="trained with model.self_condition=False: train the base with "
                                       "--config.model.self_condition=True"):
    experiment.build(config, None)


@pytest.mark.slow
def test_cfmjax_train_runs_a_distillation_config_and_distill_refuses_a_base_one(markov_base, tmp_path):
  """The launchers run `cfmjax train` whatever the objective; `cfmjax distill` insists on one."""
  from tests.conftest import _in_repo  # noqa: PLC0415

  workdir = tmp_path / "psd"
  with _in_repo():
    printed, _ = run_cli("train", "--config=experiments/flow_map/markov_tiny_psd.py", f"--workdir={workdir}",
                         f"--config.init_from={markov_base[0]}", "--config.train.num_steps=2",
                         "--config.train.batch_size=16", "--config.train.log_every=1", "--config.mesh.data=8")
    assert "\ntrain done: " in "\n" + printed
    requested = json.loads((workdir / "config.json").read_text())
    assert requested["objective"] == "psd"
  # The model is the base run's (d_model 32), not the distill file's: config.json keeps the request,
  # run.json the sections taken from the base, and the loader reads both.
  (start,) = json.loads((workdir / "run.json").read_text())["starts"]
  assert start["from_base"]["model"]["d_model"] == 32 and start["vocab_size"] == 12
  assert requested["model"]["d_model"] != 32 and "vocab_size" not in requested["model"]
  assert loading.load_config(str(workdir)).model.d_model == 32
  # An export has no run.json: its config.json is the complete one, and its info holds the vocabulary.
  exp, params, step = loading.load(str(workdir))
  export.write(exp, params, step, str(workdir), str(tmp_path / "export"))
  assert json.loads((tmp_path / "export" / "config.json").read_text())["model"]["d_model"] == 32
  assert loading.saved_vocab_size(str(tmp_path / "export")) == 12
  with _in_repo(), pytest.raises(Exception, match="not a distillation: it is trained by `cfmjax train`"):
    run_cli("distill", "--config=experiments/base_flow/markov_tiny.py", f"--workdir={tmp_path / 'base'}")


@pytest.mark.slow
def test_handoff_from_a_different_mesh_and_each_loss_runs(markov_base, markov_psd, tmp_path):
  base = markov_base[0]
  # PSD through the command line (conftest.markov_psd), on a mesh of another shape than the base run's
  # (2x2x2 -> 8x1x1).
  psd, log = markov_psd
  assert "initialised from" in log
  out = tmp_path / "psd_eval"
  run_cli("eval", f"--checkpoint={psd}", f"--workdir={out}", "--sampler=flowmap", "--steps=1,2", "--num_samples=16")
  results = json.loads((out / "eval" / "results.json").read_text())
  assert [(r["sampler"], r["steps"]) for r in results] == [("flowmap", 1), ("flowmap", 2)]
  run_cli("sample", f"--checkpoint={psd}", f"--workdir={out}", "--sampler=flowmap", "--steps=2", "--renoise=0.5",
          "--num_samples=8")
  (samples,) = (out / "samples").glob("*.jsonl")
  assert samples.name == "flowmap_2steps_renoise0.5_ckpt2.jsonl"
  assert all(json.loads(l)["renoise"] == 0.5 for l in samples.read_text().splitlines())
  # LSD and ESD through the trainer on one device: a third layout, and a much cheaper compile of the JVPs.
  runs = {"psd": psd}
  for loss in ("lsd", "esd"):
    config = configs.from_file(os.path.join(REPO, "experiments", "flow_map", f"markov_tiny_{loss}.py"))
    config = configs.override(config, {"init_from": str(base), "train.num_steps": 2, "train.batch_size": 16,
                                       "train.log_every": 1, "mesh.data": 1})
    runs[loss] = tmp_path / loss
    train.train(config, str(runs[loss]), devices=jax.devices()[:1])
  for loss, workdir in runs.items():
    records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["consistency_kl"]) and r["consistency_kl"] >= 0 for r in records)
    (start,) = json.loads((workdir / "run.json").read_text())["starts"]
    assert start["from_base"]["model"]["d_model"] == 32 and start["vocab_size"] == 12


def _distill_config(**overrides):
  c = tiny_config(**{"objective": "psd", "distill.mode": "joint", **overrides})
  return c


@pytest.mark.slow
def test_joint_self_distillation_from_scratch(tmp_path, cache_dir):
  config = _distill_config(**{"objective": "esd", "distill.teacher": "student", "mesh.data": 1})
  last = train.train(config, str(tmp_path / "joint"), devices=jax.devices()[:1])
  assert np.isfinite(last["loss"]) and last["step"] == 4


@pytest.mark.parametrize("overrides,message", [
    ({"distill.mode": "two_stage"}, "needs --config.init_from"),
    ({"objective": "lsd", "model.attention": "cudnn"}, "does not support"),
    ({"objective": "xyz"}, "unknown objective='xyz'"),
    ({"objective": "esd", "distill.gradient_surgery": True}, "psd only"),
])
def test_bad_distill_configs_are_refused(overrides, message):
  c = _distill_config(**overrides)
  with pytest.raises(ValueError, match=message):
    objective = objectives.get(c)
    objective.validate(c)
    objective.base_run(c)  # where a distillation starts: a two-stage one needs its base run


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


def test_learned_weights_sit_at_log_of_the_loss():
  # exp(-w) L + w is minimised at w = log L: the gradient in w vanishes there and nowhere else.
  grad = jax.grad(lambda w: loss_weights.weighted(jnp.array(0.3), w))
  assert abs(float(grad(jnp.log(0.3)))) < 1e-6 and abs(float(grad(0.0))) > 0.5


@pytest.mark.slow
def test_learned_weights_train(tmp_path, cache_dir):
  config = _distill_config(**{"objective": "psd", "distill.learned_weighting": "st", "mesh.data": 1,
                              "train.num_steps": 3})
  last = train.train(config, str(tmp_path / "weighted"), devices=jax.devices()[:1])
  assert np.isfinite(last["loss"]) and "mean_log_weight" in last


def test_gap_curriculum_limits_the_jumps():
  s, _, t = distill.sample_time_pairs(jax.random.key(1), 5000, boundary_prob=0.0, max_gap=0.05)
  gaps = np.asarray(t - s)
  assert gaps.max() <= 0.05 + 1e-6 and gaps.min() > 0
