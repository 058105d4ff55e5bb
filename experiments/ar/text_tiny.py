"""Autoregressive baseline on the embedded corpus: base_flow/text_tiny's backbone, data and optimizer.

  cfmjax train --config=experiments/ar/text_tiny.py --workdir=runs/ar_text_tiny
  cfmjax eval  --workdir=runs/ar_text_tiny --judge=ar:runs/ar_text_tiny
  cfmjax eval  --workdir=runs/text_tiny --judge=ar:runs/ar_text_tiny --steps=1,2,4,8,128 --likelihood

The same 3 x 128 causal transformer (learned start vector, embedding gather, no time input; see
cfmjax/ar.py), trained 600 steps of 32 x 64 tokens. Its tokenizer is trained into the workdir exactly
as the flow's is, so the AR judge scores the flow's token ids directly. RESULTS
"""

import os

from cfmjax.configs import from_file


def get_config():
  c = from_file(os.path.join(os.path.dirname(__file__), "..", "base_flow", "text_tiny.py"))
  c.model.causal = True
  c.eval.steps = "1"  # ignored: the AR sampler always takes one network evaluation per position
  return c
