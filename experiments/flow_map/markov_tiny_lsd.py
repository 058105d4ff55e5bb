"""LSD flow-map distillation of the markov_tiny base flow (SPEC §3).

  cfmjax train   --config=experiments/base_flow/markov_tiny.py --workdir=/tmp/markov_base
  cfmjax distill --config=experiments/flow_map/markov_tiny_lsd.py --workdir=/tmp/markov_lsd \
      --config.init_from=/tmp/markov_base
  cfmjax eval    --workdir=/tmp/markov_lsd --sampler=flowmap --steps=1,2,4,8

Same settings as markov_tiny_psd.py with the Lagrangian (one JVP in t) teacher;
its JVPs need the forward-differentiable attention (model.attention = "xla", the default).
Expect 1/2/4-step gen NLL clearly below the base flow's Euler sampler at the same steps;
a distillation step costs about two base steps (one JVP + one teacher forward).
"""

import os

from cfmjax.configs import from_file


def get_config():
  return from_file(os.path.join(os.path.dirname(__file__), "markov_tiny_psd.py"), "lsd")
