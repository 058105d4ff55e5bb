"""Cost of one distillation step (PSD, LSD, ESD) relative to one base-flow step.

  python bench/distill_step_cost.py [--config=experiments/base_flow/markov_tiny.py] [--steps=20]

Times the compiled train step of each stage on this machine's first device, same model, same batch
(random token ids), after a warm-up call (compile excluded), and prints a table next to the ratio
that model FLOPs predict (`cfmjax/models/flops.py`: PSD = diagonal rows' base step + student forward and
backward + two teacher forwards on the consistency rows; LSD/ESD replace one teacher forward by a
JVP); writes bench/results/distill_step_cost.json. A ratio is only meaningful within one run: the
machine is shared and noisy.
"""

from __future__ import annotations

import argparse

import common
from cfmjax.run import configs


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="experiments/base_flow/markov_tiny.py")
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args()

  base = configs.from_file(args.config)
  rows = [("base", None, False)] + [(loss, loss, False) for loss in ("psd", "lsd", "esd")] + [("psd+surgery", "psd", True)]
  results = []
  base_row = None
  for name, loss, surgery in rows:
    c = configs.from_file(args.config)
    with c.unlocked():
      c.mesh.data = 1
      if loss is not None:
        c.objective = loss
        c.distill.mode = "joint"  # same network, no checkpoint needed to time a step
        c.distill.gradient_surgery = surgery
    row = dict(stage=name, **common.time_train_step(c, args.steps))
    base_row = base_row or row
    row["relative_to_base"] = row["ms_per_step"] / base_row["ms_per_step"]
    row["flops_relative_to_base"] = row["model_gflops_per_step"] / base_row["model_gflops_per_step"]
    row["memory_relative_to_base"] = row["peak_mib"] / base_row["peak_mib"]
    results.append(row)
    print(f"{name:12s} {row['ms_per_step']:8.1f} ms/step  {row['relative_to_base']:5.2f}x base "
          f"(model FLOPs {row['flops_relative_to_base']:.2f}x)", flush=True)

  common.print_table(results, ["stage", "ms_per_step", "relative_to_base", "flops_relative_to_base",
                               "peak_mib", "memory_relative_to_base", "gflops_per_sec"])
  common.write_results("distill_step_cost", {"config": args.config, "batch_size": base.train.batch_size,
                                             "seq_len": base.data.seq_len, "results": results})


if __name__ == "__main__":
  main()
