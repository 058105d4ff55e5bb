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

from cfmjax.configs import from_file


def get_config():
  c = from_file(os.path.join(os.path.dirname(__file__), "..", "base_flow", "text_tiny.py"))
  c.stage = "distill"
  c.init_from = ""  # --config.init_from=<base workdir>
  c.distill.mode = "two_stage"
  c.distill.loss = "psd"
  c.distill.diag_fraction = 0.25
  c.distill.boundary_prob = 0.1
  c.distill.teacher = "ema"

  c.optim.lr = 3e-4
  c.optim.warmup_steps = 50
  c.optim.decay = "constant"
  c.optim.ema_decay = 0.99

  c.train.num_steps = 400
  c.train.eval_every = 0
  c.eval.steps = "1,2,4,8"
  return c
