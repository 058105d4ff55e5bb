"""This machine's CPU matmul peak, the denominator of MFU on CPU (the trainer reads the JSON).

  python bench/cpu_matmul_peak.py [--size=2048] [--repeats=10]

Times a square jitted matmul per dtype on ONE XLA CPU device with all the process's cores (XLA's CPU
matmul is multi-threaded), keeps the best of `repeats` runs, and caches the result for THIS machine
(flops.cpu_peak_path(): $CFMJAX_CACHE/cpu_peak/<machine id>.json, never committed): {"peak_flops":
{dtype: FLOP/s}, "machine_id", "measured_at", "load_average", ...}. The trainer uses it only on the
machine that measured it, and divides it among the fake CPU devices of a mesh (they share these
cores). Without it, MFU on CPU is null. Best-of-N on an idle machine, because the peak is what the
cores can do, not what they did while others were busy: with a 1-minute load average above
--max_load the script measures nothing and says so (--max_load=inf to measure anyway).
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
from cfmjax.models import flops  # noqa: E402


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
  parser.add_argument("--out", default=None, help="default: flops.cpu_peak_path(), this machine's cache")
  parser.add_argument("--max_load", type=float, default=0.5,
                      help="refuse when the 1-minute load average is above this (other work is running)")
  args = parser.parse_args()
  args.out = args.out or flops.cpu_peak_path()
  load = os.getloadavg()[0]
  if load > args.max_load:
    sys.exit(f"the 1-minute load average is {load:.2f} (> --max_load={args.max_load}): other work is running, and "
             f"a peak measured now would be too low (MFUs above 1 later). Measure on an idle machine.")
  peaks = {dtype: best_matmul_flops(args.size, dtype, args.repeats) for dtype in ("float32", "bfloat16")}
  out = {"peak_flops": peaks, "machine_id": flops.machine_id(), "cpu_model": flops.cpu_model(),
         "cpu_count": os.cpu_count(), "measured_at": time.strftime("%Y-%m-%dT%H:%M", time.gmtime()),
         "load_average": [load, os.getloadavg()[0]], "matmul_size": args.size, "repeats": args.repeats,
         "jax": jax.__version__}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  print("| dtype | peak GFLOP/s |\n|---|---|")
  for dtype, peak in peaks.items():
    print(f"| {dtype} | {peak / 1e9:.1f} |")
  print(f"{out['cpu_model']}, {out['cpu_count']} cores -> {args.out}")


if __name__ == "__main__":
  main()
