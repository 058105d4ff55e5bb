"""Everything `train`, `sample` and `eval` share: mesh, data, model, schedule, optimizer, state layout.

`build(config, workdir)` validates a config once, then turns it into an `Experiment`; nothing here
runs a step. The experiment holds the config frozen (an ml_collections FrozenConfigDict: nothing
after `build` can rewrite it) beside typed views of what the config does not say: the vocabulary
the data gave and the model (`model_config`, a frozen dataclass with the prompt flag), the state
space it resolves to, and the mesh actually used. run.json records those (run_record.py); the
config itself stays what the user asked for.

The train state is a plain dict so that Orbax, `jax.jit` shardings and humans all see the same tree:

  {"step": int32[], "params": ..., "ema_params": ..., "opt_state": ..., "rng": uint32[2],
   "skipped_steps": int32[],   # updates dropped for a non-finite loss/gradient (train.on_nonfinite)
   "frozen_teacher": ...}      # only for guided / fixed-point distillation: the base network, never
                               # trained (frozen_teacher.py)
"""

from __future__ import annotations

import dataclasses
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding

from cfmjax import objectives
from cfmjax.data import pipeline
from cfmjax.flow import prompting, schedules
from cfmjax.models import model as model_lib, state_space
from cfmjax.objectives import ar, frozen_teacher, loss_weights
from cfmjax.parallel import sharding
from cfmjax.run import checkpointing, configs

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Experiment:
  config: ml_collections.FrozenConfigDict
  mesh: jax.sharding.Mesh
  rules: tuple
  data: pipeline.Data
  model_config: model_lib.ModelConfig
  init_fn: object
  apply_fn: object
  schedule: schedules.Schedule
  optimizer: optax.GradientTransformation
  learning_rate: object  # step -> lr
  abstract_state: dict  # ShapeDtypeStructs carrying their shardings
  state_shardings: dict
  batch_sharding: NamedSharding

  @property
  def vocab_size(self) -> int:
    """The data's vocabulary (the model's input and output size)."""
    return self.model_config.vocab_size

  @property
  def state_space_kind(self) -> str:
    """'vocab' or 'embedding': model.state_space resolved for this vocabulary (state_space.resolve)."""
    return state_space.resolve(self.config.model.state_space, self.vocab_size, self.model_config.d_model)

  def activate(self):
    """The context to trace this experiment's model in: its mesh and its logical-axis rules."""
    return sharding.activate(self.mesh, self.rules)


# ----------------------------------------------------------------------------------------------
# Config checks: fail before anything is compiled, saying what is wrong and how to fix it.


def validate(config, mesh, rules):
  """Every check of a config, before anything is built: each error names the key and the fix."""
  batch = config.train.batch_size
  dp = sharding.data_parallel_size(mesh, rules)
  if batch % dp:
    raise ValueError(f"train.batch_size={batch} is not divisible by the {dp} data-parallel shards of "
                     f"mesh {dict(mesh.shape)}; use a multiple of {dp} (--config.train.batch_size=...)")
  accum = config.train.get("grad_accum_steps", 1)
  if accum < 1 or batch % (accum * dp):
    raise ValueError(f"train.grad_accum_steps={accum} must be >= 1 and split train.batch_size={batch} into "
                     f"microbatches that divide over the {dp} data-parallel shards: batch_size must be a "
                     f"multiple of grad_accum_steps x {dp} = {max(accum, 1) * dp}")
  if batch % jax.process_count():
    raise ValueError(f"train.batch_size={batch} is not divisible by the {jax.process_count()} processes")
  schedules.get_schedule(config.flow.schedule, 2)  # raises on an unknown name
  state_space.validate_config(config.model)
  prompting.validate(config, config.data.seq_len)
  objectives.get(config).validate(config)
  best_metric = config.train.get("best_metric", "")
  if best_metric:
    _validate_best_metric(config, best_metric)
  if config.optim.decay not in ("constant", "cosine"):
    raise ValueError(f"unknown optim.decay={config.optim.decay!r}; choose 'constant' or 'cosine'")
  if config.train.on_nonfinite not in configs.ON_NONFINITE:
    raise ValueError(f"unknown train.on_nonfinite={config.train.on_nonfinite!r}; choose one of "
                     f"{configs.ON_NONFINITE}")


def _validate_best_metric(config, metric: str):
  if metric not in checkpointing.BEST_METRICS:
    raise ValueError(f"unknown train.best_metric={metric!r}; choose one of {checkpointing.BEST_METRICS} or ''")
  if not config.train.get("diagnostics_every", 0):
    raise ValueError(f"train.best_metric={metric!r} is chosen by the in-training diagnostics: set "
                     f"--config.train.diagnostics_every=N (> 0)")
  markov = config.data.source == "markov"
  if metric != "denoiser_ce" and not markov:
    raise ValueError(f"train.best_metric={metric!r} needs the exact judge of a Markov source; on "
                     f"{config.data.source!r} use 'denoiser_ce'")
  if metric == "gen_nll_per_token" and not (config.train.diagnostics_samples and config.train.diagnostics_steps):
    raise ValueError("train.best_metric='gen_nll_per_token' needs samples: set train.diagnostics_samples "
                     "and train.diagnostics_steps above 0")


# ----------------------------------------------------------------------------------------------
# Optimizer.


def make_optimizer(optim_config, num_steps: int):
  """AdamW with linear warmup then constant or cosine decay, and global-norm clipping."""
  warmup = max(int(optim_config.warmup_steps), 1)
  if optim_config.decay == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, optim_config.lr, warmup, max(num_steps, warmup + 1),
                                            end_value=optim_config.lr * optim_config.get("final_lr_fraction", 0.0))
  else:
    lr = optax.join_schedules([optax.linear_schedule(0.0, optim_config.lr, warmup),
                               optax.constant_schedule(optim_config.lr)], [warmup])
  # Weight decay on matrices only: biases and norms are not decayed.
  decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(
      optax.clip_by_global_norm(optim_config.clip_norm),
      optax.adamw(lr, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                  weight_decay=optim_config.weight_decay, mask=decay_mask),
  )
  return tx, lr


# ----------------------------------------------------------------------------------------------
# State layout and shardings.


def _fit_to_mesh(spec, shape, mesh):
  """Drops mesh axes from `spec` where they do not divide the array dimension.

  Tiny test models (V = 16 on a 4-way tensor axis, say) would otherwise fail to shard; replicating
  such a dimension is always correct, only less memory-efficient.
  """
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    size = 1
    kept = []
    for a in names:
      if dim % (size * mesh.shape[a]) == 0:
        kept.append(a)
        size *= mesh.shape[a]
    fitted.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
  return jax.sharding.PartitionSpec(*fitted)


def param_shardings(boxed_abstract_params, mesh, rules):
  specs = nn.get_partition_spec(boxed_abstract_params)
  mesh_specs = jax.tree_util.tree_map(
      lambda s: nn.logical_to_mesh_axes(s, rules), specs,
      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  abstract = nn.meta.unbox(boxed_abstract_params)
  return jax.tree_util.tree_map(
      lambda spec, a: NamedSharding(mesh, _fit_to_mesh(spec, a.shape, mesh)), mesh_specs, abstract,
      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def network_part(params: dict) -> dict:
  """The network's own parameters, without the learnable loss weights kept beside them."""
  return {k: v for k, v in params.items() if k != loss_weights.PARAMS_KEY}


def state_layout(init_fn, optimizer, mesh, rules, seq_len: int, frozen_base: bool = False):
  """Returns (abstract_state, shardings) for the train state dict; `frozen_base`: the objective keeps
  a frozen copy of the base network beside the parameters (objectives: needs_frozen_base)."""
  boxed = jax.eval_shape(lambda rng: init_fn(rng, 1, seq_len), jax.random.key(0))
  p_shardings = param_shardings(boxed, mesh, rules)
  abstract_params = nn.meta.unbox(boxed)
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  replicated = sharding.replicated(mesh)
  opt_shardings = optax.tree_utils.tree_map_params(
      optimizer, lambda _, s: s, abstract_opt, p_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, NamedSharding))
  shardings = {"step": replicated, "params": p_shardings, "ema_params": p_shardings,
               "opt_state": opt_shardings, "rng": replicated, "skipped_steps": replicated}
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params,
              "ema_params": abstract_params, "opt_state": abstract_opt,
              "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
              "skipped_steps": jax.ShapeDtypeStruct((), jnp.int32)}
  if frozen_base:
    shardings[frozen_teacher.STATE_KEY] = network_part(p_shardings)
    abstract[frozen_teacher.STATE_KEY] = network_part(abstract_params)
  abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return abstract, shardings


def log_unigram_prior(data: pipeline.Data, vocab_size: int, num_rows: int = 2048) -> np.ndarray:
  """log π [V], float32: the data's unigram law (exact for the Markov source, else counted over the
  first `num_rows` training rows with add-½ smoothing). The skip-parametrised head starts here."""
  if data.stats.get("abstract"):  # aot's stand-in (benchmarks, compile checks): no rows to count
    return np.full(vocab_size, -np.log(vocab_size), np.float32)
  if data.markov is not None:
    pi = data.markov.initial.reshape(-1, data.markov.vocab_size).sum(axis=0)
    return np.log(np.maximum(pi, 1e-30)).astype(np.float32)
  counts = np.full(vocab_size, 0.5)
  batch = min(num_rows, 256)
  it = data.train_iterator(batch, seed=0)
  for _ in range(max(1, num_rows // batch)):
    counts += np.bincount(np.asarray(next(it)).ravel(), minlength=vocab_size)[:vocab_size]
  return np.log(counts / counts.sum()).astype(np.float32)


def init_state(exp: Experiment, seed: int):
  """A fresh train state, created directly in its sharded layout (no host copy of the weights).

  With model.skip the output head starts at zero and its bias at the data's log unigram law, so the
  untrained denoiser is already the context-free posterior (SPEC §9)."""
  prior = log_unigram_prior(exp.data, exp.vocab_size) if exp.model_config.skip else None

  def init(rng):
    params = nn.meta.unbox(exp.init_fn(rng, 1, exp.config.data.seq_len))
    if prior is not None:
      params = dict(params, head=dict(params["head"], bias=jnp.asarray(prior)))
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "ema_params": params,
             "opt_state": exp.optimizer.init(params), "rng": jax.random.key_data(rng),
             "skipped_steps": jnp.zeros((), jnp.int32)}
    if frozen_teacher.STATE_KEY in exp.state_shardings:  # a placeholder until the handoff fills in the base
      state[frozen_teacher.STATE_KEY] = network_part(params)
    return state

  with exp.activate():
    return jax.jit(init, out_shardings=exp.state_shardings)(jax.random.key(seed))


# ----------------------------------------------------------------------------------------------


def build(config, workdir: str | None, devices=None, data: pipeline.Data | None = None,
          mesh_shape: dict | None = None) -> Experiment:
  """`data`: an already-built (or, for `cfmjax compile`, dataset-free) Data; default: build it.
  `mesh_shape`: {"data": ..., "fsdp": ..., "tensor": ...} to use instead of config.mesh (loading.py
  fits a saved run's mesh to this machine's devices without rewriting its config)."""
  mesh = sharding.make_mesh(config.mesh if mesh_shape is None else mesh_shape, devices)
  rules = sharding.rules_from_config(config)
  validate(config, mesh, rules)
  config = ml_collections.FrozenConfigDict(config)  # read once: from here on nothing rewrites it
  data = data if data is not None else pipeline.build_data(config.data, workdir)
  model_config = model_lib.model_config_from(config, data.vocab_size)  # the model follows the data
  if model_config.causal:  # the autoregressive baseline reads token ids, not a flow state (ar.py)
    init_fn, apply_fn = ar.build(model_config)
  else:
    init_fn, apply_fn = model_lib.build(model_config)
  objective = objectives.get(config)
  init_fn, apply_fn = objective.attach(init_fn, apply_fn, config)  # learnable loss weights
  schedule = schedules.get_schedule(config.flow.schedule, data.vocab_size)
  optimizer, lr = make_optimizer(config.optim, config.train.num_steps)
  abstract_state, shardings = state_layout(init_fn, optimizer, mesh, rules, config.data.seq_len,
                                           objective.needs_frozen_base(config))
  log.info("mesh %s, %d devices, %d processes", dict(mesh.shape), mesh.size, jax.process_count())
  return Experiment(config=config, mesh=mesh, rules=rules, data=data, model_config=model_config,
                    init_fn=init_fn, apply_fn=apply_fn, schedule=schedule, optimizer=optimizer,
                    learning_rate=lr, abstract_state=abstract_state, state_shardings=shardings,
                    batch_sharding=sharding.batch_sharding(mesh, rules))
