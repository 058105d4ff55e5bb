"""The frozen base network that guided and fixed-point distillation read (SPEC §8).

Guided distillation (the student's diagonal learns the base model's guided denoiser μ_ω) and
fixed-point distillation (the student's single pass learns the limit of the base model's
self-conditioning iteration) both need the *base* network as it was, not the student's EMA: an EMA
teacher whose own diagonal is being moved would compound ω, or iterate a map that is itself changing.

The copy is an entry of the train state beside the parameters, state[STATE_KEY] (experiment.py), not
a part of them: the optimizer and the EMA never see it, so it costs one copy of the network instead
of four (parameters, EMA, Adam's two moments), and no setting of the optimizer can move it. It is
checkpointed and sharded with the state, filled from the base run at handoff
(`handoff.start_from_base`), and passed to the objective's gradient function as `frozen_base`, which
reads it under stop_gradient. Checkpoints of schema version 2 and older kept it inside the parameters
(params[STATE_KEY]); checkpointing.py moves it out when it restores one.
"""

from __future__ import annotations

STATE_KEY = "frozen_teacher"


def validate(config):
  """Checks for the objectives that keep a frozen base (objectives: guided flow maps, fixed point)."""
  if config.distill.mode != "two_stage":
    raise ValueError("guided and fixed-point distillation start from a trained base run: use "
                     "distill.mode='two_stage' with --config.init_from=<base workdir>")
