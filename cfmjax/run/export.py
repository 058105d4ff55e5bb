"""Parameter-only checkpoints: the format `cfmjax export --workdir=W --out=D` writes (loading.py reads it).

An exported directory D holds

  params.safetensors  the EMA parameters, one tensor per parameter. Tensor names are the Flax
                      parameter paths joined by "/", e.g. "blocks/attn/qkv/kernel" or
                      "output/kernel"; with `model.scan_layers` (the default) the layer weights are
                      stacked along a leading axis of size num_layers. dtype float32 or bfloat16.
  config.json         the complete run config (model, data, tokenizer, schedule, ...; for a
                      distillation run, with the sections it took from its base run), so that the
                      model, data pipeline and sampler can be rebuilt exactly as in the workdir.
  tokenizer.model     the run's SentencePiece model (text sources only; Markov data has none).
  export_info.json    {"format": "cfmjax-export", "version": 1, "step", "dtype", "num_params",
                       "source_workdir", "objective", "vocab_size"} (vocab_size since schema 4).

The files are open formats (safetensors, JSON, SentencePiece): any framework can read the weights.
A bfloat16 export is loaded back as float32 parameters holding the bf16-rounded values.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils
from safetensors import numpy as safetensors_np

from cfmjax.run import configs, run_record

log = logging.getLogger(__name__)

PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"
INFO_FILE = "export_info.json"
TOKENIZER_FILE = "tokenizer.model"
FORMAT = "cfmjax-export"
DTYPES = ("float32", "bfloat16")
FILES = (PARAMS_FILE, CONFIG_FILE, INFO_FILE)  # what makes a directory an export (loading.kind)


def _to_host(x) -> np.ndarray:
  if not x.is_fully_addressable:  # multi-host: every process gathers, process 0 writes
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def flatten_params(params, dtype: str) -> dict[str, np.ndarray]:
  """{"a/b/kernel": host array in `dtype`} for a nested parameter dict."""
  if dtype not in DTYPES:
    raise ValueError(f"unknown export dtype {dtype!r}; choose one of {DTYPES}")
  np_dtype = np.float32 if dtype == "float32" else jax.numpy.bfloat16
  flat = traverse_util.flatten_dict(params, sep="/")
  return {name: np.ascontiguousarray(_to_host(value).astype(np_dtype)) for name, value in flat.items()}


def write(exp, params, step: int, workdir: str, out: str, dtype: str = "float32") -> dict:
  """Writes EMA `params` of `workdir` at `step` (`loading.load`) to `out`; returns the info."""
  tensors = flatten_params(params, dtype)
  info = {"format": FORMAT, "version": 1, "step": int(step), "dtype": dtype,
          "num_params": int(sum(t.size for t in tensors.values())),
          "source_workdir": os.path.abspath(workdir), "objective": exp.config.objective,
          "vocab_size": exp.vocab_size}
  if jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    safetensors_np.save_file(tensors, os.path.join(out, PARAMS_FILE),
                             metadata={"format": FORMAT, "step": str(step), "dtype": dtype})
    os.chmod(os.path.join(out, PARAMS_FILE), 0o644)  # safetensors writes 0600; exports are for sharing
    # The config the run trained with (loading.load_config): an export has no run.json to complete it.
    saved_config = run_record.config_record(exp.config)
    tokenizer = os.path.join(workdir, TOKENIZER_FILE)
    if os.path.exists(tokenizer):
      shutil.copyfile(tokenizer, os.path.join(out, TOKENIZER_FILE))
      # The copy next to the weights is the tokenizer; a path into another run must not win over it.
      saved_config["data"]["tokenizer"]["model_path"] = ""
    with open(os.path.join(out, CONFIG_FILE), "w") as f:
      json.dump(saved_config, f, indent=2)
    with open(os.path.join(out, INFO_FILE), "w") as f:  # last: its presence marks a finished export
      json.dump(info, f, indent=2)
  multihost_utils.sync_global_devices("cfmjax export")
  log.info("exported %s step %d (%d params, %s) to %s", workdir, step, info["num_params"], dtype, out)
  return info


def read_info(directory: str) -> dict:
  with open(os.path.join(directory, INFO_FILE)) as f:
    info = json.load(f)
  if info.get("format") != FORMAT:
    raise ValueError(f"{directory}/{INFO_FILE} is not a cfmjax export (format={info.get('format')!r})")
  return info


def load_params(directory: str, abstract_params, ignore_extra: bool = False):
  """The exported parameters laid out like `abstract_params` (ShapeDtypeStructs with shardings).

  Each tensor is cast to its abstract dtype and placed shard by shard. `ignore_extra` allows tensors
  the tree does not have (a distillation run's loss-weight network when starting a new run from it).
  """
  tensors = safetensors_np.load_file(os.path.join(directory, PARAMS_FILE))
  wanted = traverse_util.flatten_dict(abstract_params, sep="/")
  missing = sorted(set(wanted) - set(tensors))
  extra = sorted(set(tensors) - set(wanted))
  if missing or (extra and not ignore_extra):
    raise ValueError(f"{directory}/{PARAMS_FILE} does not match the model its config.json builds: "
                     f"missing {missing[:5]}, unexpected {extra[:5]}")
  loaded = {}
  for name, abstract in wanted.items():
    array = tensors[name]
    if tuple(array.shape) != tuple(abstract.shape):
      raise ValueError(f"{directory}/{PARAMS_FILE}: {name} has shape {array.shape}, the model wants "
                       f"{abstract.shape}")
    array = np.asarray(array.astype(abstract.dtype))
    loaded[name] = jax.make_array_from_callback(array.shape, abstract.sharding, lambda idx, a=array: a[idx])
  return traverse_util.unflatten_dict(loaded, sep="/")


def load_config(directory: str):
  """An export's run config; its tokenizer is the copy inside the export."""
  with open(os.path.join(directory, CONFIG_FILE)) as f:
    config = configs.from_saved(json.load(f))
  tokenizer = os.path.join(directory, TOKENIZER_FILE)
  if os.path.exists(tokenizer):
    config.data.tokenizer.model_path = os.path.abspath(tokenizer)
  return config
