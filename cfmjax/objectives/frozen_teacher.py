"""A frozen copy of the base network carried inside the distillation state (SPEC §8).

Guided distillation (the student's diagonal learns the base model's guided denoiser μ_ω) and
fixed-point distillation (the student's single pass learns the limit of the base model's
self-conditioning iteration) both need the *base* network as it was, not the student's EMA:
an EMA teacher whose own diagonal is being moved would compound ω, or iterate a map that is
itself changing. The copy lives beside the model's parameters under params["frozen_teacher"]
(as the learnable loss weights do), so it is checkpointed, sharded and restored with the state
and needs no change to the trainer. It is filled from the base run at handoff
(`handoff.start_from_base`), only ever read under stop_gradient, so its gradient is exactly zero
and AdamW (with weight decay 0, checked in `validate`) never moves it; its EMA is itself.
"""

from __future__ import annotations

import jax

PARAMS_KEY = "frozen_teacher"


def validate(config):
  """Checks for the objectives that keep a frozen base (objectives.py: guided flow maps, fixed point)."""
  if config.distill.mode != "two_stage":
    raise ValueError("guided and fixed-point distillation start from a trained base run: use "
                     "distill.mode='two_stage' with --config.init_from=<base workdir>")
  if config.optim.weight_decay != 0:
    raise ValueError("guided / fixed-point distillation keep a frozen teacher inside the parameters; "
                     "weight decay would move it: set optim.weight_decay=0")


def attach(init_fn, apply_fn):
  """Wraps (init_fn, apply_fn) so that params also hold a (frozen) copy of the network's params."""

  def init_with_teacher(rng, batch_size, length):
    params = dict(init_fn(rng, batch_size, length))
    params[PARAMS_KEY] = {k: v for k, v in params.items() if k != PARAMS_KEY}
    return params

  def apply_model(params, *args, **kwargs):
    return apply_fn({k: v for k, v in params.items() if k != PARAMS_KEY}, *args, **kwargs)

  return init_with_teacher, apply_model


def teacher_params(params):
  """The frozen network's parameters (under stop_gradient: nothing may train them)."""
  return jax.lax.stop_gradient(params[PARAMS_KEY])
