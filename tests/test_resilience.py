"""Preemption and exact resumption, damaged checkpoints, numerical faults and bad configs.

Each fault is injected for real: signals go to a real training process, checkpoint files are
truncated or deleted on disk, NaNs are planted in one gradient group of the compiled step.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfmjax.run import checkpointing, experiment
from cfmjax.training import train
from tests.conftest import built_once, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A restore that fails part-way leaves Orbax's internal asyncio callbacks behind; harmless noise.
orbax_leftovers = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
DRIVER = os.path.join(REPO, "tests", "train_driver.py")


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if "loss" in r]


def _final_state(workdir, config):
  exp = experiment.build(config, None)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  step, state, data_state = ckpt.restore_latest(exp.abstract_state)
  ckpt.close()
  return step, jax.device_get(state), data_state


# ----------------------------------------------------------------------------------------------
# Preemption: a real SIGTERM, then a real SIGINT, to a real training process.

RUN = {"train.num_steps": 10, "train.checkpoint_every": 100, "train.keep_checkpoints": 10}


def _start(workdir, delay, run=RUN):
  env = dict(os.environ, JAX_PLATFORMS="cpu", CFMJAX_TEST_STEP_DELAY=str(delay))
  return subprocess.Popen([sys.executable, DRIVER, str(workdir), json.dumps(run)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _signal_after_step(proc, workdir, min_step, sig):
  """Waits until metrics.jsonl shows `min_step`, sends `sig`; returns (output, last logged step)."""
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(workdir / "metrics.jsonl") and any(r["step"] >= min_step for r in _records(workdir)):
      proc.send_signal(sig)
      break
    time.sleep(0.05)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, f"training exited {proc.returncode} after {sig.name}:\n{out[-4000:]}"
  return out, max(r["step"] for r in _records(workdir))


@pytest.mark.slow
@pytest.mark.parametrize("source", ["markov", "token_store"])
def test_sigterm_and_sigint_then_resume_equal_an_uninterrupted_run_bit_for_bit(tmp_path, cache_dir, source):
  run = dict(RUN)
  if source == "token_store":  # data/store.py: rows read by index through the keyed permutation
    from cfmjax.data import store  # noqa: PLC0415

    store.write_synthetic(str(tmp_path / "store"), 100, 16, vocab_size=64, heldout_rows=16)
    run.update({"data.source": "prepared", "data.prepared.path": str(tmp_path / "store")})
  straight = tmp_path / "straight"
  train.train(tiny_config(**run), str(straight))

  split = tmp_path / "split"
  out, stopped = _signal_after_step(_start(split, delay=0.4, run=run), split, 2, signal.SIGTERM)
  assert "received SIGTERM: wrote checkpoint at step" in out and stopped < 10, out[-2000:]
  assert checkpointing.Checkpointer(str(split / "checkpoints")).all_steps() == [stopped]

  out, stopped2 = _signal_after_step(_start(split, delay=0.4, run=run), split, stopped + 2, signal.SIGINT)
  assert f"resumed from step {stopped}" in out and "received SIGINT" in out, out[-2000:]
  assert stopped < stopped2 < 10
  train.train(tiny_config(**run), str(split))  # and on to the end

  # Metrics: every step logged once, and each value bit for bit the uninterrupted one.
  a, b = _records(straight), _records(split)
  assert [r["step"] for r in b] == list(range(1, 11))
  timing = {"steps_per_sec", "tokens_per_sec", "model_tflops_per_sec_per_device", "mfu"}  # wall-clock derived
  same = lambda r: {k: v for k, v in r.items() if k not in timing and not k.startswith("time_")}  # + the step-time split
  for ra, rb in zip(a, b):
    assert same(ra) == same(rb)
  # Final state: parameters, EMA, optimizer moments, step, and the data position, bit for bit.
  step_a, state_a, data_a = _final_state(straight, tiny_config(**run))
  step_b, state_b, data_b = _final_state(split, tiny_config(**run))
  assert step_a == step_b == 10 and data_a == data_b == {"next_index": 10}
  for x, y in zip(jax.tree_util.tree_leaves(state_a), jax.tree_util.tree_leaves(state_b)):
    np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints: each fault on a copy of one run with checkpoints at steps 2 and 4.


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
  build = lambda folder: train.train(tiny_config(), str(folder / "run"))  # 4 steps, checkpoints at 2 and 4
  return built_once(tmp_path_factory, "two_checkpoints", build) / "run"


def _array_files(step_dir):
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
  assert files, "no array data files found"
  return files


def _truncate_arrays(step_dir):
  for p in _array_files(step_dir):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _delete_arrays(step_dir):
  for p in _array_files(step_dir):
    p.unlink()


def _delete_metadata(step_dir):
  (step_dir / "state" / "_METADATA").unlink()
  (step_dir / "state" / "_sharding").unlink()


def _corrupt_data_state(step_dir):
  for p in (step_dir / "data").glob("*"):
    if p.is_file() and "commit" not in p.name:
      p.write_text('{"iterator": {"next_ind')


@orbax_leftovers
@pytest.mark.parametrize("damage", [_truncate_arrays, _delete_arrays, _delete_metadata, _corrupt_data_state])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(two_checkpoints, tmp_path, caplog, damage):
  workdir = tmp_path / "run"
  shutil.copytree(two_checkpoints, workdir)
  damage(workdir / "checkpoints" / "4")
  exp = experiment.build(tiny_config(), None)
  ckpt = checkpointing.Checkpointer(str(workdir / "checkpoints"))
  with caplog.at_level(logging.WARNING, logger="cfmjax"):
    step, _, data_state = ckpt.restore_latest(exp.abstract_state, global_batch=16)
  assert step == 2 and data_state == {"next_index": 2}
  assert ckpt.all_steps() == [2]  # the damaged one was set aside, so step 4 can be written again
  ckpt.close()
  # Only our own logger: an orbax read task left over from the previous case can log an asyncio error
  # later, and its text names that case's tmp dir ("test_damaged_...").
  warning = next(r.getMessage() for r in caplog.records
                 if r.name == "cfmjax.run.checkpointing" and "is damaged" in r.getMessage())
  assert "step 4" in warning and "falling back to step 2" in warning
  assert str(workdir / "checkpoints" / "4") in warning and str(workdir / "checkpoints" / "2") in warning
  assert any(n.startswith("damaged_4_") for n in os.listdir(workdir / "checkpoints"))


@orbax_leftovers
def test_a_run_resumes_past_a_damaged_checkpoint_and_an_interrupted_save(two_checkpoints, tmp_path, caplog):
  """Truncated arrays in step 4 plus a leftover tmp dir of a save that never finished (step 6)."""
  workdir = tmp_path / "run"
  shutil.copytree(two_checkpoints, workdir)
  _truncate_arrays(workdir / "checkpoints" / "4")
  leftover = workdir / "checkpoints" / "6.orbax-checkpoint-tmp-1234"
  shutil.copytree(workdir / "checkpoints" / "2", leftover)
  with caplog.at_level(logging.WARNING, logger="cfmjax"):
    train.train(tiny_config(**{"train.num_steps": 6}), str(workdir))
  messages = [r.getMessage() for r in caplog.records]
  assert any("6.orbax-checkpoint-tmp-1234" in m and "never completed" in m for m in messages)
  assert any("step 4" in m and "falling back to step 2" in m for m in messages)
  # Steps 3 and 4 were trained again from the step-2 checkpoint: the same losses as the first time.
  first = {r["step"]: r["loss"] for r in _records(two_checkpoints)}
  again = [r for r in _records(workdir) if r["step"] in (3, 4)][-2:]
  assert [r["loss"] for r in again] == [first[3], first[4]]
  assert checkpointing.Checkpointer(str(workdir / "checkpoints")).all_steps() == [2, 4, 6]


@orbax_leftovers
def test_undamaged_but_incompatible_checkpoints_are_not_set_aside(two_checkpoints, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(two_checkpoints, workdir)
  exp = experiment.build(tiny_config(**{"model.d_model": 48}), None)  # another model size
  ckpt = checkpointing.Checkpointer(str(workdir / "checkpoints"))
  with pytest.raises(RuntimeError, match="none of the checkpoints .* restores.*use a new --workdir"):
    ckpt.restore_latest(exp.abstract_state)
  assert ckpt.all_steps() == [2, 4]
  ckpt.close()


# ----------------------------------------------------------------------------------------------
# Numerical faults: NaN planted in one gradient group at one step.

POISON_STEP = 2  # the step number (1-based, as logged) whose gradient is poisoned


def _poison(group):
  """A grad_fn_for replacement that makes `group`'s gradient NaN at step POISON_STEP."""
  real = train.grad_fn_for

  def grad_fn_for(exp):
    grad_fn = real(exp)

    def poisoned(params, tokens, rng, ema_params, step, frozen_base=None):
      grads, metrics = grad_fn(params, tokens, rng, ema_params, step, frozen_base)
      hit = step + 1 == POISON_STEP
      grads = jax.tree_util.tree_map_with_path(
          lambda path, g: jnp.where(hit, jnp.nan, g) if jax.tree_util.keystr(path) == group else g, grads)
      return grads, metrics

    return poisoned

  return grad_fn_for


def _some_group(config):
  exp = experiment.build(config, None)
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(exp.abstract_state["params"])[0]]
  return paths[len(paths) // 2]


@orbax_leftovers
def test_nonfinite_gradient_stops_naming_step_and_group(tmp_path, cache_dir, monkeypatch):
  config = tiny_config(**{"train.log_every": 2})
  group = _some_group(config)
  monkeypatch.setattr(train, "grad_fn_for", _poison(group))
  with pytest.raises(train.NonFiniteLossError) as info:
    train.train(config, str(tmp_path / "nan"))
  message = str(info.value)
  assert f"non-finite gradient at step {POISON_STEP}" in message and group in message
  assert "on_nonfinite=skip" in message
  # (A non-finite *loss* from a huge learning rate: tests/test_training.py.)
  # Nothing spoiled was saved: the NaN step is caught before the step-2 checkpoint is written.
  assert checkpointing.Checkpointer(str(tmp_path / "nan" / "checkpoints")).all_steps() == []


@pytest.mark.slow
def test_skip_leaves_the_state_unchanged_and_counts(tmp_path, cache_dir, monkeypatch):
  config = tiny_config(**{"train.on_nonfinite": "skip"})
  group = _some_group(config)
  monkeypatch.setattr(train, "grad_fn_for", _poison(group))
  exp = experiment.build(config, None)
  step_fn = train.make_train_step(exp)
  it = exp.data.train_iterator(config.train.batch_size)
  state = experiment.init_state(exp, config.seed)
  history = []
  with exp.activate():
    for _ in range(3):
      state, metrics = step_fn(state, train.global_batch(exp, np.asarray(next(it))))
      history.append(jax.device_get((state, metrics)))
  (s1, _), (s2, m2), (s3, m3) = history
  for key in ("params", "ema_params", "opt_state"):
    for x, y in zip(jax.tree_util.tree_leaves(s1[key]), jax.tree_util.tree_leaves(s2[key])):
      np.testing.assert_array_equal(x, y)  # the poisoned update was dropped entirely
  assert (s1["skipped_steps"], s2["skipped_steps"], s3["skipped_steps"]) == (0, 1, 1)
  assert s2["step"] == 2 and m2["skipped_steps"] == 1 and not m2["grads_finite"].all()
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(s3["params"]),
                                                       jax.tree_util.tree_leaves(s2["params"])))
  assert m3["grads_finite"].all()  # step 3 is clean again and is applied

  # Through the trainer: the count is logged and survives in the checkpoint.
  train.train(config, str(tmp_path / "skip"))
  counts = [r["skipped_steps"] for r in _records(tmp_path / "skip")]
  assert counts == [0, 1, 1, 1]


# ----------------------------------------------------------------------------------------------
# Bad configs: each fails before anything is compiled, saying what to change. (A batch not divisible
# by the data axes and a mesh larger than the device count: tests/test_training.py.)


def _fails_fast(config, workdir, match, error=ValueError):
  def listing():
    return sorted(os.listdir(workdir / "checkpoints")) if (workdir / "checkpoints").exists() else []

  before = listing()
  with pytest.raises(error, match=match):
    train.train(config, str(workdir))
  assert listing() == before  # nothing was trained, saved or set aside


def test_unknown_flow_schedule(tmp_path):
  _fails_fast(tiny_config(**{"flow.schedule": "cubic"}), tmp_path / "w", "cubic")


def test_unknown_distillation_loss(tmp_path):
  config = tiny_config(**{"objective": "kl", "distill.mode": "joint"})
  _fails_fast(config, tmp_path / "w", r"unknown objective='kl'; choose one of")


def test_unknown_data_source(tmp_path):
  _fails_fast(tiny_config(**{"data.source": "wikipedia"}), tmp_path / "w", r"data.source must be one of")


def test_unknown_on_nonfinite(tmp_path):
  _fails_fast(tiny_config(**{"train.on_nonfinite": "ignore"}), tmp_path / "w",
              r"unknown train.on_nonfinite='ignore'")


def test_two_stage_distillation_without_init_from(tmp_path):
  config = tiny_config(**{"objective": "psd", "distill.mode": "two_stage"})
  _fails_fast(config, tmp_path / "w", r"needs --config.init_from=.*distill.mode='joint'")


def test_vocabulary_mismatch_with_checkpoints(two_checkpoints, tmp_path):
  """Resuming with another vocabulary, or distilling from a base run trained on another one."""
  workdir = tmp_path / "run"
  shutil.copytree(two_checkpoints, workdir)
  _fails_fast(tiny_config(**{"data.markov.vocab_size": 12}), workdir,
              r"vocabulary of 8 tokens, but this run's data/tokenizer gives 12")
  # A base run whose tokenizer no longer matches its checkpoints (here: its data config was edited
  # to a 12-token vocabulary after training with 8).
  saved = json.loads((workdir / "config.json").read_text())
  saved["data"]["markov"]["vocab_size"] = 12
  (workdir / "config.json").write_text(json.dumps(saved))
  config = tiny_config(**{"objective": "psd", "distill.mode": "two_stage", "init_from": str(workdir)})
  _fails_fast(config, tmp_path / "distill", r"init_from=.* vocabulary of 8 tokens, but this run's tokenizer gives 12")


def test_checkpoints_from_before_the_skip_counter_still_restore(tmp_path, cache_dir):
  """Workdirs written before `skipped_steps` existed resume (and distill/sample) with a zero count."""
  exp = experiment.build(tiny_config(), None)
  state = experiment.init_state(exp, 0)
  old_layout = {k: v for k, v in state.items() if k != "skipped_steps"}
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
  ckpt.save(3, old_layout, {"next_index": 3}, global_batch=16)
  ckpt.wait()
  step, restored, data_state = ckpt.restore_latest(exp.abstract_state, global_batch=16)
  ckpt.close()
  assert step == 3 and data_state == {"next_index": 3} and int(restored["skipped_steps"]) == 0
  assert restored["skipped_steps"].sharding == exp.state_shardings["skipped_steps"]
  np.testing.assert_array_equal(jax.device_get(restored["rng"]), jax.device_get(state["rng"]))
