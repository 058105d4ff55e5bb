"""This machine's CPU matmul peak, the denominator of MFU on CPU (the trainer reads the JSON).

  python bench/cpu_matmul_peak.py [--size=2048] [--repeats=10]

Times a square jitted matmul per dtype on ONE XLA CPU device with all the process's cores (XLA's CPU
matmul is multi-threaded), keeps the best of `repeats` runs, and writes
bench/results/cpu_matmul_peak.json: {"peak_flops": {dtype: FLOP/s}, "cpu_model", "cpu_count"}. The
trainer uses it only on a CPU of the same model and core count, and divides it among the fake CPU
devices of a mesh (they share these cores). Best-of-N, because the machine is shared: the peak is
what the cores can do, not what they did while others were busy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cfmjax import flops  # noqa: E402


def best_matmul_flops(size: int, dtype: str, repeats: int) -> float:
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.dtype(dtype))
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.dtype(dtype))
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))  # compile
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    best = min(best, time.perf_counter() - t)
  return 2.0 * size ** 3 / best


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", type=int, default=2048)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--out", default=flops.DEFAULT_CPU_PEAK_PATH)
  args = parser.parse_args()
  peaks = {dtype: best_matmul_flops(args.size, dtype, args.repeats) for dtype in ("float32", "bfloat16")}
  out = {"peak_flops": peaks, "cpu_model": flops.cpu_model(), "cpu_count": os.cpu_count(),
         "matmul_size": args.size, "repeats": args.repeats, "jax": jax.__version__}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  print("| dtype | peak GFLOP/s |\n|---|---|")
  for dtype, peak in peaks.items():
    print(f"| {dtype} | {peak / 1e9:.1f} |")
  print(f"{out['cpu_model']}, {out['cpu_count']} cores -> {args.out}")


if __name__ == "__main__":
  main()
