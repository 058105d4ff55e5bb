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

from cfmjax.run.configs import as_distillation, from_file


def get_config():
  base = from_file(os.path.join(os.path.dirname(__file__), "..", "base_flow", "lm1b_170m.py"))
  return as_distillation(base, "esd", num_steps=150_000, lr=1e-4, warmup_steps=1000, ema_decay=0.9999,
                         gap_warmup_steps=10_000, boundary_prob=0.05)
