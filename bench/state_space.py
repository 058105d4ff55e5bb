"""One base train step with the state in V-space vs in embedding space (SPEC §4), at a large vocabulary.

  python bench/state_space.py [--vocab=32768] [--d_model=256] [--layers=4] [--seq=128] [--batch=8] [--steps=5]

Builds the base-flow train step (loss, gradient, AdamW update; the same function `cfmjax train`
compiles, minus the data pipeline: tokens are random) for each variant, times it after a warm-up
call (compile excluded, median of --steps) and reads the compiled program's temporary memory from
XLA's `memory_analysis()`. Prints a table; writes bench/results/state_space.json.

Variants: vocab (x ∈ R^V, full logits: the reference), embedding (h = xW, Cholesky noise), each
also with the output reduced in vocabulary chunks (model.vocab_chunk). The machine is shared, so
compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import flax.linen as nn
import jax
import numpy as np
import optax

from cfmjax.flow import schedules
from cfmjax.models import model as model_lib, state_space
from cfmjax.objectives import losses
from cfmjax.run import configs, experiment


def make_step(cfg: model_lib.ModelConfig, embedded: bool, chunk: int, batch: int, seq: int):
  init_fn, apply_fn = model_lib.build(cfg)
  space = state_space.StateSpace(apply_fn, cfg.vocab_size, embedded=embedded, vocab_chunk=chunk, dtype=cfg.dtype)
  schedule = schedules.get_schedule("linear", cfg.vocab_size)
  optimizer, _ = experiment.make_optimizer(configs.base_config().optim, 100)  # AdamW as in training
  params = nn.meta.unbox(init_fn(jax.random.key(0), 1, seq))
  opt_state = optimizer.init(params)

  def step(params, opt_state, tokens, rng):
    loss_fn = lambda p: losses.flow_matching_loss(p, tokens, rng, space=space, schedule=schedule)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, cfg.vocab_size)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, tokens, jax.random.key(2)).compile()
  return compiled, params, opt_state, tokens


def measure(cfg, embedded, chunk, batch, seq, steps):
  compiled, params, opt_state, tokens = make_step(cfg, embedded, chunk, batch, seq)
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
  params, opt_state, loss = compiled(params, opt_state, tokens, jax.random.key(3))  # warm-up
  jax.block_until_ready(loss)
  times = []
  for i in range(steps):
    t = time.perf_counter()
    params, opt_state, loss = compiled(params, opt_state, tokens, jax.random.key(4 + i))
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t)
  return {"seconds": float(np.median(times)), "temp_bytes": temp, "loss": float(loss)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--vocab", type=int, default=32768)
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--chunk", type=int, default=4096)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "state_space.json"))
  args = parser.parse_args()

  cfg = model_lib.ModelConfig(vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers,
                              num_heads=max(1, args.d_model // 64), mlp_dim=4 * args.d_model, dtype=args.dtype)
  variants = [("vocab", False, 0), ("vocab+chunk", False, args.chunk), ("embedding", True, 0),
              ("embedding+chunk", True, args.chunk)]
  rows = []
  for name, embedded, chunk in variants:
    r = measure(cfg, embedded, chunk, args.batch, args.seq, args.steps)
    rows.append(dict(r, variant=name, vocab_chunk=chunk))
    print(f"measured {name}: {r}", flush=True)
  ref = rows[0]
  print(f"\nbase train step, V={args.vocab} D={args.d_model} layers={args.layers} seq={args.seq} "
        f"batch={args.batch} dtype={args.dtype}, {jax.devices()[0].platform} x{jax.device_count()}")
  print("| variant | vocab_chunk | step (s) | speedup vs vocab | temp memory (MiB) | temp vs vocab |")
  print("|---|---|---|---|---|---|")
  fmt = lambda v, spec: "-" if v is None else format(v, spec)
  for r in rows:
    r["speedup_vs_vocab"] = ref["seconds"] / r["seconds"]
    mib = None if r["temp_bytes"] is None else r["temp_bytes"] / 2**20
    r["temp_ratio_vs_vocab"] = None if mib is None else r["temp_bytes"] / ref["temp_bytes"]
    print(f"| {r['variant']} | {r['vocab_chunk']} | {r['seconds']:.3f} | {r['speedup_vs_vocab']:.2f}x | "
          f"{fmt(mib, '.1f')} | {fmt(r['temp_ratio_vs_vocab'], '.2f')} |")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"config": vars(args), "device": str(jax.devices()[0]), "device_count": jax.device_count(),
               "rows": rows}, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
