"""Cost of one distillation step (PSD, LSD, ESD) relative to one base-flow step.

  python bench/distill_step_cost.py [--config=experiments/base_flow/markov_tiny.py] [--steps=20]

Times the compiled train step of each stage on this machine's devices, same model, same batch,
after a warm-up call (compile excluded), and prints a table; writes bench/results/distill_step_cost.json.
A ratio is only meaningful within one run: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from cfmjax import configs, experiment, train


def time_step(config, steps: int) -> float:
  exp = experiment.build(config, None)
  state = experiment.init_state(exp, 0)
  step_fn = train.make_train_step(exp)
  it = exp.data.train_iterator(config.train.batch_size, seed=0)
  batch = train.global_batch(exp, np.asarray(next(it)))
  with jax.set_mesh(exp.mesh):
    state, m = step_fn(state, batch)  # compile
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      state, m = step_fn(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="experiments/base_flow/markov_tiny.py")
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args()

  base = configs.from_file(args.config)
  rows = [("base", None, False)] + [(loss, loss, False) for loss in ("psd", "lsd", "esd")] + [("psd+surgery", "psd", True)]
  results = []
  base_time = None
  for name, loss, surgery in rows:
    c = configs.from_file(args.config)
    if loss is not None:
      with c.unlocked():
        c.stage = "distill"
        c.distill.mode = "joint"  # same network, no checkpoint needed to time a step
        c.distill.loss = loss
        c.distill.gradient_surgery = surgery
    seconds = time_step(c, args.steps)
    base_time = base_time or seconds
    results.append({"stage": name, "ms_per_step": 1000 * seconds, "relative_to_base": seconds / base_time})
    print(f"{name:12s} {1000 * seconds:8.1f} ms/step  {seconds / base_time:5.2f}x base", flush=True)

  out = {"config": args.config, "batch_size": base.train.batch_size, "seq_len": base.data.seq_len,
         "devices": [str(d) for d in jax.devices()], "results": results}
  os.makedirs("bench/results", exist_ok=True)
  with open("bench/results/distill_step_cost.json", "w") as f:
    json.dump(out, f, indent=2)
  print("| stage | ms/step | x base |\n|---|---|---|")
  for r in results:
    print(f"| {r['stage']} | {r['ms_per_step']:.1f} | {r['relative_to_base']:.2f} |")


if __name__ == "__main__":
  main()
