"""markov_tiny with prefix conditioning and prompt dropout, for classifier-free guidance (SPEC §8).

  cfmjax train --config=experiments/conditional/markov_tiny_prompt.py --workdir=/tmp/markov_prompt
  for w in 0 0.5 1 1.5 2 3; do
    cfmjax eval --workdir=/tmp/markov_prompt --steps=128 --prompt_len=24 --guidance=$w --num_samples=512
  done
  cfmjax sample --workdir=/tmp/markov_prompt --prompt="3 1 4" --block_size=8 --num_blocks=4

Each training row gets a clean prefix of 0-24 tokens (never noised, no loss), dropped with
probability 0.2 (prompt positions zeroed, no flag: the unconditional model). Evaluation conditions
on the first 24 tokens of held-out rows and judges the 8 generated ones exactly:
log p(continuation | prompt) from the chain. Measured results: README, section "Prompts, guidance,
self-conditioning and fixed-point distillation".
"""

import os

from cfmjax.configs import from_file


def get_config():
  c = from_file(os.path.join(os.path.dirname(__file__), "..", "base_flow", "markov_tiny.py"))
  c.flow.prompt.min_len = 0
  c.flow.prompt.max_len = 24
  c.flow.prompt.drop_prob = 0.2
  return c
