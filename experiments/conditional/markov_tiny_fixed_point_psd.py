"""PSD flow-map distillation of the fixed-point-distilled markov_tiny flow: FMLM*'s last stage.

  cfmjax distill --config=experiments/conditional/markov_tiny_fixed_point_psd.py --workdir=/tmp/markov_fp_psd \
      --config.init_from=/tmp/markov_fp
  cfmjax eval    --workdir=/tmp/markov_fp_psd --sampler=flowmap --steps=1,2,4,8 [--renoise=0.5]

The same distillation as experiments/flow_map/markov_tiny_psd.py; only its starting point differs
(see markov_tiny_fixed_point.py for the whole pipeline).
"""

import os


def get_config():
  from cfmjax.run.configs import from_file  # noqa: PLC0415

  c = from_file(os.path.join(os.path.dirname(__file__), "..", "flow_map", "markov_tiny_psd.py"))
  c.sample.feed_back_estimate = False
  return c
