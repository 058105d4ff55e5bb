"""Train-step time and peak memory: the flow vs the autoregressive model of the same dimensions.

  python bench/train_step.py [--vocabs=8192,32768] [--d_model=128 --layers=2 --heads=4 --mlp=512]
                             [--seq_len=128 --batch=8] [--steps=5]

For each vocabulary size: the base-flow step (V-space state; and the embedding-space state when this
checkout has `model.state_space`), and the AR step (`objective=ar`, next-token loss; needs
cfmjax/objectives/ar.py). Time is the median of `steps` compiled steps after a warm-up (compile excluded) on
this machine's first device; memory is XLA's compiled memory_analysis, temporaries + arguments. The
machine is shared: compare rows of one run, not across runs. Writes bench/results/train_step.json.
"""

from __future__ import annotations

import argparse

import common
from cfmjax.run import configs


def variants():
  """(name, overrides) of the rows to time; the ones this checkout cannot run are reported as such."""
  rows = [("flow", {"model.state_space": "vocab"} if "state_space" in configs.base_config().model else {})]
  if "state_space" in configs.base_config().model:
    rows.append(("flow_embedding", {"model.state_space": "embedding"}))
  rows.append(("ar", {"objective": "ar"}))
  return rows


def main():
  parser = argparse.ArgumentParser()
  common.add_size_flags(parser)
  parser.add_argument("--vocabs", default="8192,32768")
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()
  results = []
  for vocab in (int(v) for v in args.vocabs.split(",")):
    flow = None
    for name, overrides in variants():
      row = {"model": name, "vocab": vocab}
      try:
        if name == "ar":
          common.require_ar()
        row.update(common.time_train_step(common.sized_config(args, vocab, **overrides), args.steps))
      except RuntimeError as e:
        row["error"] = str(e)
        print(f"{name} V={vocab}: {e}", flush=True)
      if name == "flow":
        flow = row
      if flow and "ms_per_step" in row and "ms_per_step" in flow:
        row["time_vs_flow"] = row["ms_per_step"] / flow["ms_per_step"]
        row["memory_vs_flow"] = row["peak_mib"] / flow["peak_mib"]
      results.append(row)
      print(row, flush=True)
  common.print_table(results, ["model", "vocab", "ms_per_step", "peak_mib", "model_gflops_per_step",
                               "gflops_per_sec", "time_vs_flow", "memory_vs_flow"])
  common.write_results("train_step", {"args": vars(args), "results": results})


if __name__ == "__main__":
  main()
