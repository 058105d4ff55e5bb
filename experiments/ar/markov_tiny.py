"""Autoregressive baseline on the order-1 Markov source: base_flow/markov_tiny's backbone, data, optimizer.

  cfmjax train --config=experiments/ar/markov_tiny.py --workdir=/tmp/ar_markov_tiny
  cfmjax eval  --workdir=/tmp/ar_markov_tiny

The same 3 x 96 causal transformer (cfmjax/ar.py), trained like the base flow (1200 steps of
64 x 32 tokens). `eval` writes the exact held-out NLL per token (metric "nll_per_token") and
KV-cached samples judged by the exact chain. RESULTS
"""

import os

from cfmjax.configs import from_file


def get_config():
  c = from_file(os.path.join(os.path.dirname(__file__), "..", "base_flow", "markov_tiny.py"))
  c.model.causal = True
  c.eval.steps = "1"  # ignored: the AR sampler always takes one network evaluation per position
  return c
