"""PSD (semigroup) flow-map distillation of the markov_tiny base flow (SPEC §3).

Two commands: train the base flow, then distil it.

  cfmjax train   --config=experiments/base_flow/markov_tiny.py --workdir=/tmp/markov_base
  cfmjax distill --config=experiments/flow_map/markov_tiny_psd.py --workdir=/tmp/markov_psd \
      --config.init_from=/tmp/markov_base
  cfmjax eval    --workdir=/tmp/markov_psd --sampler=flowmap --steps=1,2,4,8

The model, data and schedule come from the base run (its config.json); this file sets only the
distillation. Expect (2 CPU cores, a few minutes): at 1, 2 and 4 flow-map steps a clearly lower
exact gen NLL per token than the base flow's Euler sampler at the same number of steps, with sample
entropy close to the data's. Switch `distill.loss` to lsd / esd for the other consistency losses
(`markov_tiny_lsd.py`, `markov_tiny_esd.py`).
"""

import os

from cfmjax.configs import from_file


def get_config(loss: str = "psd"):
  # Start from the base run's config file so the two stay in step (the model itself is taken from
  # the base workdir's config.json at run time).
  c = from_file(os.path.join(os.path.dirname(__file__), "..", "base_flow", "markov_tiny.py"))
  c.stage = "distill"
  c.init_from = ""  # set on the command line: --config.init_from=<base workdir>
  c.distill.mode = "two_stage"
  c.distill.loss = loss
  c.distill.diag_fraction = 0.25
  c.distill.boundary_prob = 0.1
  c.distill.teacher = "ema"

  c.optim.lr = 3e-4
  c.optim.warmup_steps = 50
  c.optim.decay = "constant"
  c.optim.ema_decay = 0.99

  c.train.num_steps = 600
  c.train.log_every = 25
  c.train.eval_every = 0
  c.train.checkpoint_every = 200

  c.eval.steps = "1,2,4,8"
  return c
