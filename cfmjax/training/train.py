"""The trainer for both stages. Reads top to bottom: setup, state, step function, loop, shutdown.

    cfmjax train   --config=experiments/base_flow/markov_tiny.py --workdir=/tmp/w
    cfmjax distill --config=experiments/flow_map/markov_tiny_psd.py --workdir=/tmp/w2 --config.init_from=/tmp/w

The objective (objectives.py: flow, ar, psd / lsd / esd, fixed_point) only changes what a step
differentiates (`grad_fn_for`), what the logged held-out loss is and, for two-stage distillation,
where the parameters start (`handoff`).

Running it again on the same workdir resumes from the latest checkpoint, data position included.
SIGTERM or SIGINT (preemption, Ctrl-C) finishes the current step, writes a checkpoint and exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax._src import distributed as jax_distributed  # the coordination-service client (a barrier before step 1)

from cfmjax import objectives
from cfmjax.data import pipeline
from cfmjax.evaluation import diagnostics
from cfmjax.models import flops as flops_lib, model as model_lib
from cfmjax.objectives import frozen_teacher
from cfmjax.run import checkpointing, experiment, handoff, metrics as metrics_lib, preflight, run_record

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
  pass



# ----------------------------------------------------------------------------------------------
# Step functions (pure; compiled once per shape).


def grad_fn_for(exp: experiment.Experiment):
  """(params, tokens, rng, ema_params, step, frozen_base) -> (grads, metrics) of the run's objective."""
  return objectives.get(exp.config).grad_fn(exp)


def step_rng(state):
  # Randomness is a pure function of (base key, step): a resumed run draws exactly the same noise.
  return jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])


def ema_update(ema, params, step, max_decay: float):
  # Warm-up of the decay ((1 + n)/(10 + n)) keeps short runs from averaging in the random init.
  decay = jnp.minimum(max_decay, (1.0 + step) / (10.0 + step))
  return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def accumulate_grads(grad_fn, num_micro: int, batch_sharding):
  """grad_fn over the whole batch in `num_micro` microbatches (train.grad_accum_steps), run one after
  another by a scan, so that only one microbatch's activations are live: the mean of their gradients
  and metrics. Microbatch m holds rows m, m + k, m + 2k, ... (k = num_micro), so that every device's
  share of the batch contributes equally to every microbatch and no row moves between devices.

  Each microbatch draws its noise from fold_in(rng, m): for a deterministic objective (the AR
  baseline) the update equals the full-batch one to float tolerance; for the noised objectives it is
  the same estimator with other noise draws (tests/test_train_step.py)."""
  if num_micro <= 1:
    return grad_fn

  def accumulated(params, tokens, rng, ema_params, step, frozen_base=None):
    rows, length = tokens.shape
    micro = tokens.reshape(rows // num_micro, num_micro, length).swapaxes(0, 1)
    micro = jax.lax.with_sharding_constraint(micro, jax.sharding.NamedSharding(
        batch_sharding.mesh, jax.sharding.PartitionSpec(None, *batch_sharding.spec)))

    def body(carry, xs):
      index, batch = xs
      grads, metrics = grad_fn(params, batch, jax.random.fold_in(rng, index), ema_params, step, frozen_base)
      return jax.tree_util.tree_map(jnp.add, carry, (grads, metrics)), None

    shapes = jax.eval_shape(grad_fn, params, micro[0], rng, ema_params, step, frozen_base)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(num_micro), micro))
    return jax.tree_util.tree_map(lambda t: t / num_micro, total)

  return accumulated


def make_train_step(exp: experiment.Experiment, grad_fn=None):
  grad_fn = grad_fn or grad_fn_for(exp)
  grad_fn = accumulate_grads(grad_fn, exp.config.train.get("grad_accum_steps", 1), exp.batch_sharding)
  skip_nonfinite = exp.config.train.get("on_nonfinite", "stop") == "skip"

  def train_step(state, tokens):
    frozen_base = state.get(frozen_teacher.STATE_KEY)  # guided / fixed-point distillation only
    grads, metrics = grad_fn(state["params"], tokens, step_rng(state), state["ema_params"], state["step"],
                             frozen_base)
    updates, opt_state = exp.optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    step = state["step"]
    new_state = {
        "step": step + 1,
        "params": params,
        "ema_params": ema_update(state["ema_params"], params, step.astype(jnp.float32),
                                 exp.config.optim.ema_decay),
        "opt_state": opt_state,
        "rng": state["rng"],
    }
    if frozen_base is not None:
      new_state[frozen_teacher.STATE_KEY] = frozen_base
    # One flag per gradient leaf (in tree order), so that a stop can name the first bad group.
    grads_finite = jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)])
    finite = jnp.all(grads_finite) & jnp.isfinite(metrics["loss"])
    skipped = state.get("skipped_steps", jnp.zeros((), jnp.int32))
    if skip_nonfinite:
      # A finite gradient can still overflow the parameters (a huge learning rate): skip that too.
      finite &= jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree_util.tree_leaves(params)]))
      # Keep params, optimizer and EMA as they were; the step counter (hence data and noise) moves on.
      kept = {k: (step + 1 if k == "step" else state[k]) for k in new_state}
      new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, kept)
    new_state["skipped_steps"] = skipped + (~finite).astype(jnp.int32) if skip_nonfinite else skipped
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), learning_rate=exp.learning_rate(step),
                   skipped_steps=new_state["skipped_steps"], grads_finite=grads_finite)
    return new_state, metrics

  return jax.jit(train_step, in_shardings=(exp.state_shardings, exp.batch_sharding),
                 out_shardings=(exp.state_shardings, None), donate_argnums=0)


def make_eval_step(exp: experiment.Experiment, loss_fn=None):
  """Held-out loss of the EMA parameters at fixed noise (comparable across evaluations)."""
  loss_fn = loss_fn or objectives.get(exp.config).eval_loss_fn(exp)

  def eval_step(params, tokens, rng):
    return loss_fn(params, tokens, rng)[1]

  return jax.jit(eval_step, in_shardings=(exp.state_shardings["ema_params"], exp.batch_sharding, None))


def global_batch(exp: experiment.Experiment, local_rows: np.ndarray) -> jax.Array:
  """Assembles each process's rows into one array sharded over the mesh's batch axes."""
  shape = (local_rows.shape[0] * jax.process_count(),) + local_rows.shape[1:]
  return jax.make_array_from_process_local_data(exp.batch_sharding, local_rows, shape)


def first_nonfinite_group(params, grads_finite) -> str:
  """The path of the first parameter whose gradient had a NaN/Inf (flags in tree-leaf order)."""
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  bad = [path for path, ok in zip(paths, np.asarray(grads_finite)) if not ok]
  return bad[0] if bad else "none (the gradients are finite)"


def check_finite(step: int, metrics: dict, params, ckpt) -> None:
  """on_nonfinite='stop': raises naming the step, the loss and the first non-finite gradient group."""
  loss, grads_finite = metrics["loss"], metrics["grads_finite"]
  if np.isfinite(loss) and np.all(grads_finite):
    return
  ckpt.close()
  raise NonFiniteLossError(
      f"non-finite {'loss' if not np.isfinite(loss) else 'gradient'} at step {step}: loss={loss}, first "
      f"non-finite gradient group: {first_nonfinite_group(params, grads_finite)}; stopping. The last "
      f"good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}. Lower optim.lr, check the "
      "data, or set --config.train.on_nonfinite=skip to drop such updates and count them.")


class StopRequest:
  """Turns SIGTERM / SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. under some test runners): no handler.
        pass
    return self

  def _handle(self, signum, frame):
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def compiled_in_step(step_fn):
  """In a multi-process job, the first call compiles `step_fn` ahead of time and then waits at a
  coordination-service barrier, so that no process enters the step's first collective while another
  is still compiling. CPU collectives (gloo) time out after a fixed 30 s, and on a loaded host one
  process can finish compiling minutes before its peer; accelerators lose nothing by it either.
  A single process gets `step_fn` back unchanged."""
  if jax.process_count() == 1:
    return step_fn
  compiled = []

  def step(state, batch):
    if not compiled:
      compiled.append(step_fn.lower(state, batch).compile())
      jax_distributed.global_state.client.wait_at_barrier("cfmjax_train_step_compiled", 30 * 60 * 1000)
    return compiled[0](state, batch)

  return step


# ----------------------------------------------------------------------------------------------


class StepProfiler:
  """`train.profile_steps="N,M"`: a jax.profiler trace of steps N..M (1-based, inclusive) in `directory`
  (open it with TensorBoard's profile plugin or Perfetto). The device is drained at both ends so that
  the trace holds exactly those steps' work."""

  def __init__(self, spec: str, directory: str):
    self.first = self.last = None
    self.directory = directory
    self.active = False
    if spec:
      try:
        self.first, self.last = (int(v) for v in str(spec).split(","))
      except ValueError:
        raise ValueError(f"train.profile_steps={spec!r}: expected two step numbers N,M (e.g. --profile_steps=10,12)")
      if not 1 <= self.first <= self.last:
        raise ValueError(f"train.profile_steps={spec!r}: need 1 <= N <= M")

  def before(self, step: int, state):
    if self.first == step and not self.active:
      jax.block_until_ready(state)
      jax.profiler.start_trace(self.directory)
      self.active = True
      log.info("profiling steps %d-%d into %s", self.first, self.last, self.directory)

  def after(self, step: int, state):
    if self.active and step >= self.last:
      self.close(state)

  def close(self, state):
    if self.active:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False
      log.info("profile written to %s", self.directory)


def train(config, workdir: str, devices=None) -> dict:
  """Trains (or resumes) `config`'s stage in `workdir` on `devices` (default: all).

  Returns the last logged metrics.
  """
  # --- Setup --------------------------------------------------------------------------------
  os.makedirs(workdir, exist_ok=True)
  objective = objectives.get(config)
  request, from_base = config, None  # config.json records the request; run.json what was derived
  # Validated by experiment.build below, after a distillation has taken its model from the base run.
  if objective.base_run(config):
    config, from_base = handoff.inherit_base_config(config, workdir)
  exp = experiment.build(config, workdir, devices)
  preflight.check_vocab_matches_checkpoints(exp, workdir)
  run_record.write_config(request, workdir)
  run_record.write_data_stats(exp.data.stats, workdir)
  cfg = exp.config.train
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), cfg.keep_checkpoints)
  writer = metrics_lib.MetricsWriter(workdir)
  profiler = StepProfiler(cfg.get("profile_steps", ""), os.path.join(workdir, "profile"))
  per_host_batch = cfg.batch_size // jax.process_count()
  data_iter = exp.data.train_iterator(per_host_batch, jax.process_index(), jax.process_count(),
                                      seed=exp.config.data.shuffle_seed)

  # --- State: resume from the latest checkpoint, or initialise ------------------------------
  restored = ckpt.restore_latest(exp.abstract_state, global_batch=cfg.batch_size)
  start = restored[0] if restored else None
  if restored:
    _, state, data_state = restored
    if data_state is not None:
      data_iter.set_state(data_state)
    log.info("resumed from step %d in %s", start, ckpt.directory)
  else:
    state = experiment.init_state(exp, exp.config.seed)
    if objective.starts_from_base(exp.config):
      state = handoff.start_from_base(exp, state)
    start = 0
  log.info("model: %s parameters, vocab %d, seq_len %d", f"{model_lib.count_params(state['params']):,}",
           exp.vocab_size, exp.config.data.seq_len)
  run_record.append_start(exp, workdir, start, from_base)
  if start >= cfg.num_steps:
    log.info("already at step %d of %d: nothing to do (raise --config.train.num_steps to continue)",
             start, cfg.num_steps)

  # --- Step functions -----------------------------------------------------------------------
  train_step = compiled_in_step(make_train_step(exp))
  eval_step = make_eval_step(exp)
  eval_rows = exp.data.eval_rows(cfg.eval_batch_size) if cfg.eval_every else None
  diagnostics_every = cfg.get("diagnostics_every", 0)
  diagnose = diagnostics.training_diagnostics(exp) if diagnostics_every else None
  best_metric = cfg.get("best_metric", "")
  best = checkpointing.BestCheckpoint(workdir, best_metric) if best_metric else None

  # --- Loop ---------------------------------------------------------------------------------
  tokens_per_step = cfg.batch_size * exp.config.data.seq_len
  # Model FLOPs per step (MFU convention, cfmjax/models/flops.py) and the device's peak (None: MFU is null).
  flops_per_step = objectives.step_flops(exp.config, vocab=exp.vocab_size)["total"]
  peak = flops_lib.device_peak(exp.mesh.devices.flat[0], exp.config.model.dtype, num_devices=exp.mesh.size)
  log.info("MFU peak per device: %s (%s)", f"{peak.flops:.3g} FLOP/s" if peak.flops else "unknown", peak.source)
  progress = metrics_lib.Progress(cfg.num_steps, tokens_per_step, start_step=start)
  pending = []  # per-step metrics still on device; fetched at log time so dispatch stays async
  last_logged = {}
  step = start
  t_log = time.time()
  # Seconds spent since the last log line waiting for data, saving checkpoints and evaluating; the
  # rest of the interval is the steps' compute (dispatch is async, so it is paid at the log's fetch).
  waits = dict.fromkeys(("data", "checkpoint", "eval"), 0.0)
  with exp.activate(), StopRequest() as stop:
    while step < cfg.num_steps:
      profiler.before(step + 1, state)
      t0 = time.time()
      batch = global_batch(exp, np.asarray(next(data_iter)))
      waits["data"] += time.time() - t0
      state, step_metrics = train_step(state, batch)
      step += 1
      pending.append((step, step_metrics))
      profiler.after(step, state)

      is_last = step == cfg.num_steps
      stop_on_nonfinite = cfg.get("on_nonfinite", "stop") == "stop"
      if step % cfg.log_every == 0 or is_last or stop.signal_name:
        fetched = jax.device_get(pending)
        pending = []
        for s, m in fetched:
          if stop_on_nonfinite:
            check_finite(s, m, state["params"], ckpt)
          m.pop("grads_finite")
        elapsed = time.time() - t_log
        t_log = time.time()
        record = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}
        record["skipped_steps"] = int(fetched[-1][1]["skipped_steps"])  # a running count, not a mean
        record["steps_per_sec"] = len(fetched) / max(elapsed, 1e-9)
        for name, seconds in waits.items():
          record[f"time_{name}_s"] = seconds / len(fetched)
        record["time_compute_s"] = max(elapsed - sum(waits.values()), 0.0) / len(fetched)
        waits = dict.fromkeys(waits, 0.0)
        record["tokens_per_sec"] = record["steps_per_sec"] * tokens_per_step
        record.update(flops_lib.throughput(flops_per_step, record["steps_per_sec"], exp.mesh.size, peak.flops))
        record["mfu_peak"] = peak.source
        record.update(pipeline.mixture_token_counts(data_iter.get_state(), exp.config.data.seq_len))
        writer.write(step, record)
        last_logged = dict(record, step=step)
        progress.update(step, loss=record["loss"],
                        note=None if record["mfu"] is None else f"mfu {record['mfu']:.3f} of {peak.source}")

      t0 = time.time()
      if cfg.eval_every and (step % cfg.eval_every == 0 or is_last):
        m = jax.device_get(eval_step(state["ema_params"], global_batch(exp, eval_rows), jax.random.key(0)))
        writer.write(step, {f"eval_{k}": v for k, v in m.items()})

      if diagnose is not None and (step % diagnostics_every == 0 or is_last):
        diagnosed = diagnose(state["ema_params"])
        writer.write(step, diagnosed)
        if best is not None:
          best.offer(step, diagnosed, state, data_iter.get_state(), cfg.batch_size)
      waits["eval"] += time.time() - t0

      t0 = time.time()
      if step % cfg.checkpoint_every == 0 or is_last or stop.signal_name:
        if stop_on_nonfinite:  # never save a state that a non-finite step has already spoiled
          for s, m in jax.device_get([(s, {k: m[k] for k in ("loss", "grads_finite")}) for s, m in pending]):
            check_finite(s, m, state["params"], ckpt)
        ckpt.save(step, state, data_iter.get_state(), force=True, global_batch=cfg.batch_size)
      waits["checkpoint"] += time.time() - t0
      if stop.signal_name:
        log.warning("received %s: wrote checkpoint at step %d, exiting", stop.signal_name, step)
        break

  # --- Shutdown: make sure the last checkpoint is on disk -----------------------------------
  profiler.close(state)
  ckpt.close()
  if best is not None:
    best.close()
  writer.close()
  return last_logged
