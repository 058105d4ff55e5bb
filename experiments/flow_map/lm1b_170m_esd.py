"""ESD flow-map distillation at the papers' LM1B (L = 128) scale (SPEC §3).

  cfmjax train   --config=experiments/base_flow/lm1b_170m.py --workdir=$BASE
  cfmjax distill --config=experiments/flow_map/lm1b_170m_esd.py --workdir=$FLOWMAP --config.init_from=$BASE
  cfmjax eval    --workdir=$FLOWMAP --sampler=flowmap --steps=1,2,4,8

Distils for 150k steps from the base checkpoint's EMA weights (the papers use 100k-200k), with a
quarter of each batch kept on the diagonal, an EMA teacher, AdamW 1e-4 after a short warmup, and the
base run's batch size. ESD takes one JVP in (s, x) through the network (model.attention must stay 'xla').
Reported (gen PPL under GPT-2 Large at 1 / 2 / 4 steps): 68.1 / 77.6 / 71.5.
"""

import os

from cfmjax.configs import from_file


def get_config():
  c = from_file(os.path.join(os.path.dirname(__file__), "..", "base_flow", "lm1b_170m.py"))
  c.stage = "distill"
  c.init_from = ""  # --config.init_from=<base workdir>
  c.distill.mode = "two_stage"
  c.distill.loss = "esd"
  c.distill.diag_fraction = 0.25
  c.distill.boundary_prob = 0.05
  c.distill.teacher = "ema"
  c.distill.gradient_surgery = False

  c.optim.lr = 1e-4
  c.optim.warmup_steps = 1000
  c.optim.decay = "constant"
  c.optim.ema_decay = 0.9999

  c.train.num_steps = 150_000
  c.train.eval_every = 0
  c.eval.steps = "1,2,4,8"
  return c
