"""The flow's trunk without the flow (issue 12): can the block stack learn a Markov source at all when
it is trained as a masked LM (bidirectional, clean context, no noise) or as a causal LM?

  .venv/bin/python bench/trunk_probe.py --objective=causal --source=o2_v32_c05
  .venv/bin/python bench/trunk_probe.py --objective=masked --source=o2_v32_c05 --mask_rate=0.3
  .venv/bin/python bench/trunk_probe.py --objective=masked --source=o2_v32_c05 --local_mix=2 --gate_init=1

The network is `model.FlowTransformer` at markov_tiny's size, fed one-hot tokens (masked positions: a
zero vector) at τ = 1, with no skip term and a random head, trained with markov_tiny's optimiser. It
prints the held-out CE every --every steps next to the source's unigram entropy (a model that uses no
context) and the exact CE of the same task from the chain's forward-backward (SPEC §9: a masked
position has no evidence, a visible one is certain), so "learned the context" reads as the share of
that gap closed. A flow can only learn what this trunk learns from clean context.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from cfmjax.data.markov import MarkovSource  # noqa: E402
from cfmjax.flow import oracles  # noqa: E402
from cfmjax.models import model as model_lib  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from recipe_ablation import SOURCES  # noqa: E402

# A visible position's evidence in the oracle: γ this close to 1 makes it certain in float64.
VISIBLE_GAMMA = 1.0 - 1e-4


def visible_mask(objective: str, rng, shape, mask_rate: float):
  """[B, L] bool, True where the network sees the clean token (masked: Bernoulli(1 − mask_rate);
  causal: everything, the attention does the hiding)."""
  if objective == "causal":
    return np.ones(shape, bool)
  return rng.random(shape) >= mask_rate


def network_input(objective: str, tokens, visible, vocab: int):
  """One-hot tokens, zero where masked; causal: shifted right by one (position l predicts token l)."""
  x = jax.nn.one_hot(tokens, vocab) * visible[..., None]
  if objective == "causal":
    x = jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
  return x


def target_weight(objective: str, visible):
  """Which positions are scored: every one (causal), the masked ones (masked)."""
  return np.ones(visible.shape, np.float32) if objective == "causal" else (~visible).astype(np.float32)


def exact_ce(posterior: oracles.MarkovPosterior, objective: str, tokens, visible) -> float:
  """The Bayes CE of the task on these rows: −log p(token | what the network sees), averaged over the
  scored positions (causal: p(x_l | x_<l), one forward-backward per position with the future hidden)."""
  vocab = posterior.vocab_size
  onehot = np.eye(vocab)[tokens]
  length = tokens.shape[1]
  nll, weight = [], target_weight(objective, visible)
  for l in (range(length) if objective == "causal" else [None]):
    seen = visible.copy() if l is None else (np.arange(length) < l)[None].repeat(len(tokens), 0)
    gamma = np.where(seen, VISIBLE_GAMMA, 0.0)
    probs = posterior.denoiser(jnp.asarray(onehot), jnp.asarray(gamma))
    p = np.take_along_axis(np.asarray(probs, np.float64), tokens[..., None], -1)[..., 0]
    nll.append(-np.log(np.maximum(p, 1e-30)) if l is None else -np.log(np.maximum(p[:, l], 1e-30)))
  nll = nll[0] if objective != "causal" else np.stack(nll, axis=1)
  return float(np.sum(nll * weight) / np.sum(weight))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--objective", choices=("masked", "causal"), default="masked")
  ap.add_argument("--source", default="o2_v32_c05", choices=sorted(SOURCES))
  ap.add_argument("--mask_rate", type=float, default=0.3)
  ap.add_argument("--local_mix", type=int, default=0)
  ap.add_argument("--gate_init", type=float, default=0.0)
  ap.add_argument("--causal_attention", action="store_true", help="masked objective with causal attention")
  ap.add_argument("--steps", type=int, default=1200)
  ap.add_argument("--every", type=int, default=200)
  ap.add_argument("--seq_len", type=int, default=32)
  ap.add_argument("--batch_size", type=int, default=64)
  ap.add_argument("--eval_rows", type=int, default=256)
  args = ap.parse_args()

  s = SOURCES[args.source]
  source = MarkovSource(s["vocab_size"], s["order"], s["concentration"], seed=s["seed"])
  posterior = oracles.MarkovPosterior.from_source(source)
  vocab, length = s["vocab_size"], args.seq_len
  cfg = model_lib.ModelConfig(vocab_size=vocab, d_model=96, num_layers=3, num_heads=3, mlp_dim=384,
                              time_features=64, gate_init=args.gate_init, local_mix=args.local_mix,
                              causal=args.objective == "causal" or args.causal_attention)
  init_fn, apply_fn = model_lib.build(cfg)
  params = nn.meta.unbox(init_fn(jax.random.key(0), 1, length))
  # markov_tiny's optimiser: 1e-3 peak, 100 warmup steps (fewer in a short run), cosine to 10%
  warmup = min(100, max(1, args.steps // 10))
  opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, warmup, args.steps, 1e-4), weight_decay=0.0)
  opt_state = opt.init(params)

  def loss_fn(p, x, tokens, weight):
    tau = jnp.ones((tokens.shape[0],), jnp.float32)
    logp = jax.nn.log_softmax(apply_fn(p, x, tau, tau))
    ce = -jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]
    return jnp.sum(ce * weight) / jnp.sum(weight)

  @jax.jit
  def step(p, o, x, tokens, weight):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, tokens, weight)
    updates, o = opt.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  rng, held = np.random.default_rng(0), np.random.default_rng(10**6)
  eval_tokens = source.sample(held, args.eval_rows, length)
  eval_visible = visible_mask(args.objective, held, eval_tokens.shape, args.mask_rate)
  eval_x = network_input(args.objective, jnp.asarray(eval_tokens), eval_visible, vocab)
  eval_w = target_weight(args.objective, eval_visible)
  unigram = posterior.unigram()
  context_free = float(-np.sum(unigram * np.log(unigram)))
  exact = exact_ce(posterior, args.objective, eval_tokens, eval_visible)
  print(f"{args.objective} on {args.source}: held-out CE without context (unigram entropy) {context_free:.4f}, "
        f"exact {exact:.4f}", flush=True)
  start = time.time()
  for i in range(1, args.steps + 1):
    tokens = source.sample(rng, args.batch_size, length)
    visible = visible_mask(args.objective, rng, tokens.shape, args.mask_rate)
    params, opt_state, _ = step(params, opt_state, network_input(args.objective, jnp.asarray(tokens), visible, vocab),
                                jnp.asarray(tokens), jnp.asarray(target_weight(args.objective, visible)))
    if i % args.every == 0 or i == args.steps:
      ce = float(loss_fn(params, eval_x, jnp.asarray(eval_tokens), jnp.asarray(eval_w)))
      closed = (context_free - ce) / max(context_free - exact, 1e-9)
      elapsed = time.time() - start
      print(f"step {i}/{args.steps} | held-out CE {ce:.4f} | closed {closed:.2f} | "
            f"{elapsed:.0f} s, ETA {elapsed / i * (args.steps - i):.0f} s", flush=True)


if __name__ == "__main__":
  main()
