"""ESD flow-map distillation of the markov_tiny base flow (SPEC §3).

  cfmjax train   --config=experiments/base_flow/markov_tiny.py --workdir=/tmp/markov_base
  cfmjax distill --config=experiments/flow_map/markov_tiny_esd.py --workdir=/tmp/markov_esd \
      --config.init_from=/tmp/markov_base
  cfmjax eval    --workdir=/tmp/markov_esd --sampler=flowmap --steps=1,2,4,8

Same settings as markov_tiny_psd.py with the Eulerian (one JVP in (s, x)) teacher;
its JVPs need the forward-differentiable attention (model.attention = "xla", the default).
Expect 1/2/4-step gen NLL clearly below the base flow's Euler sampler at the same steps;
ESD is reported to be weakest at 1 step and strongest at 2-4.
"""

import os

from cfmjax.configs import from_file


def get_config():
  return from_file(os.path.join(os.path.dirname(__file__), "markov_tiny_psd.py"), "esd")
