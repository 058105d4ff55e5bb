"""PSD flow-map distillation of the text_tiny base flow (embedded Bible corpus).

  cfmjax train   --config=experiments/base_flow/text_tiny.py --workdir=runs/text_tiny
  cfmjax distill --config=experiments/flow_map/text_tiny_psd.py --workdir=runs/text_tiny_psd \
      --config.init_from=runs/text_tiny
  cfmjax sample  --workdir=runs/text_tiny_psd --sampler=flowmap --steps=4

Model, tokenizer and schedule come from the base run. A few minutes on 2 CPU cores. Expect 1-4 step
flow-map samples that look like the base flow's many-step samples (Bible-like words, little
grammar at this size) rather than the base flow's blurry few-step output.
"""

import os

from cfmjax.run.configs import as_distillation, from_file


def get_config():
  base = from_file(os.path.join(os.path.dirname(__file__), "..", "base_flow", "text_tiny.py"))
  return as_distillation(base, "psd", num_steps=400, lr=3e-4, warmup_steps=50, ema_decay=0.99,
                         gap_warmup_steps=250)
