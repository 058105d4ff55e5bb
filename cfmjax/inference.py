"""Loading a trained model and generating from it (shared by `cfmjax sample` and `cfmjax eval`)."""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np

from cfmjax import ar, checkpointing, configs, experiment, flow_map, samplers, sharding, state_space

log = logging.getLogger(__name__)

SAMPLERS = ("euler", "flowmap", "ar")  # ar: KV-cached ancestral sampling of a causal model


def load_config(workdir: str):
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a cfmjax workdir written by `cfmjax train`?")
  with open(path) as f:
    return configs.from_saved(json.load(f))


def fit_mesh_to_devices(config):
  """Lets the data axis absorb all devices when the saved mesh does not fit this machine."""
  sizes = [config.mesh[a] for a in ("data", "fsdp", "tensor")]
  if -1 not in sizes and int(np.prod(sizes)) != jax.device_count():
    log.info("saved mesh %s does not fit %d devices; using data=-1, fsdp=1, tensor=1",
                 sizes, jax.device_count())
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
  return config


def load(workdir: str, step: int | None = None):
  """Returns (experiment, EMA params, step) for the latest (or given) checkpoint in `workdir`.

  The mesh is rebuilt from the saved config; when this machine has a different number of devices,
  the data axis absorbs the difference, since inference needs no particular layout.
  """
  config = fit_mesh_to_devices(load_config(workdir))
  exp = experiment.build(config, workdir)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: train first (`cfmjax train`)")
  params = ckpt.restore_params(step, exp.abstract_state)
  ckpt.close()
  return exp, params, step


def make_generator(exp: experiment.Experiment, sampler: str, steps: int, batch_size: int):
  """A jitted function (params, rng) -> tokens [batch_size, L] for the named sampler."""
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
  if (sampler == "ar") != exp.model_config.causal:
    raise ValueError(f"sampler {sampler!r} does not fit this model: use --sampler=ar for an autoregressive "
                     f"(model.causal) workdir and euler/flowmap for a flow")
  length, vocab = exp.config.data.seq_len, exp.vocab_size

  space = None if sampler == "ar" else state_space.from_config(exp.apply_fn, vocab, exp.config)

  def generate(params, rng):
    if sampler == "ar":  # one network evaluation per position; `steps` does not apply (ar.py)
      return ar.sample(params, exp.model_config, rng, batch_size, length)
    bound = space.bind(params)  # the state in V-space or embedding space, as configured (SPEC §4)
    if sampler == "flowmap":  # k jumps of the flow map ψ(x, s, t) (SPEC §3)
      tokens, _ = flow_map.flowmap_sample(None, rng, batch_size, length, vocab, exp.schedule, steps,
                                          space=bound)
    else:  # Euler steps of the base flow's denoiser, the diagonal s = t (SPEC §2)
      tokens, _ = samplers.euler_sample(None, rng, batch_size, length, vocab, exp.schedule, steps,
                                        space=bound)
    return tokens

  return jax.jit(generate, in_shardings=(exp.state_shardings["ema_params"], None),
                 out_shardings=exp.batch_sharding)


def generate(exp, params, sampler: str, steps: int, num_samples: int, batch_size: int, seed: int,
             progress=None) -> np.ndarray:
  """`num_samples` sequences as int32 [num_samples, L], generated `batch_size` at a time."""
  dp = sharding.data_parallel_size(exp.mesh, exp.rules)
  batch_size = max(dp, (min(batch_size, num_samples) + dp - 1) // dp * dp)
  fn = make_generator(exp, sampler, steps, batch_size)
  out = []
  with jax.set_mesh(exp.mesh):
    for i in range(0, num_samples, batch_size):
      out.append(np.asarray(jax.device_get(fn(params, jax.random.key(seed + i)))))
      if progress is not None:
        progress(min(i + batch_size, num_samples), num_samples)
  return np.concatenate(out)[:num_samples]
