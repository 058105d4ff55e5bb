"""Base flow on a synthetic order-1 Markov source over 16 tokens (SPEC §6): the quickest end-to-end check.

  cfmjax train --config=experiments/base_flow/markov_tiny.py --workdir=/tmp/markov_tiny
  cfmjax eval  --workdir=/tmp/markov_tiny --sampler=euler --steps=128,16,4

Expect (2 CPU cores): training in under 5 minutes; at 128 Euler steps a gen NLL per token close
to the source's exact per-token entropy (the `data_nll_per_token` field; the chain's entropy rate is
`entropy_rate`), with sample entropy close to the data's. Fewer steps give higher gen NLL: that gap is
what the distillation stage closes. Any data key can be overridden alone, e.g.
--config.data.markov.vocab_size=32 (the model's vocabulary follows).
"""

from cfmjax.configs import base_config


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
