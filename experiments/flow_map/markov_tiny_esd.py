"""ESD flow-map distillation of the markov_tiny base flow (SPEC §3).

  cfmjax train   --config=experiments/base_flow/markov_tiny.py --workdir=/tmp/markov_base
  cfmjax distill --config=experiments/flow_map/markov_tiny_esd.py --workdir=/tmp/markov_esd \
      --config.init_from=/tmp/markov_base
  cfmjax eval    --workdir=/tmp/markov_esd --sampler=flowmap --steps=1,2,4,8

Same settings as markov_tiny_psd.py with the Eulerian (one JVP in (s, x)) teacher;
its JVPs need the forward-differentiable attention (model.attention = "xla", the default).
ESD here uses the whole run as gap curriculum and a looser clamp (min_ratio 0.05): with the PSD
file's settings (curriculum over 400 steps, min_ratio 1e-3) it collapsed at 1 step (NLL 14.9,
entropy 0.74) and only matched Euler at 2-8 steps. Measured on main with these settings (2026-12-03, 512 samples, exact judge, from today's
markov_tiny base; Euler in brackets): gen NLL per token 3.28 (Euler collapses: entropy 0) at 1 step,
2.63 (3.02) at 2, 2.34 (2.19) at 4, 2.34 at 8; sample entropy 2.24-2.28 against the data's 2.31
(PSD: 2.81 / 2.28 / 2.18).
"""

import os

from cfmjax.run.configs import from_file


def get_config():
  c = from_file(os.path.join(os.path.dirname(__file__), "markov_tiny_psd.py"), "esd")
  c.distill.gap_warmup_steps = 600  # the whole run
  c.distill.min_ratio = 0.05
  return c
