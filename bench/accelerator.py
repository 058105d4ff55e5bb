"""The accelerator benchmark (GPU or TPU): owt_170m train steps and generation, on synthetic tokens.

  python bench/accelerator.py [--batch=32] [--gen_batches=32,256] [--length=1024] [--steps=10]

Measures, on the first device, with experiments/base_flow/owt_170m.py's model (bf16, V = 50257):
1. train-step time, model TFLOP/s and MFU against the device's table peak (flops.py), and the compiled
   peak memory, for the base flow and for PSD distillation (joint mode: the same network, no
   checkpoint needed), at --batch sequences of --length per step;
2. generation of --length tokens at each of --gen_batches: the flow map at 1 / 2 / 4 steps, Euler at
   --euler_steps, and KV-cached AR decoding of a causal model of the same size (latency, tokens/s);
3. the device's peak memory in use over the whole run (where the runtime reports it).
Reuses bench/common.py (sized configs, timed train steps) and bench/generation.py (timed samplers).
Needs no dataset and no network. Prints one table and writes bench/results/accelerator.json after
every row ("complete": true once every row ran), so a run cut short keeps what it measured.
On a CPU it refuses to run: the figures would say nothing about an accelerator. `--smoke` runs every
path at a toy size on any device (what the test suite does, so the script cannot rot unnoticed while
no accelerator is at hand); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

import common
import generation
from cfmjax.models import flops
from cfmjax.run import configs

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments", "base_flow", "owt_170m.py")


SMOKE = {"model.d_model": 32, "model.num_layers": 1, "model.num_heads": 2, "model.mlp_dim": 64,
         "model.time_features": 16, "data.tokenizer.vocab_size": 512}


def owt_170m(batch: int, length: int, smoke: bool = False, **overrides):
  c = configs.from_file(CONFIG)
  if smoke:
    configs.override(c, SMOKE)
  with c.unlocked():
    c.data.seq_len = length
    c.train.batch_size = batch
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
  return configs.override(c, overrides)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--length", type=int, default=1024)
  parser.add_argument("--steps", type=int, default=10, help="timed train steps per row; 0 skips the train rows")
  parser.add_argument("--gen_batches", default="32,256")
  parser.add_argument("--euler_steps", type=int, default=128)
  parser.add_argument("--samplers", default="flowmap,euler,ar", help="which generation rows to run")
  parser.add_argument("--repeats", type=int, default=3, help="timed generation calls per row (best is kept)")
  parser.add_argument("--smoke", action="store_true", help="toy size, any device: checks the script runs")
  args = parser.parse_args()
  device = jax.devices()[0]
  if device.platform == "cpu" and not args.smoke:
    sys.exit("bench/accelerator.py measures a GPU or TPU, and this process sees only CPU devices "
             f"({jax.device_count()} x {device.device_kind}). Run it on the accelerator machine; for CPU figures "
             "use bench/train_step.py and bench/generation.py.")
  peak = flops.device_peak(device, "bfloat16")
  rows = []

  def record(rows, complete=False):
    """Prints the newest row and rewrites the JSON, so that a run cut short keeps what it measured."""
    if not complete:
      print(rows[-1], flush=True)
    if not args.smoke:
      stats = device.memory_stats() or {}
      common.write_results("accelerator", {
          "complete": complete, "device_kind": device.device_kind, "peak_flops": peak.flops,
          "peak_source": peak.source, "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
          "length": args.length, "args": vars(args), "rows": rows})

  for name, overrides in (("base flow", {}),
                          ("PSD distillation", {"objective": "psd", "distill.mode": "joint"})):
    if not args.steps:
      break
    r = common.time_train_step(owt_170m(args.batch, args.length, args.smoke, **overrides), args.steps)
    mfu = r["gflops_per_sec"] * 1e9 / peak.flops if peak.flops else None
    rows.append({"what": f"train step: {name}", "batch": args.batch, "ms": r["ms_per_step"],
                 "model_tflops_per_sec": r["gflops_per_sec"] / 1e3, "mfu": mfu, "compiled_peak_gib": r["peak_mib"] / 1024})
    record(rows)
  for batch in (int(b) for b in args.gen_batches.split(",")):
    for sampler, steps in (("flowmap", 1), ("flowmap", 2), ("flowmap", 4), ("euler", args.euler_steps),
                           ("ar", args.length)):
      if sampler not in args.samplers.split(","):
        continue
      config = owt_170m(batch, args.length, args.smoke, **({"objective": "ar"} if sampler == "ar" else {}))
      r = generation.time_generation(config, sampler, steps, batch, repeats=args.repeats)
      rows.append({"what": f"generate {args.length} tokens: {sampler} {steps} steps", "batch": batch,
                   "ms": 1000 * r["latency_s"], "tokens_per_sec": r["tokens_per_sec"]})
      record(rows)
  stats = device.memory_stats() or {}
  peak_in_use = stats.get("peak_bytes_in_use")
  common.print_table(rows, ["what", "batch", "ms", "model_tflops_per_sec", "mfu", "compiled_peak_gib",
                            "tokens_per_sec"])
  memory = f"{peak_in_use / 2**30:.1f} GiB" if peak_in_use else "not reported by this runtime"
  print(f"device {device.device_kind}; MFU against {peak.source}; peak memory in use over the run: {memory}")
  if args.smoke:
    print("--smoke: toy sizes, figures not written")
    return
  record(rows, complete=True)


if __name__ == "__main__":
  main()
