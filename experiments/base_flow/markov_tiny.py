"""Base flow on a synthetic order-1 Markov source over 16 tokens (SPEC §6): the quickest end-to-end check.

  cfmjax train --config=experiments/base_flow/markov_tiny.py --workdir=/tmp/markov_tiny
  cfmjax eval  --workdir=/tmp/markov_tiny --sampler=euler --steps=128,16,4

Expect (2 CPU cores): about 4.5 minutes of training (1200 steps at ~5 steps/s). With the skip
parametrisation and the posterior input (SPEC §9, model.py; on by default since issue 12) and the
detached per-position weight of SPEC §2 (flow.adaptive_weighting, (‖μ − x1‖² + 0.01)^(−1/2): up to
10x on confident, high-λ positions, whose errors the sampler's path weights by e^λ, SPEC §5),
measured with 512 samples by bench/recipe_ablation.py (results/recipe_ablation.md): Euler gen NLL
per token 1.896 / 1.906 at 128 steps for seeds 0 / 1 (1.32x / 1.33x the data's exact 1.431,
`data_nll_per_token`; without the weight 1.47x / 1.50x, before the skip term 1.66x), sample entropy
2.26 vs the data's 2.31; Euler with the exact denoiser reaches 1.448 (the `euler_exact` rows of
`cfmjax eval`). Held-out CE averaged over λ bins: 1.388 vs the exact posterior's 1.350 and the
context-free posterior's 1.443 (the weight trades average CE for the confident positions).
With self-conditioning as well: experiments/conditional/markov_tiny_selfcond.py (1.20x / 1.19x).
Twice the width (--config.model.d_model=192 --config.model.mlp_dim=768): 1.24x / 1.25x, about 4x the
parameters and past this config's few-minute budget (results/recipe_ablation.md, "Capacity").
1 Euler step collapses onto one repeated token.
The gap at few steps is what the flow-map stage closes (experiments/flow_map/markov_tiny_*.py).
Any data key can be overridden alone, e.g.
--config.data.markov.vocab_size=32 (the model's vocabulary follows).
"""

from cfmjax.run.configs import base_config


def get_config():
  c = base_config()
  c.data.source = "markov"
  c.data.seq_len = 32
  c.data.markov.vocab_size = 16
  c.data.markov.order = 1
  c.data.markov.concentration = 0.1  # sparse transitions: context matters, so samplers can be told apart

  c.model.d_model = 96
  c.model.num_layers = 3
  c.model.num_heads = 3
  c.model.mlp_dim = 384
  c.model.time_features = 64

  c.flow.schedule = "mixed"
  c.flow.adaptive_weighting = True  # recipe_aw in results/recipe_ablation.md: 1.47x -> 1.32x on this chain

  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.optim.decay = "cosine"
  c.optim.final_lr_fraction = 0.1
  c.optim.ema_decay = 0.999

  c.train.batch_size = 64
  c.train.num_steps = 1200
  c.train.log_every = 50
  c.train.eval_every = 400
  c.train.checkpoint_every = 400

  c.sample.steps = 128
  c.eval.steps = "128,16,4"
  c.eval.num_samples = 512
  return c
