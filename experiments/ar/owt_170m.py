"""Autoregressive baseline at OpenWebText scale: base_flow/owt_170m's backbone (12 x 768), data, optimizer.

  cfmjax train --config=experiments/ar/owt_170m.py --workdir=gs://BUCKET/runs/ar_owt_170m \
      --config.data.tfds.data_dir=/path/to/tensorflow_datasets
  cfmjax eval  --workdir=gs://BUCKET/runs/ar_owt_170m --judge=gpt2:/path/to/gpt2-large

A causal transformer of the flow's size (cfmjax/objectives/ar.py: embedding gather, learned start vector, a
constant in place of the time input), L = 1024, trained with the flows' optimizer. Not run here (it
needs an accelerator pod and OpenWebText); published AR baselines of this size reach a held-out
perplexity in the low twenties on OWT with the GPT-2 tokenizer.
"""

import os

from cfmjax.run.configs import from_file


def get_config():
  c = from_file(os.path.join(os.path.dirname(__file__), "..", "base_flow", "owt_170m.py"))
  c.objective = "ar"
  c.eval.steps = "1"  # ignored: the AR sampler always takes one network evaluation per position
  return c
