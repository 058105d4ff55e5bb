"""Orbax checkpoints of the whole training state plus the data iterator's position.

Each step directory holds two items:
  state: params, EMA params, optimizer state, step and the base RNG key (sharded arrays, written
         collectively by every process; restorable onto any mesh by passing target shardings),
  data:  the data iterator's state as JSON, with the process count and global batch size it was
         written under. The stream of global batches is the same on every process (see
         data/pipeline.py), so one copy serves all processes, and any process count can resume it.
Saves are asynchronous: training continues while the previous checkpoint is written, and Orbax
only marks a step complete (atomic rename) once every file is on disk, so a crash mid-save never
leaves a checkpoint that looks valid.

Damage that happens after that (a truncated or deleted array file, lost metadata, a save
interrupted before its rename) is caught by `restore_latest`: it warns, moves the bad directory
aside (to `damaged_<name>_<time>`, kept for inspection) and falls back to the previous good step.

With train.best_metric, `BestCheckpoint` also keeps, in `<workdir>/best/`, the one state whose
in-training diagnostic (lower is better) was the lowest so far; `--checkpoint_step=best` loads it.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from cfmjax.objectives import frozen_teacher
from cfmjax.run import schema

log = logging.getLogger(__name__)

# Orbax writes a step into "<step>.orbax-checkpoint-tmp-<id>" and renames it when complete.
_TMP_MARKER = ".orbax-checkpoint-tmp"


class BatchSizeMismatchError(ValueError):
  pass


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0][:300] if text else ""


# State entries that checkpoints written by older versions lack; they restore as zeros.
_ADDED_STATE_KEYS = ("skipped_steps",)


def _saved_tree_keys(step_dir: str) -> dict | None:
  """The state item's tree metadata (keys are reprs of path tuples), or None when unreadable (the
  restore itself then reports the damage)."""
  try:
    with open(os.path.join(step_dir, "state", "_METADATA")) as f:
      return json.load(f)["tree_metadata"]
  except (OSError, ValueError, KeyError):
    return None


def _check_schema(step_dir: str):
  """Refuses a checkpoint written by a newer cfmjax (schema.py) before Orbax misreads its tree."""
  try:
    with open(os.path.join(step_dir, "data", "metadata")) as f:
      data = json.load(f)
  except (OSError, ValueError):
    return  # unreadable: the restore itself reports the damage
  if isinstance(data, dict):
    try:
      schema.check_checkpoint(data, f"checkpoint {step_dir}")
    except ValueError as e:
      raise TreeMismatchError(str(e)) from None


def _keys_added_since(saved: dict | None, abstract_state) -> list[str]:
  if saved is None:
    return []
  return [k for k in _ADDED_STATE_KEYS if k in abstract_state and repr((k,)) not in saved]


class TreeMismatchError(ValueError):
  """The checkpoint's parameters are not this model's: a config difference, not damage."""


def _teacher_inside_params(saved: dict | None, abstract_state) -> bool:
  """A checkpoint of schema version 2 or older that kept the frozen teacher of guided / fixed-point
  distillation inside the parameters (params[frozen_teacher.STATE_KEY], with EMA and Adam copies of
  it), restored for a state that keeps it beside them (frozen_teacher.py)."""
  return (saved is not None and frozen_teacher.STATE_KEY in abstract_state
          and any(key[:2] == ("params", frozen_teacher.STATE_KEY) for key in map(ast.literal_eval, saved)))


def _param_paths_mismatch(saved: dict | None, abstract_state) -> str | None:
  """None when the checkpoint holds exactly this model's parameter names, else a description."""
  if saved is None:
    return None
  saved_paths = {key for key in (ast.literal_eval(k) for k in saved)
                 if key[:1] == ("params",) and key[1:2] != (frozen_teacher.STATE_KEY,)}
  model_paths = {("params", *(getattr(p, "key", str(p)) for p in path))
                 for path, _ in jax.tree_util.tree_flatten_with_path(abstract_state["params"])[0]}
  if not saved_paths or saved_paths == model_paths:
    return None
  fmt = lambda paths: ", ".join("/".join(p[1:]) for p in sorted(paths)[:4]) + (" ..." if len(paths) > 4 else "")  # noqa: E731
  parts = []
  if saved_paths - model_paths:
    parts.append(f"it has parameters this model lacks ({fmt(saved_paths - model_paths)})")
  if model_paths - saved_paths:
    parts.append(f"this model has parameters it lacks ({fmt(model_paths - saved_paths)})")
  return "; ".join(parts)


def _zeros_like(abstract):
  return jax.device_put(np.zeros(abstract.shape, abstract.dtype), abstract.sharding)


class Checkpointer:

  def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state, data_state: dict | None, force: bool = False,
           global_batch: int | None = None) -> bool:
    # The iterator state is process-independent (every process walks the same global batches), so
    # the primary process's copy, which is what Orbax's JsonSave writes, serves every process.
    data = {"iterator": data_state, "process_count": jax.process_count(), "global_batch": global_batch,
            schema.KEY: schema.VERSION}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data))
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state, global_batch: int | None = None):
    """Restores `state` onto the shardings carried by `abstract_state` (ShapeDtypeStructs).

    Returns (state, data_state or None). With `global_batch`, refuses a data state written for
    another global batch size (its position would mean different rows).
    """
    _check_schema(self.step_dir(step))
    saved = _saved_tree_keys(self.step_dir(step))
    mismatch = _param_paths_mismatch(saved, abstract_state)
    if mismatch:
      raise TreeMismatchError(
          f"checkpoint step {step} in {self.directory} was written by another model layout: {mismatch}. The "
          f"model config differs from the one that trained it (a model.* key such as posterior_input, skip, "
          f"self_condition or local_mix); load it with that config (its workdir's config.json), or train in a new "
          f"--workdir.")
    added = _keys_added_since(saved, abstract_state)
    target = {k: v for k, v in abstract_state.items() if k not in added}
    if _teacher_inside_params(saved, abstract_state):
      state, data = self._restore_teacher_inside_params(step, target), self._restore_data(step)
    else:
      args = ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
      restored = self.manager.restore(step, args=args)
      state, data = restored.state, restored.data
    state = dict(state, **{k: _zeros_like(abstract_state[k]) for k in added})
    data = data or {}
    if "iterator" not in data:  # written before the data stream was process-independent
      return state, data.get(f"process_{jax.process_index()}")
    saved_batch = data.get("global_batch")
    if global_batch is not None and saved_batch is not None and saved_batch != global_batch:
      raise BatchSizeMismatchError(
          f"checkpoint step {step} in {self.directory} was written with train.batch_size={saved_batch}; "
          f"this run has {global_batch}, which would change which rows follow. Resume with "
          f"--config.train.batch_size={saved_batch}, or start a new workdir.")
    if data.get("process_count") not in (None, jax.process_count()):
      log.info("checkpoint step %d was written by %d processes; resuming its data stream in %d",
               step, data["process_count"], jax.process_count())
    return state, data["iterator"]

  def _restore_teacher_inside_params(self, step: int, target):
    """The migration of schema version 2 to 3 (schema.py): restores the teacher from inside the saved
    parameters and drops its EMA and optimizer copies (a partial restore, which needs Orbax's PyTree
    handler, hence a checkpointer of its own), then moves it beside the parameters."""
    key = frozen_teacher.STATE_KEY
    target = dict(target, params=dict(target["params"], **{key: target[key]}))
    del target[key]
    restore = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                     partial_restore=True)
    state = ocp.PyTreeCheckpointer().restore(os.path.join(self.step_dir(step), "state"), args=restore)
    params = dict(state["params"])
    teacher = params.pop(key)
    return dict(state, params=params, **{key: teacher})

  def _restore_data(self, step: int):
    return self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data

  def restore_latest(self, abstract_state, global_batch: int | None = None):
    """(step, state, data_state) from the newest checkpoint that restores, or None if there is none.

    A newer checkpoint that fails to restore while an older one restores is damaged: it is reported
    (naming both), set aside, and the run continues from the older one rather than failing or
    starting over. If no checkpoint restores, the cause is more likely this run's config (another
    model size, say) than damage: nothing is moved and the newest error is raised.
    """
    self._set_aside_interrupted_saves()
    steps = sorted(self.all_steps(), reverse=True)
    failed = []  # (step, error), newest first
    for step in steps:
      try:
        state, data = self.restore(step, abstract_state, global_batch)
      except (BatchSizeMismatchError, TreeMismatchError):
        raise  # a config mismatch, not damage
      except Exception as e:  # noqa: BLE001 (tensorstore, JSON and file errors all mean "damaged")
        failed.append((step, e))
        continue
      for bad_step, error in failed:
        log.warning("checkpoint step %d in %s is damaged (%s: %s); falling back to step %d in %s",
                    bad_step, self.step_dir(bad_step), type(error).__name__, _first_line(error), step,
                    self.step_dir(step))
        self._set_aside(self.step_dir(bad_step))
      if failed:
        self.manager.reload()
      return step, state, data
    if failed:
      step, error = failed[0]
      raise RuntimeError(
          f"none of the checkpoints {steps} in {self.directory} restores; the newest (step {step}) fails "
          f"with {type(error).__name__}: {_first_line(error)}. If this run's model or optimizer config "
          "differs from the one that wrote them, use a new --workdir.") from error
    return None

  def _set_aside_interrupted_saves(self):
    if not os.path.isdir(self.directory):
      return
    leftovers = sorted(n for n in os.listdir(self.directory) if _TMP_MARKER in n)
    for name in leftovers:
      log.warning("checkpoint %s in %s was never completed (a save interrupted before its final "
                  "rename); ignoring it, latest complete step is %s", name, self.directory,
                  self.latest_step())
      self._set_aside(os.path.join(self.directory, name))
    if leftovers:
      self.manager.reload()

  def _set_aside(self, path: str):
    # Renamed, not deleted: the files may help find out what went wrong. One process renames; the
    # others wait for it so that nobody lists the directory half-way.
    if jax.process_index() == 0 and os.path.exists(path):
      target = os.path.join(os.path.dirname(path), f"damaged_{os.path.basename(path)}_{int(time.time())}")
      os.rename(path, target)
      log.warning("moved %s to %s", path, target)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes(f"cfmjax_set_aside_{os.path.basename(path)}")

  def restore_params(self, step: int, abstract_state, key: str = "ema_params"):
    """Restores the full state onto `abstract_state` and returns one parameter tree from it."""
    state, _ = self.restore(step, abstract_state)
    return state[key]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


# ----------------------------------------------------------------------------------------------
# The best checkpoint by a diagnostics metric (train.best_metric).

BEST_DIR = "best"
# Diagnostics (diagnostics.training_diagnostics) that can choose a checkpoint; all lower-is-better.
BEST_METRICS = ("denoiser_ce", "denoiser_gap", "gen_nll_per_token")


def read_best(workdir: str) -> dict | None:
  """{"metric", "value", "step"} of the kept best checkpoint, or None when there is none."""
  path = os.path.join(workdir, BEST_DIR, "best.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    record = json.load(f)
  ckpt = Checkpointer(os.path.join(workdir, BEST_DIR))
  on_disk = ckpt.latest_step()
  ckpt.close()
  # A crash between Orbax's save and this file's rewrite leaves the file naming a deleted step:
  # the directory is the truth, and the file's value no longer belongs to it.
  return record if on_disk == record["step"] else None


class BestCheckpoint:
  """Keeps the single state whose `metric` was lowest, in <workdir>/best/ next to best.json.

  A resumed run continues from the recorded best value, so "best" means best over the whole run.
  """

  def __init__(self, workdir: str, metric: str):
    self.workdir, self.metric = workdir, metric
    self.ckpt = Checkpointer(os.path.join(workdir, BEST_DIR), max_to_keep=1)
    record = read_best(workdir)
    self.best = record["value"] if record and record["metric"] == metric else None

  def offer(self, step: int, metrics: dict, state, data_state: dict | None, global_batch: int) -> bool:
    """Saves `state` when metrics[metric] beats the best so far; returns whether it did."""
    if self.metric not in metrics:
      raise KeyError(f"train.best_metric={self.metric!r} is not among this run's diagnostics "
                     f"{sorted(metrics)}; choose one of those")
    value = float(metrics[self.metric])
    if not np.isfinite(value) or (self.best is not None and value >= self.best):
      return False
    self.ckpt.save(step, state, data_state, force=True, global_batch=global_batch)
    self.ckpt.wait()  # best.json must never name a step that is not on disk yet
    self.best = value
    if jax.process_index() == 0:
      path = os.path.join(self.ckpt.directory, "best.json")
      with open(path + ".tmp", "w") as f:
        json.dump({"metric": self.metric, "value": value, "step": int(step)}, f)
      os.replace(path + ".tmp", path)
    log.info("step %d: best %s so far (%.4f), kept in %s", step, self.metric, value, self.ckpt.directory)
    return True

  def close(self):
    self.ckpt.close()
