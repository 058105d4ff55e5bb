"""markov_tiny with self-conditioning (SPEC §8): the first stage of the FMLM* pipeline.

  cfmjax train --config=experiments/conditional/markov_tiny_selfcond.py --workdir=/tmp/markov_sc
  cfmjax eval  --workdir=/tmp/markov_sc --sampler=euler --steps=128,16,4

The previous estimate μ̂ enters through its own zero-initialised projection; half the training
rows first run a no-grad pass with μ̂ = 0 and feed its output; the Euler sampler feeds back its
last estimate. Compare with experiments/base_flow/markov_tiny.py (the same model without it).
Then: experiments/conditional/markov_tiny_fixed_point.py and markov_tiny_fixed_point_psd.py.

With markov_tiny's adaptive weighting and the residual gates started open (model.gate_init = 1),
this is `recipe_aw_sc` of results/recipe_ablation.md, the best base-flow recipe measured on Markov
sources (bench/recipe_ablation.py, 1200 steps, 512 samples, Euler at 128 steps, gen NLL / floor):
markov_tiny's chain 1.20x / 1.19x (seeds 0 / 1; 1.47x / 1.50x without either change), o1_v48_c03
1.30x / 1.30x (1.29x / 1.40x), o1_v32_c05 1.14x (1.16x), the order-2 o2_v32_c05 1.65x (1.65x: no
context learned either way). Entropy 2.23 vs the data's 2.31 on markov_tiny's chain (-3.3%). It
costs one extra forward pass per training step.

Earlier, measured on a saturated machine (both runs cut by SIGTERM: this one at step 350, the plain
markov_tiny at its step-400 checkpoint, i.e. 50 more steps for the plain model), 512 samples,
`PYTHONPATH=. python bench/conditional_sweep.py --workdir=W --steps=64,4 [--self_condition=1,0]`:
Euler gen NLL per token at 64 / 4 steps: self-conditioned, feeding μ̂ 3.06 / 3.53; the same model
fed μ̂ = 0 3.31 / 3.70; plain model (step 400) 3.09 / 3.53. Entropy 2.30-2.32 (data 2.31).
"""

import os

from cfmjax.run.configs import from_file


def get_config():
  c = from_file(os.path.join(os.path.dirname(__file__), "..", "base_flow", "markov_tiny.py"))
  c.model.self_condition = True
  c.model.gate_init = 1.0  # as measured (recipe_aw_sc): residual branches start open
  return c
