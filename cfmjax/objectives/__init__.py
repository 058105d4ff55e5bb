"""What a run optimises, one object per objective: the trainer, the FLOP counter, the experiment
builder and the handoff ask it instead of branching on config keys.

| objective | command | starts from a base run | parameters beside the network | target |
|---|---|---|---|---|
| `flow` | `cfmjax train` | no | none | the data: cross-entropy of the denoiser (losses.py) |
| `ar` | `cfmjax train` | no | none | the next token (ar.py) |
| `psd`, `lsd`, `esd` | `cfmjax distill` | distill.mode = two_stage | loss weights w(s, t); the frozen base when guided | the flow map's own teacher (distill.py) |
| `fixed_point` | `cfmjax distill` | always | loss weights; the frozen self-conditioned base | the base's self-conditioning iteration (fixed_point.py) |

Each declares `validate(config)`, `attach(init_fn, apply_fn, config)` (the trained parameters it keeps
beside the network), `needs_frozen_base(config)` (a frozen copy of the base network in the train
state, outside the trained parameters: frozen_teacher.py), `sampler` (what generates from the trained
model), `grad_fn(exp)`,
`eval_loss_fn(exp)` (the held-out loss logged during training), `flops(config, dims, batch_size,
hardware)` (its parts of one step), `base_run(config)` and `starts_from_base(config)` (handoff.py).
`get(config)` returns the one `config.objective` names; `stage` says which command trains it.
"""

from __future__ import annotations

import functools

import jax

from cfmjax.models import flops, state_space
from cfmjax.objectives import ar, distill, fixed_point, frozen_teacher, loss_weights, losses

def _value_and_grad_fn(loss_fn):
  """(params, tokens, rng, ema_params, step, frozen_base) -> (grads, metrics) of a loss with no teacher or
  curriculum. Every objective's gradient function takes these arguments (train.make_train_step)."""
  grad = jax.value_and_grad(loss_fn, has_aux=True)

  def grad_fn(params, tokens, rng, ema_params, step, frozen_base=None):
    del ema_params, step, frozen_base
    (_, metrics), grads = grad(params, tokens, rng)
    return grads, metrics

  return grad_fn


def _flow_loss_fn(exp):
  return functools.partial(losses.flow_matching_loss, schedule=exp.schedule,
                           space=state_space.from_config(exp.apply_fn, exp.vocab_size, exp.config),
                           options=losses.flow_options(exp.config))


class Flow:
  """The base flow (SPEC §1, §2): the denoiser's cross-entropy at a random noise level."""

  name = "flow"
  stage = "base"  # trained by `cfmjax train` ('distill': `cfmjax distill`)
  sampler = "euler"  # what generates from a model trained with it (inference.SAMPLERS)

  def validate(self, config):
    del config

  def attach(self, init_fn, apply_fn, config):
    del config
    return init_fn, apply_fn

  def needs_frozen_base(self, config) -> bool:
    del config
    return False

  def eval_loss_fn(self, exp):
    return _flow_loss_fn(exp)

  def grad_fn(self, exp):
    return _value_and_grad_fn(self.eval_loss_fn(exp))

  def flops(self, config, dims: flops.Dims, batch: int, hardware: bool) -> dict:
    del config
    train = 2.0 * flops.train_macs(dims, batch, hardware, noise=True) + flops.noise_factor_flops(dims, True)
    return {"train": train, "total": train}

  def base_run(self, config) -> str:
    """The run this objective starts from ('' for none): its config is inherited (handoff.py)."""
    del config
    return ""

  def starts_from_base(self, config) -> bool:
    """Whether the first step starts from the base run's EMA parameters (else from scratch)."""
    del config
    return False


class AutoRegressive(Flow):
  """The autoregressive baseline: next-token cross-entropy of the causal trunk (no noise to draw)."""

  name = "ar"
  sampler = "ar"

  def validate(self, config):
    metric = config.train.get("best_metric", "")
    if metric and metric != "gen_nll_per_token":
      raise ValueError(f"the autoregressive baseline has no denoiser: train.best_metric={metric!r} cannot be "
                       f"measured; use 'gen_nll_per_token'")

  def eval_loss_fn(self, exp):
    return functools.partial(ar.next_token_loss, apply_fn=exp.apply_fn)

  def flops(self, config, dims, batch, hardware):
    del config
    train = 2.0 * flops.train_macs(dims, batch, hardware, noise=False)
    return {"train": train, "total": train}


class _Distillation(Flow):
  """What the distillation objectives share: learnable loss weights and, when the objective reads the
  base as it was, a frozen copy of it in the train state, outside the trained parameters
  (frozen_teacher.py)."""

  stage = "distill"

  def validate(self, config):
    distill.validate(config)
    if self.needs_frozen_base(config):
      frozen_teacher.validate(config)

  def attach(self, init_fn, apply_fn, config):
    return loss_weights.attach(init_fn, apply_fn, config.distill.learned_weighting)

  def grad_fn(self, exp):
    return distill.make_grad_fn(exp.apply_fn, exp.schedule, exp.vocab_size, exp.config)

  def base_run(self, config) -> str:
    if self.starts_from_base(config) and not config.init_from:
      raise ValueError("distill.mode='two_stage' needs --config.init_from=<base-flow workdir or exported "
                       "checkpoint>; use distill.mode='joint' to train from scratch")
    return config.init_from

  def starts_from_base(self, config) -> bool:
    return config.distill.mode == "two_stage"


class FlowMap(_Distillation):
  """PSD / LSD / ESD (SPEC §3): diagonal rows keep the flow's cross-entropy (or, guided, the frozen
  base's μ_ω), consistency rows learn the jump from the loss's teacher."""

  sampler = "flowmap"

  def __init__(self, name: str):
    self.name = name

  def needs_frozen_base(self, config) -> bool:
    return config.distill.guidance >= 0

  def teacher_macs(self, dims: flops.Dims, rows: int) -> float:
    """MACs of the (never differentiated) teacher on `rows` consistency rows."""
    fwd = flops.forward_flops(dims, rows) / 2.0
    state_map = flops.state_map_macs(dims, rows)  # ψW of a landing point or velocity (embedding space)
    if self.name == "psd":  # ψ(x, s, u), then ψ(X_{s,u}(x), u, t)
      return 2.0 * fwd + state_map
    if self.name == "lsd":  # a JVP in t at (s, t), the diagonal at the landing point
      return flops.jvp_macs(dims, rows, "t") + state_map + fwd
    return fwd + state_map + flops.jvp_macs(dims, rows, "xs")  # esd: the diagonal at (s, s), a JVP in (x, s)

  def flops(self, config, dims, batch, hardware):
    d = config.distill
    n_diag = distill.num_diagonal_rows(batch, float(d.diag_fraction))
    n_cons = batch - n_diag
    out = {"diagonal_rows": n_diag, "consistency_rows": n_cons, "loss": self.name,
           "diagonal": 2.0 * flops.train_macs(dims, n_diag, hardware) if n_diag else 0.0,
           "student": 2.0 * flops.train_macs(dims, n_cons, hardware),
           "teacher": 2.0 * self.teacher_macs(dims, n_cons),
           "noise_factor": flops.noise_factor_flops(dims, True)}
    if float(d.get("guidance", -1.0)) >= 0 and n_diag:
      # The guided diagonal's target: two frozen-base passes (conditional, unconditional) per row.
      out["teacher"] += 2.0 * flops.forward_flops(dims, n_diag)
    out["total"] = out["diagonal"] + out["student"] + out["teacher"] + out["noise_factor"]
    return out


class FixedPoint(_Distillation):
  """Fixed-point distillation (SPEC §8): the single pass learns the limit of the frozen
  self-conditioned base's iteration; every row is a student row with a teacher target."""

  name = "fixed_point"
  sampler = "euler"  # its student is a single-pass denoiser; a later PSD stage makes it a flow map

  def needs_frozen_base(self, config) -> bool:
    del config
    return True

  def validate(self, config):
    super().validate(config)
    # The model section is the base run's (handoff.inherit_base_config) by the time the experiment is
    # built: a base without a μ̂ input has no iteration to distil (it failed inside the first step).
    if config.init_from and not config.model.self_condition:
      raise ValueError(f"objective=fixed_point distils the base run's self-conditioning iteration, but "
                       f"{config.init_from} was trained with model.self_condition=False: train the base "
                       f"with --config.model.self_condition=True (experiments/conditional/"
                       f"markov_tiny_selfcond.py, text_tiny_selfcond.py)")

  def grad_fn(self, exp):
    return fixed_point.make_grad_fn(state_space.from_config(exp.apply_fn, exp.vocab_size, exp.config),
                                    exp.schedule, exp.config)

  def flops(self, config, dims, batch, hardware):
    iters = int(config.distill.get("fixed_point_iters", 1))
    out = {"diagonal_rows": 0, "consistency_rows": batch, "loss": self.name, "diagonal": 0.0,
           "student": 2.0 * flops.train_macs(dims, batch, hardware),
           # T^k(stopgrad S): k self-conditioned passes of the frozen base per target
           "teacher": 2.0 * iters * flops.forward_flops(dims, batch) / 2.0,
           "noise_factor": flops.noise_factor_flops(dims, True)}
    out["total"] = out["student"] + out["teacher"] + out["noise_factor"]
    return out


_BY_NAME = {o.name: o for o in (Flow(), AutoRegressive(), FlowMap("psd"), FlowMap("lsd"), FlowMap("esd"),
                                 FixedPoint())}
NAMES = tuple(_BY_NAME)


def get(config):
  """The objective `config.objective` names."""
  if config.objective not in _BY_NAME:
    raise ValueError(f"unknown objective={config.objective!r}; choose one of {NAMES} (--config.objective=...)")
  return _BY_NAME[config.objective]


def stage(config) -> str:
  """'base' (trained by `cfmjax train`) or 'distill' (`cfmjax distill`)."""
  return get(config).stage


def step_flops(config, *, vocab: int, batch_size: int | None = None, seq_len: int | None = None,
               hardware: bool = False) -> dict:
  """FLOPs of one train step of `config` (global batch) with the data's vocabulary `vocab`, with the
  objective's parts.

  Returns {'objective', 'total', 'forward', parts...}; `hardware` adds rematerialised work.
  """
  dims = flops.dims_from_config(config, seq_len=seq_len, vocab=vocab)
  batch = int(batch_size if batch_size is not None else config.train.batch_size)
  objective = get(config)
  out = {"objective": objective.name, "batch_size": batch, "seq_len": dims.seq_len, "vocab": dims.vocab,
         "state_space": "embedding" if dims.embedding_state else "vocab", "hardware": hardware,
         "forward": flops.forward_flops(dims, batch)}
  out.update(objective.flops(config, dims, batch, hardware))
  return out
