"""markov_tiny with self-conditioning (SPEC §8): the first stage of the FMLM* pipeline.

  cfmjax train --config=experiments/conditional/markov_tiny_selfcond.py --workdir=/tmp/markov_sc
  cfmjax eval  --workdir=/tmp/markov_sc --sampler=euler --steps=128,16,4

The previous estimate μ̂ enters through its own zero-initialised projection; half the training
rows first run a no-grad pass with μ̂ = 0 and feed its output; the Euler sampler feeds back its
last estimate. Compare with experiments/base_flow/markov_tiny.py (the same model without it).
Then: experiments/conditional/markov_tiny_fixed_point.py and markov_tiny_fixed_point_psd.py.

Measured on a saturated machine (both runs cut by SIGTERM: this one at step 350, the plain
markov_tiny at its step-400 checkpoint, i.e. 50 more steps for the plain model), 512 samples,
`PYTHONPATH=. python bench/conditional_sweep.py --workdir=W --steps=64,4 [--self_condition=1,0]`:
Euler gen NLL per token at 64 / 4 steps: self-conditioned, feeding μ̂ 3.06 / 3.53; the same model
fed μ̂ = 0 3.31 / 3.70; plain model (step 400) 3.09 / 3.53. Entropy 2.30-2.32 (data 2.31).
"""

import os

from cfmjax.configs import from_file


def get_config():
  c = from_file(os.path.join(os.path.dirname(__file__), "..", "base_flow", "markov_tiny.py"))
  c.model.self_condition = True
  c.model.state_space = "vocab"  # SPEC §8 features run on the V-space state (README: state space)
  return c
