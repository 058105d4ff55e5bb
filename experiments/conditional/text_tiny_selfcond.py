"""The FMLM* pipeline on the embedded Bible corpus: self-conditioned base flow (stage 1 of 3).

  cfmjax train   --config=experiments/conditional/text_tiny_selfcond.py --workdir=runs/text_sc
  cfmjax distill --config=experiments/conditional/text_tiny_fixed_point.py --workdir=runs/text_fp \
      --config.init_from=runs/text_sc
  cfmjax distill --config=experiments/conditional/text_tiny_fixed_point_psd.py --workdir=runs/text_fp_psd \
      --config.init_from=runs/text_fp
  cfmjax sample  --workdir=runs/text_fp_psd --sampler=flowmap --steps=2 --prompt="In the beginning"

Prompts: the base also trains with prefixes of 0-32 tokens (dropped 10% of the time), so every
stage can continue a prompt. Not measured on this machine (it was saturated while this was
written): expect each stage to take a few minutes on 2 free CPU cores, as text_tiny does.
"""

import os

from cfmjax.run.configs import from_file


def get_config():
  c = from_file(os.path.join(os.path.dirname(__file__), "..", "base_flow", "text_tiny.py"))
  c.model.self_condition = True
  c.flow.prompt.min_len = 0
  c.flow.prompt.max_len = 32
  c.flow.prompt.drop_prob = 0.1
  return c
