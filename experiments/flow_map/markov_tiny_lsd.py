"""LSD flow-map distillation of the markov_tiny base flow (SPEC §3).

  cfmjax train   --config=experiments/base_flow/markov_tiny.py --workdir=/tmp/markov_base
  cfmjax distill --config=experiments/flow_map/markov_tiny_lsd.py --workdir=/tmp/markov_lsd \
      --config.init_from=/tmp/markov_base
  cfmjax eval    --workdir=/tmp/markov_lsd --sampler=flowmap --steps=1,2,4,8

Same settings as markov_tiny_psd.py with the Lagrangian (one JVP in t) teacher;
its JVPs need the forward-differentiable attention (model.attention = "xla", the default).
Measured (512 samples, exact judge; Euler in brackets): gen NLL per token 3.29 (Euler collapses)
at 1 step, 2.70 (3.37) at 2, 2.58 (2.83) at 4, 2.79 (2.60) at 8; sample entropy 2.27 / 2.08 / 2.07 /
2.25 against the data's 2.31 (sharper than the data at 2-4 steps). Without the gap curriculum
(distill.gap_warmup_steps=0) LSD was worse than Euler at every step count.
"""

import os

from cfmjax.configs import from_file


def get_config():
  return from_file(os.path.join(os.path.dirname(__file__), "markov_tiny_psd.py"), "lsd")
