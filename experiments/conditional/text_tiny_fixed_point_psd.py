"""FMLM* on text_tiny, stage 3 of 3: PSD flow-map distillation of the fixed-point student.

  cfmjax distill --config=experiments/conditional/text_tiny_fixed_point_psd.py --workdir=runs/text_fp_psd \
      --config.init_from=runs/text_fp
  cfmjax sample  --workdir=runs/text_fp_psd --sampler=flowmap --steps=2 [--renoise=0.5]
"""

import os


def get_config():
  from cfmjax.run.configs import from_file  # noqa: PLC0415

  c = from_file(os.path.join(os.path.dirname(__file__), "..", "flow_map", "text_tiny_psd.py"))
  c.sample.feed_back_estimate = False
  return c
