"""Ahead-of-time compile check: does a config's train (or distill) step fit a mesh? No step is run.

  cfmjax compile --config=experiments/base_flow/owt_1p7b.py --mesh=4,8,2 [--num_devices=64] [--stage=distill]

The mesh is made of fake CPU devices (XLA's --xla_force_host_platform_device_count, which must be
set before JAX starts its backend: `use_fake_cpu_devices` does that at the top of the command). The
experiment is built from shapes only: parameters, optimizer state and batch are ShapeDtypeStructs
carrying their shardings (nothing is allocated), and the data pipeline is not built (the vocabulary
size comes from the config), so a config whose dataset is not on this machine still compiles.

The report gives, per device: parameters, EMA parameters and optimizer state (from their shardings:
exact), and the compiled step's arguments, outputs and temporaries (XLA's memory_analysis of the
CPU compilation: the same partitioned program a TPU/GPU would run, but buffer assignment and fusion
are the CPU backend's, so temporaries are indicative, not a TPU/GPU guarantee), plus model FLOPs
per step from `flops.py`.
"""

from __future__ import annotations

import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from cfmjax import objectives
from cfmjax.data import pipeline
from cfmjax.models import model as model_lib
from cfmjax.objectives import frozen_teacher
from cfmjax.parallel import sharding
from cfmjax.run import configs, experiment
from cfmjax.training import train

FAKE_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def use_fake_cpu_devices(num_devices: int):
  """Makes JAX start with `num_devices` CPU devices. Must run before anything initialises JAX's backend."""
  flags = re.sub(rf"{FAKE_DEVICES_FLAG}=\d+", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags} {FAKE_DEVICES_FLAG}={num_devices}".strip()
  os.environ["JAX_PLATFORMS"] = "cpu"

  jax.config.update("jax_platforms", "cpu")
  if jax.device_count() < num_devices:
    raise RuntimeError(
        f"JAX started with {jax.device_count()} devices before {FAKE_DEVICES_FLAG}={num_devices} could "
        f"take effect; run `cfmjax compile` in a fresh process or set XLA_FLAGS={FAKE_DEVICES_FLAG}="
        f"{num_devices} yourself")


def parse_mesh(text: str) -> tuple[int, int, int]:
  """'4,8,2' → (data, fsdp, tensor) = (4, 8, 2)."""
  try:
    sizes = tuple(int(s) for s in text.split(","))
  except ValueError:
    sizes = ()
  if len(sizes) != 3 or min(sizes) < 1:
    raise ValueError(f"--mesh must be three positive sizes data,fsdp,tensor (e.g. 4,8,2), got {text!r}")
  return sizes


def vocab_size_of(config) -> int:
  """The vocabulary the data would give, read from the config (no tokenizer is trained or loaded)."""
  if config.data.source == "markov":
    return int(config.data.markov.vocab_size)
  # Text sources: the SentencePiece size asked for (a tiny corpus may end up with fewer pieces).
  return int(config.data.tokenizer.vocab_size)


def abstract_experiment(config, devices, mesh_sizes=None):
  """An Experiment whose data is a stand-in carrying only the vocabulary size (nothing is read);
  `mesh_sizes` (data, fsdp, tensor): the mesh to lay it out on instead of config.mesh."""
  data = pipeline.Data(source_name=config.data.source, seq_len=config.data.seq_len,
                       vocab_size=vocab_size_of(config), tokenizer=None, markov=None,
                       stats={"abstract": True})
  mesh_shape = None if mesh_sizes is None else dict(zip(sharding.MESH_AXES, mesh_sizes))
  return experiment.build(config, None, devices, data=data, mesh_shape=mesh_shape)


def _bytes_per_device(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""

  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def sharding_table(config, mesh_sizes, devices=None) -> dict:
  """{"params/<path>": "shape dtype PartitionSpec", "opt_state/<path>": ...} for every leaf of the
  train state on a (data, fsdp, tensor) mesh, from shapes only (nothing is compiled or allocated).
  Committed for owt_1p7b on 4x8x2 (tests/golden/): a change of sharding shows up in review."""

  config = configs.override(config.copy_and_resolve_references(), {"init_from": ""})  # shapes only
  num = mesh_sizes[0] * mesh_sizes[1] * mesh_sizes[2]
  exp = abstract_experiment(config, list(devices if devices is not None else jax.devices())[:num], mesh_sizes)
  table = {}
  for part in ("params", "opt_state"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(exp.abstract_state[part])[0]:
      name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
      table[f"{part}/{name}"] = f"{list(leaf.shape)} {leaf.dtype} {leaf.sharding.spec}"
  return table


def compile_report(config, mesh_sizes, stage: str | None = None, devices=None) -> dict:
  """Lowers and compiles `config`'s train step on a (data, fsdp, tensor) mesh; returns the report."""
  config = config.copy_and_resolve_references()
  stage = stage or objectives.stage(config)
  if stage != objectives.stage(config):  # a base config's distillation step is PSD's
    config = configs.override(config, {"objective": "psd" if stage == "distill" else "flow"})
  if stage == "distill":
    # Only the step is compiled: no base run to start from is needed (the step is the same one).
    config = configs.override(config, {"init_from": ""})
  num = mesh_sizes[0] * mesh_sizes[1] * mesh_sizes[2]
  devices = list(devices if devices is not None else jax.devices())
  if len(devices) < num:
    raise ValueError(f"mesh {mesh_sizes} needs {num} devices, JAX has {len(devices)}")
  exp = abstract_experiment(config, devices[:num], mesh_sizes)
  batch = jax.ShapeDtypeStruct((config.train.batch_size, config.data.seq_len), jnp.int32,
                               sharding=exp.batch_sharding)
  step_fn = train.make_train_step(exp)
  with exp.activate():
    t0 = time.perf_counter()
    lowered = step_fn.lower(exp.abstract_state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  state = exp.abstract_state
  step_flops = objectives.step_flops(exp.config, vocab=exp.vocab_size)
  num_params = model_lib.count_params(state["params"])
  gib = 2.0 ** 30
  report = {
      "config_stage": stage, "mesh": dict(exp.mesh.shape), "num_devices": exp.mesh.size,
      "num_params": num_params, "vocab_size": exp.vocab_size, "batch_size": config.train.batch_size,
      "seq_len": config.data.seq_len, "dtype": config.model.dtype,
      "lower_seconds": t1 - t0, "compile_seconds": t2 - t1,
      "per_device_gib": {
          "params": _bytes_per_device(state["params"]) / gib,
          "ema_params": _bytes_per_device(state["ema_params"]) / gib,
          "opt_state": _bytes_per_device(state["opt_state"]) / gib,
          # guided / fixed-point distillation: the frozen base, one copy (frozen_teacher.py)
          **{k: _bytes_per_device(state[k]) / gib for k in (frozen_teacher.STATE_KEY,) if k in state},
          "arguments": mem.argument_size_in_bytes / gib,
          "outputs": mem.output_size_in_bytes / gib,
          "aliased": mem.alias_size_in_bytes / gib,
          "temporaries": mem.temp_size_in_bytes / gib,
          # Donated state aliases its outputs: live at peak ≈ arguments + temporaries + unaliased outputs.
          "peak_estimate": (mem.argument_size_in_bytes + mem.temp_size_in_bytes
                            + mem.output_size_in_bytes - mem.alias_size_in_bytes) / gib,
      },
      "flops_per_step": step_flops["total"],
      "flops_per_step_per_device": step_flops["total"] / exp.mesh.size,
  }
  return report


def format_report(r: dict) -> str:
  m = r["per_device_gib"]
  lines = [
      f"{r['config_stage']} step, mesh {r['mesh']} ({r['num_devices']} devices), "
      f"{r['num_params']:,} parameters, V={r['vocab_size']}, batch {r['batch_size']} x {r['seq_len']}, {r['dtype']}",
      f"lowered in {r['lower_seconds']:.1f}s, compiled in {r['compile_seconds']:.1f}s",
      "| per device | GiB |", "|---|---|",
  ]
  lines += [f"| {k} | {v:.3f} |" for k, v in m.items()]
  lines.append(f"model FLOPs per step: {r['flops_per_step']:.3e} ({r['flops_per_step_per_device']:.3e} per device)")
  return "\n".join(lines)
