"""One loader: a training workdir or an exported checkpoint in, (experiment, EMA params, step) out.

Everything that reads a finished run comes through here: `cfmjax sample / eval / lm-eval / export`,
the AR judge, and the distillation handoff (`handoff.py`, which restores a base run onto the new
run's mesh). The two layouts:
- a workdir (`cfmjax train` / `cfmjax distill`): config.json, checkpoints/ (Orbax train states),
  best/ (the state kept by train.best_metric);
- an export (`cfmjax export`, export.py): config.json, params.safetensors, export_info.json and the
  tokenizer.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np

from cfmjax.parallel import sharding
from cfmjax.run import checkpointing, configs, experiment, export, run_record

log = logging.getLogger(__name__)


def kind(path: str) -> str:
  """'export' for a directory written by `cfmjax export`, 'workdir' for a training workdir.

  Anything else raises, saying what each kind of directory must contain.
  """
  if os.path.exists(os.path.join(path, export.INFO_FILE)):
    missing = [f for f in export.FILES if not os.path.exists(os.path.join(path, f))]
    if missing:
      raise FileNotFoundError(f"{path} looks like an exported checkpoint but lacks {', '.join(missing)}: "
                              f"export it again with `cfmjax export --workdir=W --out={path}`")
    return "export"
  if os.path.exists(os.path.join(path, run_record.CONFIG_FILE)) and os.path.isdir(os.path.join(path, "checkpoints")):
    return "workdir"
  raise FileNotFoundError(
      f"{path} is neither an exported checkpoint ({', '.join(export.FILES)}, written by `cfmjax export`) "
      f"nor a cfmjax workdir (config.json and checkpoints/, written by `cfmjax train` or `cfmjax distill`)")


def load_config(path: str):
  """The config a run trained with: a workdir's config.json (the request) with the sections a
  distillation took from its base run (run.json's `from_base`, run_record.py), or an export's
  config.json (complete; its tokenizer is the copy inside it)."""
  if kind(path) == "export":
    return export.load_config(path)
  with open(os.path.join(path, run_record.CONFIG_FILE)) as f:
    config = configs.from_saved(json.load(f))
  start = run_record.latest_start(path)
  if start and start.get("from_base"):
    config = configs.with_sections(config, start["from_base"])
  return config


def saved_vocab_size(path: str) -> int | None:
  """The vocabulary the run at `path` trained with, from what it recorded (None: nothing recorded)."""
  if kind(path) == "export":
    vocab = export.read_info(path).get("vocab_size")
  else:
    vocab = (run_record.latest_start(path) or {}).get("vocab_size")
  if vocab is None:  # written before schema 4, which kept it in config.json
    with open(os.path.join(path, run_record.CONFIG_FILE)) as f:
      vocab = json.load(f).get("model", {}).get("vocab_size", -1)
  return int(vocab) if vocab > 0 else None


def mesh_for_this_machine(mesh_config) -> dict:
  """The saved mesh, or data=-1, fsdp=1, tensor=1 when it does not fit this machine's devices."""
  sizes = {a: int(mesh_config[a]) for a in sharding.MESH_AXES}
  if -1 not in sizes.values() and int(np.prod(list(sizes.values()))) != jax.device_count():
    log.info("saved mesh %s does not fit %d devices; using data=-1, fsdp=1, tensor=1",
             sizes, jax.device_count())
    return {"data": -1, "fsdp": 1, "tensor": 1}
  return sizes


def restore_params(path: str, abstract_state, step: int | str | None = None):
  """(EMA params laid out like abstract_state["ema_params"], step) of the run at `path`.

  `abstract_state` is the run's own train-state layout (ShapeDtypeStructs with shardings: its
  parameters land on those shardings, whatever mesh the run was saved from). step: None for the
  latest, an int, or "best" (<workdir>/best/, kept by train.best_metric); an export holds one step.
  """
  if kind(path) == "export":
    info = export.read_info(path)
    if step is not None and int(step) != info["step"]:
      raise ValueError(f"{path} is an export of step {info['step']} only (asked for step {step})")
    return export.load_params(path, abstract_state["ema_params"]), info["step"]
  if step == "best":
    record = checkpointing.read_best(path)
    if record is None:
      raise FileNotFoundError(f"no best checkpoint in {path}: train with --config.train.best_metric=... "
                              f"(and train.diagnostics_every > 0), or drop --checkpoint_step=best")
    directory, step = os.path.join(path, checkpointing.BEST_DIR), record["step"]
  else:
    directory = os.path.join(path, "checkpoints")
  ckpt = checkpointing.Checkpointer(directory)
  step = ckpt.latest_step() if step is None else int(step)
  if step is None:
    ckpt.close()
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: train first (`cfmjax train`)")
  params = ckpt.restore_params(step, abstract_state)
  ckpt.close()
  return params, step


def load(path: str, step: int | str | None = None):
  """(experiment, EMA params, step) of a workdir or an export, for sampling and evaluation.

  The experiment is rebuilt from the saved config; when this machine has a different number of
  devices than the saved mesh, the data axis absorbs the difference, since inference needs no
  particular layout.
  """
  config = load_config(path)
  exp = experiment.build(config, path, mesh_shape=mesh_for_this_machine(config.mesh))
  params, step = restore_params(path, exp.abstract_state, step)
  return exp, params, step
