"""What a training workdir records about its run, beside the checkpoints.

  config.json      what the user asked for: the config as given (experiment file plus overrides) and
                   `schema_version`. Nothing is written into it at run time (schema 4).
  run.json         what the run worked out or found, one entry per start (a resumed run keeps the
                   history of where it ran): the vocabulary the data gave, the prompt flag, the
                   resolved state space, the mesh actually used, devices, versions, commit and, for a
                   distillation run, `from_base`: the sections it took from its base run (model,
                   data, flow.schedule, flow.prompt; handoff.py).
  data_stats.json  what data preparation counted, for people.

`loading.load_config` reads the first two back as the config the run trained with: config.json with
the latest start's `from_base` sections merged in. Workdirs of schema 3 and older wrote the derived
values and the base's sections into config.json itself, and have no `from_base`.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import subprocess
import time

import jax

from cfmjax.run import schema

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
DATA_STATS_FILE = "data_stats.json"


def _flatten(tree: dict, prefix: str = "") -> dict:
  """{"model.d_model": 256, ...} for a nested dict."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def config_record(config) -> dict:
  """A config as config.json holds it: its keys and `schema_version` (an export's config.json too)."""
  return dict(json.loads(config.to_json_best_effort()), **{schema.KEY: schema.VERSION})


def write_config(config, workdir: str):
  """Writes the requested config to config.json; on resume, logs which settings differ from the
  request saved there (older files are read as today's schema first)."""
  path = os.path.join(workdir, CONFIG_FILE)
  new = config_record(config)
  if os.path.exists(path):
    with open(path) as f:
      old = dict(schema.migrate_config(json.load(f), path), **{schema.KEY: schema.VERSION})
    flat_old, flat_new = _flatten(old), _flatten(new)
    changed = sorted(k for k in set(flat_old) | set(flat_new) if flat_old.get(k) != flat_new.get(k))
    if changed:
      log.warning("config differs from the one saved in %s: %s", path,
                  ", ".join(f"{k}: {flat_old.get(k)!r} -> {flat_new.get(k)!r}" for k in changed))
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(new, f, indent=2, sort_keys=True)


def _git_commit() -> str | None:
  """The commit of the cfmjax checkout this runs from (None outside a git checkout)."""
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                         capture_output=True, text=True, timeout=10, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() or None


def append_start(exp, workdir: str, start_step: int, from_base: dict | None = None):
  """Appends this start of the run to run.json (module docstring); `exp`: the built experiment,
  whose fields hold the derived values; `from_base`: the sections a distillation took from its base."""
  path = os.path.join(workdir, RUN_FILE)
  record = {"starts": []}
  if os.path.exists(path):
    with open(path) as f:
      record = json.load(f)
  start = {
      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from_step": int(start_step),
      schema.KEY: schema.VERSION, "objective": exp.config.objective, "base_run": exp.config.init_from or None,
      "vocab_size": exp.vocab_size, "prompt_flag": bool(exp.model_config.prompt_flag),
      "state_space": exp.state_space_kind,
      "mesh": {k: int(v) for k, v in exp.mesh.shape.items()}, "devices": int(exp.mesh.size),
      "processes": jax.process_count(), "device_kind": exp.mesh.devices.flat[0].device_kind,
      "versions": {name: importlib.metadata.version(name)
                   for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain")},
      "git_commit": _git_commit()}
  if from_base is not None:
    start["from_base"] = from_base
  record["starts"].append(start)
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(record, f, indent=2)


def latest_start(run_dir: str) -> dict | None:
  """The newest entry of `run_dir`'s run.json (None when the run has none: an export, or a workdir
  written before run.json existed)."""
  path = os.path.join(run_dir, RUN_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    starts = json.load(f).get("starts", [])
  return starts[-1] if starts else None


def write_data_stats(stats: dict, workdir: str):
  """What data preparation counted (documents, skipped bad bytes, empty documents...), for people."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, DATA_STATS_FILE), "w") as f:
      json.dump(stats, f, indent=2, sort_keys=True, default=str)
  log.info("data: %s", ", ".join(f"{k}={v}" for k, v in sorted(stats.items()) if not isinstance(v, dict)))
