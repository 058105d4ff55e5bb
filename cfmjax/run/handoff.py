"""Stage handoff: starting a distillation run from a base-flow workdir (or its `cfmjax export`).

The flow map shares the base network (SPEC §3), so the distillation run inherits the base run's
model, data (tokenizer included) and time schedule, and starts from its EMA parameters, restored
onto the *current* mesh: Orbax reshards on restore, so the base may have been trained on any mesh.
The optimizer starts fresh.
"""

from __future__ import annotations

import logging
import os
import shutil

import jax
import jax.numpy as jnp

from cfmjax import objectives
from cfmjax.models import model as model_lib
from cfmjax.objectives import frozen_teacher
from cfmjax.run import configs, experiment, loading

log = logging.getLogger(__name__)


def base_sections(base_config) -> dict:
  """The sections a distillation run takes from its base run's config, as plain values."""
  return {"model": base_config.model.to_dict(), "data": base_config.data.to_dict(),
          "flow": {"schedule": base_config.flow.schedule,
                   "prompt": base_config.flow.prompt.to_dict()}}  # a conditional base, a conditional map


def inherit_base_config(config, workdir: str):
  """(the config to run, the sections taken): `config` with the model, data and schedule settings of
  the base run named by `config.init_from`. `config` itself is left as the user wrote it (config.json
  records it); the sections go to run.json (run_record.py), where loading finds them again."""
  base = loading.load_config(config.init_from)  # a workdir or an export; raises clearly for anything else
  sections = base_sections(base)
  tokenizer = os.path.join(config.init_from, "tokenizer.model")
  if os.path.exists(tokenizer):
    os.makedirs(workdir, exist_ok=True)
    local = os.path.join(workdir, "tokenizer.model")
    if jax.process_index() == 0 and not os.path.exists(local):
      shutil.copyfile(tokenizer, local)
    sections["data"]["tokenizer"]["model_path"] = os.path.abspath(tokenizer)
  log.info("distilling from %s: model, data and schedule (%s) taken from its config",
           config.init_from, base.flow.schedule)
  return configs.with_sections(config, sections), sections


def load_base_params(exp: experiment.Experiment):
  """The base run's EMA parameters (a workdir or an export), restored onto `exp`'s mesh and
  parameter shardings."""
  config = exp.config
  base_config = loading.load_config(config.init_from)
  base_optimizer, _ = experiment.make_optimizer(base_config.optim, base_config.train.num_steps)
  base_init_fn, base_apply_fn = model_lib.build(exp.model_config)  # the bare network
  # ... plus whatever the base run kept beside it (it may itself be a distillation run).
  base_objective = objectives.get(base_config)
  base_init_fn, _ = base_objective.attach(base_init_fn, base_apply_fn, base_config)
  abstract, _ = experiment.state_layout(base_init_fn, base_optimizer, exp.mesh, exp.rules,
                                        config.data.seq_len, base_objective.needs_frozen_base(base_config))
  step = config.init_step  # None: the latest
  params, step = loading.restore_params(config.init_from, abstract, step)
  log.info("initialised from %s step %d (EMA parameters)", config.init_from, step)
  return params


def _copy_onto(shardings):
  return jax.jit(lambda tree: jax.tree_util.tree_map(jnp.copy, tree), out_shardings=shardings)


def start_from_base(exp: experiment.Experiment, state):
  """Replaces a fresh state's params and EMA (and, for guided and fixed-point distillation, its frozen
  teacher) with the base model's EMA parameters.

  Parameters the base run did not have (the learnable loss weights) keep their fresh values.
  """
  network = experiment.network_part(load_base_params(exp))  # a source run's own loss weights stay there
  params = dict(state["params"], **network)

  # Separate buffers: the train step donates the state, and one buffer cannot be donated twice.
  copy_params = _copy_onto(exp.state_shardings["params"])  # params and EMA share one compiled copy
  out = dict(state, params=copy_params(params), ema_params=copy_params(params))
  if frozen_teacher.STATE_KEY in state:
    out[frozen_teacher.STATE_KEY] = _copy_onto(exp.state_shardings[frozen_teacher.STATE_KEY])(network)
  return out
