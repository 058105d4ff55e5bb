"""FMLM* on text_tiny, stage 2 of 3: fixed-point distillation (see text_tiny_selfcond.py).

  cfmjax distill --config=experiments/conditional/text_tiny_fixed_point.py --workdir=runs/text_fp \
      --config.init_from=runs/text_sc

The objective is unconditional (fixed_point.py): the student's plain pass learns the limit of the
frozen base's self-conditioning iteration without a prompt; prompts still work at sampling time
through the prompt flag the student inherits, but that path is not refined by this stage.
"""

import os

from cfmjax.run.configs import as_distillation, from_file


def get_config():
  # The model section is the base run's at handoff; starting from the self-conditioned config keeps this
  # file valid on its own (fixed point refuses a model without self-conditioning).
  base = from_file(os.path.join(os.path.dirname(__file__), "text_tiny_selfcond.py"))
  c = as_distillation(base, "fixed_point", num_steps=300, lr=3e-4, warmup_steps=50, ema_decay=0.99,
                      gap_warmup_steps=0)
  c.sample.feed_back_estimate = False
  c.eval.steps = "128,16,4"
  return c
