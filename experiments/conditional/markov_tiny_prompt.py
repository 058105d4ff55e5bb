"""markov_tiny with prefix conditioning and prompt dropout, for classifier-free guidance (SPEC §8).

  cfmjax train --config=experiments/conditional/markov_tiny_prompt.py --workdir=/tmp/markov_prompt
  for w in 0 0.5 1 1.5 2 3; do
    cfmjax eval --workdir=/tmp/markov_prompt --steps=128 --prompt_len=24 --guidance=$w --num_samples=512
  done
  cfmjax sample --workdir=/tmp/markov_prompt --prompt="3 1 4" --block_size=8 --num_blocks=4

Each training row gets a clean prefix of 0-24 tokens (never noised, no loss), dropped with
probability 0.2 (prompt positions zeroed, no flag: the unconditional model). Evaluation conditions
on the first 24 tokens of held-out rows and judges the 8 generated ones exactly:
log p(continuation | prompt) from the chain.

Measured on a machine saturated by other jobs, so training was cut at step 400 of 1200 (SIGTERM;
the checkpoint is the EMA at step 400); Euler 64 steps, 512 prompts of 24 held-out tokens, 8 judged
tokens each, with `PYTHONPATH=. python bench/conditional_sweep.py --workdir=/tmp/i5_prompt
--guidance=0,0.5,1,1.5,2,3 --prompt_len=24 --steps=64 --num_samples=512`:
conditional gen NLL per token (entropy of the 8 generated tokens; data 1.69, floor = entropy
rate 1.39): ω=0 3.85 (1.69), 0.5 3.55 (1.68), 1 3.29 (1.69), 1.5 3.29 (1.69), 2 3.21 (1.69),
3 3.10 (1.68). NLL falls from ω = 0 to 1 and a little beyond; at this (undertrained) scale the
entropy of 8-token continuations barely moves.
"""

import os

from cfmjax.run.configs import from_file


def get_config():
  c = from_file(os.path.join(os.path.dirname(__file__), "..", "base_flow", "markov_tiny.py"))
  c.flow.prompt.min_len = 0
  c.flow.prompt.max_len = 24
  c.flow.prompt.drop_prob = 0.2
  return c
