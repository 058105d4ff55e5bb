"""LSD flow-map distillation of the markov_tiny base flow (SPEC §3).

  cfmjax train   --config=experiments/base_flow/markov_tiny.py --workdir=/tmp/markov_base
  cfmjax distill --config=experiments/flow_map/markov_tiny_lsd.py --workdir=/tmp/markov_lsd \
      --config.init_from=/tmp/markov_base
  cfmjax eval    --workdir=/tmp/markov_lsd --sampler=flowmap --steps=1,2,4,8

Same settings as markov_tiny_psd.py with the Lagrangian (one JVP in t) teacher;
its JVPs need the forward-differentiable attention (model.attention = "xla", the default).
LSD here uses the whole run as gap curriculum and a looser clamp (min_ratio 0.05), as ESD does.
Measured on main (2026-12-03, 512 samples, exact judge, from today's markov_tiny base; Euler in
brackets): gen NLL per token 3.69 (Euler collapses: entropy 0) at 1 step, 2.53 (3.02) at 2, 2.39
(2.19) at 4, 2.40 at 8; sample entropy 2.27-2.28 against the data's 2.31 (PSD: 2.81 / 2.28 / 2.18).
Earlier, with the PSD file's settings (curriculum over 400 steps, min_ratio 1e-3), it reached lower
NLL but 10% less entropy than the data; with no curriculum it was worse than Euler at every step count.
"""

import os

from cfmjax.run.configs import from_file


def get_config():
  c = from_file(os.path.join(os.path.dirname(__file__), "markov_tiny_psd.py"), "lsd")
  c.distill.gap_warmup_steps = 600  # the whole run
  c.distill.min_ratio = 0.05
  return c
