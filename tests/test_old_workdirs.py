"""Workdirs written by older cfmjax keep working (schema.py): tests/golden/workdir_v<k>/ holds a tiny
run as the code of schema version k wrote it, and each is sampled, evaluated and resumed by today's.

workdir_v0 (main at 62c2607, before the schema), workdir_v1 (6d46e27, before `objective` replaced
stage / model.causal / distill.loss), workdir_v2 (dfb90d5, before the frozen teacher of guided and
fixed-point distillation left the parameters) and workdir_v3 (4050cf6, before config.json stopped
holding derived values and a distillation's base sections): each is the shared tiny base of conftest.markov_base
(experiments/base_flow/markov_tiny.py, V = 12, the TINY_FLAGS sizes, 2x2x2 mesh, 4 steps; its step-2
checkpoint dropped to keep the fixture small) and a PSD map distilled from it for 2 steps on an 8x1x1
mesh, as conftest.markov_psd does. The same shapes as those fixtures, so their compiled programs are
shared through the compile cache. workdir_v2 also holds a fixed-point run (2 steps, 8x1x1) distilled
from a 2-step self-conditioned base of the same sizes, sc_base; workdir_v3 also holds prompt_base, a
2-step base of experiments/conditional/markov_tiny_prompt.py (flow.prompt.max_len = 4, 8x1x1).
"""

import json
import pathlib
import shutil

import numpy as np
import pytest

import jax
import orbax.checkpoint as ocp

from cfmjax.data.markov import MarkovSource
from cfmjax.objectives import frozen_teacher
from cfmjax.run import checkpointing, loading, schema
from tests.conftest import TINY_FLAGS, assert_same_tree, run_cli

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden"
VERSIONS = sorted(int(p.name.removeprefix("workdir_v")) for p in GOLDEN.glob("workdir_v*"))
# The newest fixture is sampled and evaluated in the default tier, the older ones in the slow tier
# (pytest.ini: later variants of a compile-heavy check are slow).
BY_AGE = [pytest.param(v, marks=() if v == VERSIONS[-1] else pytest.mark.slow) for v in VERSIONS]


def _copy(version, tmp_path):
  """A writable copy of the fixture (sampling, evaluating and resuming write into a workdir)."""
  root = tmp_path / f"v{version}"
  shutil.copytree(GOLDEN / f"workdir_v{version}", root)
  return root / "base", root / "psd"


def test_there_is_a_fixture_for_every_version_before_this_one():
  assert VERSIONS == list(range(schema.VERSION))


@pytest.mark.parametrize("version", BY_AGE)
def test_an_old_workdir_samples_and_evaluates(version, tmp_path, session_cache):
  base, psd = _copy(version, tmp_path)
  saved = json.loads((base / "config.json").read_text())
  assert saved.get(schema.KEY, 0) == version  # the fixture is what that version wrote
  config = loading.load_config(str(base))
  assert schema.KEY not in config and config.model.skip == saved["model"].get("skip", False)
  assert (config.objective, loading.load_config(str(psd)).objective) == ("flow", "psd")  # migrated
  assert "stage" not in config and "causal" not in config.model and "loss" not in config.distill

  run_cli("sample", f"--workdir={base}", "--steps=2", "--num_samples=16", "--batch_size=16")
  run_cli("eval", f"--workdir={base}", "--steps=2", "--num_samples=16", "--batch_size=16")
  record, exact = json.loads((base / "eval" / "results.json").read_text())
  assert (record["sampler"], exact["sampler"], record["judge"]) == ("euler", "euler_exact", "exact")
  # The record's gen NLL is the chain's exact NLL of the same samples (`sample` and `eval` draw the
  # same rows for the same seed, count and batch), scored here by the chain rebuilt from config.json.
  m = saved["data"]["markov"]
  chain = MarkovSource(m["vocab_size"], m["order"], m["concentration"], m["seed"])
  (samples,) = (base / "samples").glob("*.jsonl")
  tokens = np.array([json.loads(line)["tokens"] for line in samples.read_text().splitlines()])
  assert tokens.shape == (16, 16)
  assert record["gen_nll_per_token"] == pytest.approx(-chain.log_likelihood(tokens).sum() / tokens.size, rel=1e-9)

  run_cli("sample", f"--workdir={psd}", "--sampler=flowmap", "--steps=2", "--num_samples=8")
  (samples,) = (psd / "samples").glob("*.jsonl")
  rows = [json.loads(line)["tokens"] for line in samples.read_text().splitlines()]
  assert len(rows) == 8 and all(len(r) == 16 and all(0 <= t < 12 for t in r) for r in rows)


def test_a_checkpoint_from_a_newer_cfmjax_is_refused_by_name(tmp_path):
  base, _ = _copy(VERSIONS[-1], tmp_path)
  metadata = base / "checkpoints" / "4" / "data" / "metadata"
  data = json.loads(metadata.read_text())
  metadata.write_text(json.dumps(dict(data, **{schema.KEY: schema.VERSION + 1})))
  with pytest.raises(ValueError, match=f"schema_version={schema.VERSION + 1}, written by a newer cfmjax"):
    loading.load(str(base))


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_an_old_workdir_resumes_training(version, tmp_path, session_cache):
  base, _ = _copy(version, tmp_path)
  args = ["train", "--config=experiments/base_flow/markov_tiny.py", f"--workdir={base}",
          "--config.data.markov.vocab_size=12", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", *TINY_FLAGS]
  from tests.conftest import _in_repo  # noqa: PLC0415
  with _in_repo():
    _, log = run_cli(*args, "--config.train.num_steps=6")
  assert "resumed from step 4" in log or "resuming from step 4" in log, log[-2000:]
  records = [json.loads(line) for line in (base / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in records if "loss" in r]
  assert steps == [1, 2, 3, 4, 5, 6] and all(np.isfinite(r["loss"]) for r in records if "loss" in r)
  assert json.loads((base / "config.json").read_text())[schema.KEY] == schema.VERSION  # rewritten as today's


def test_a_v3_workdir_reads_its_derived_values_as_today_s(tmp_path):
  """Schema 3 wrote model.vocab_size and model.prompt_flag into config.json, and a distillation's
  config.json held its base's sections. Read today, the keys are gone and the values are derived as a
  fresh run derives them; the distillation still loads with the base's model."""
  root = tmp_path / "v3"
  shutil.copytree(GOLDEN / "workdir_v3", root)
  saved = json.loads((root / "prompt_base" / "config.json").read_text())
  assert saved[schema.KEY] == 3 and saved["model"]["prompt_flag"] and saved["model"]["vocab_size"] == 12
  config = loading.load_config(str(root / "prompt_base"))
  assert "vocab_size" not in config.model and "prompt_flag" not in config.model
  exp, params, step = loading.load(str(root / "prompt_base"))
  assert (exp.vocab_size, exp.model_config.prompt_flag, step) == (12, True, 2)
  assert "prompt_embed" in params  # the prompt flag's learned vector
  assert loading.saved_vocab_size(str(root / "base")) == 12
  psd = loading.load_config(str(root / "psd"))
  assert psd.model.d_model == 32 and psd.objective == "psd"  # the base's sections, from its own config.json
  assert not loading.load(str(root / "base"))[0].model_config.prompt_flag


def _saved_state(step_dir):
  """A checkpoint's state tree exactly as written (no target: today's layout does not shape it)."""
  return jax.device_get(ocp.PyTreeCheckpointer().restore(str(step_dir / "state")))


def test_a_v2_fixed_point_run_restores_with_its_frozen_teacher_beside_the_parameters(tmp_path):
  """Schema 2 kept the frozen base inside the parameters, with EMA and Adam copies of it; today's state
  holds it once, beside them. The migration moves the saved teacher out and drops its copies."""
  run = tmp_path / "fixed_point"
  shutil.copytree(GOLDEN / "workdir_v2" / "fixed_point", run)
  saved = _saved_state(run / "checkpoints" / "2")
  assert frozen_teacher.STATE_KEY in saved["params"] and frozen_teacher.STATE_KEY in saved["ema_params"]

  exp, ema, step = loading.load(str(run))
  assert step == 2 and frozen_teacher.STATE_KEY not in ema
  assert_same_tree(ema, {k: v for k, v in saved["ema_params"].items() if k != frozen_teacher.STATE_KEY})
  state, _ = checkpointing.Checkpointer(str(run / "checkpoints")).restore(2, exp.abstract_state)
  assert_same_tree(jax.device_get(state[frozen_teacher.STATE_KEY]), saved["params"][frozen_teacher.STATE_KEY])
  assert_same_tree(jax.device_get(state["params"]),
               {k: v for k, v in saved["params"].items() if k != frozen_teacher.STATE_KEY})
  # The optimizer state is today's: moments of the trained parameters only.
  assert (jax.tree_util.tree_structure(state["opt_state"])
          == jax.tree_util.tree_structure(exp.abstract_state["opt_state"]))
  teacher_leaves = len(jax.tree_util.tree_leaves(state[frozen_teacher.STATE_KEY]))
  assert len(jax.tree_util.tree_leaves(saved["opt_state"])) - len(jax.tree_util.tree_leaves(state["opt_state"])) \
      == 2 * teacher_leaves  # Adam's two moments of the teacher, gone


@pytest.mark.slow
def test_a_v2_fixed_point_run_resumes_with_its_teacher_unchanged(tmp_path):
  root = tmp_path / "v2"
  shutil.copytree(GOLDEN / "workdir_v2", root)
  run = root / "fixed_point"
  teacher = _saved_state(run / "checkpoints" / "2")["params"][frozen_teacher.STATE_KEY]
  from tests.conftest import _in_repo  # noqa: PLC0415
  with _in_repo():
    _, log = run_cli("distill", "--config=experiments/conditional/markov_tiny_fixed_point.py", f"--workdir={run}",
                     f"--config.init_from={root / 'sc_base'}",  # the fixture's base moved with it
                     "--config.train.num_steps=4", "--config.train.batch_size=16", "--config.train.log_every=1",
                     "--config.train.checkpoint_every=2", "--config.mesh.data=8")
  assert "resumed from step 2" in log or "resuming from step 2" in log, log[-2000:]
  losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
  assert len(losses) == 4 and all(np.isfinite(losses))
  resumed = _saved_state(run / "checkpoints" / "4")
  assert frozen_teacher.STATE_KEY not in resumed["params"]  # written as today's
  assert_same_tree(resumed[frozen_teacher.STATE_KEY], teacher)  # two more steps did not move it
