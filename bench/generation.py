"""Generation latency and throughput: k-step flow map vs Euler vs KV-cached autoregressive decoding.

  python bench/generation.py [--lengths=128,1024] [--flowmap_steps=1,2,4] [--euler_steps=128]
                             [--vocab=1024 --d_model=128 --layers=2 --heads=4 --mlp=512] [--batch=4]

One model size for all samplers (randomly initialised: speed does not depend on the weights). For
each sequence length: the flow map at k = 1, 2, 4 network evaluations, the Euler sampler of the base
flow, and KV-cached AR decoding of a causal model of the same dimensions (`inference.generate(...,
"ar", ...)`, needs cfmjax/objectives/ar.py). Latency is one call generating `batch` sequences (compile
excluded, best of `repeats`, default 1: Euler at L = 1024 is minutes on 2 cores); throughput is tokens per second. Model GFLOPs per call come from
`flops.generation_flops`. Writes bench/results/generation.json.
"""

from __future__ import annotations

import argparse
import time

import jax

import common
from cfmjax.models import flops
from cfmjax.run import experiment, inference


def time_generation(config, sampler: str, steps: int, batch: int, repeats: int) -> dict:
  exp = common.build(config)
  params = experiment.init_state(exp, 0)["params"]
  best = float("inf")
  with exp.activate():
    try:  # compiled once, ahead of the timed calls (inference.generate re-jits on every call)
      fn = inference.make_generator(exp, inference.Sampling(sampler, steps, batch))
      fn = fn.lower(params, jax.random.key(0)).compile()
      run = lambda seed: jax.block_until_ready(fn(params, jax.random.key(seed)))
    except ValueError:  # a sampler only `inference.generate` knows (the AR decoder)
      run = lambda seed: inference.generate(exp, params, inference.Sampling(sampler, steps, batch), batch, seed)
      run(0)  # compile (and a first run)
    for i in range(repeats):
      t = time.perf_counter()
      run(i + 1)
      best = min(best, time.perf_counter() - t)
  length = config.data.seq_len
  gflops = flops.generation_flops(exp.config, sampler, steps, batch, vocab=exp.vocab_size) / 1e9
  return {"latency_s": best, "tokens_per_sec": batch * length / best, "model_gflops": gflops,
          "gflops_per_sec": gflops / best}


def main():
  parser = argparse.ArgumentParser()
  common.add_size_flags(parser, batch=4)
  parser.add_argument("--vocab", type=int, default=1024)
  parser.add_argument("--lengths", default="128,1024")
  parser.add_argument("--flowmap_steps", default="1,2,4")
  parser.add_argument("--euler_steps", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=1)
  args = parser.parse_args()
  results = []
  for length in (int(x) for x in args.lengths.split(",")):
    runs = [("flowmap", int(k)) for k in args.flowmap_steps.split(",")]
    runs += [("euler", args.euler_steps), ("ar", length)]
    ar_row = None
    for sampler, steps in runs:
      row = {"sampler": sampler, "steps": steps, "length": length, "batch": args.batch}
      try:
        overrides = {}
        if sampler == "ar":
          common.require_ar()
          overrides = {"objective": "ar"}
        config = common.sized_config(args, args.vocab, seq_len=length, **overrides)
        row.update(time_generation(config, sampler, steps, args.batch, args.repeats))
      except (RuntimeError, ValueError) as e:
        row["error"] = str(e)
      results.append(row)
      if sampler == "ar":
        ar_row = row
      print(row, flush=True)
    if ar_row and "latency_s" in ar_row:  # speed-up over AR of every flow sampler at this length
      for r in results:
        if r["length"] == length and "latency_s" in r:
          r["speedup_vs_ar"] = ar_row["latency_s"] / r["latency_s"]
  common.print_table(results, ["sampler", "steps", "length", "batch", "latency_s", "tokens_per_sec",
                               "model_gflops", "gflops_per_sec", "speedup_vs_ar"])
  common.write_results("generation", {"args": vars(args), "results": results})


if __name__ == "__main__":
  main()
