"""Learning curves of the base flow and the autoregressive baseline on the same Markov source (issue 12).

Both models come from experiments/base_flow/markov_tiny.py (the AR sets objective=ar, as
experiments/ar/markov_tiny.py does), run with the real trainer. The learning rate is constant after
warmup, so a curve does not depend on the configured run length. Every --every steps, the in-training
diagnostics (diagnostics.training_diagnostics) judge --samples samples exactly. The flow uses Euler
at --sampler_steps steps; the AR decodes one token per step.

  .venv/bin/python bench/learning_curves.py --sources=o1_v16,o2_v32_c05 --steps=1200 --every=100

Writes results/learning_curves/<source>-s<seed>.json (both curves) and .png (gen NLL / floor against
step, with the 1.10x line), and appends a row per source to results/learning_curves.md: the first
evaluated step at which each model is at or below 1.10x the floor (or "not reached"), and the
last value.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from recipe_ablation import SOURCES, train_with  # noqa: E402

TARGET = 1.10  # issue 12: steps to reach 1.10x the floor, flow against AR


def curve(model: str, source: str, seed: int, steps: int, every: int, samples: int, sampler_steps: int,
          workroot: str) -> dict:
  overrides = {f"data.markov.{k}": v for k, v in SOURCES[source].items()}
  overrides.update({"objective": "ar" if model == "ar" else "flow", "seed": seed, "data.shuffle_seed": seed,
                    "train.num_steps": steps, "optim.decay": "constant", "train.diagnostics_every": every,
                    "train.diagnostics_samples": samples, "train.diagnostics_steps": sampler_steps,
                    "train.eval_every": 0, "train.checkpoint_every": steps, "train.log_every": every})
  rows, minutes, command = train_with(overrides, os.path.join(workroot, f"{model}-{source}-s{seed}"))
  return dict(model=model, command=command, minutes=minutes,
              step=[r["step"] for r in rows], gen_nll_per_token=[r["gen_nll_per_token"] for r in rows],
              gen_entropy=[r["gen_entropy"] for r in rows], floor=rows[-1]["data_nll_per_token"])


def first_step_at_target(c: dict):
  return next((s for s, v in zip(c["step"], c["gen_nll_per_token"]) if v <= TARGET * c["floor"]), None)


def plot(curves: list[dict], title: str, path: str):
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for c in curves:
    label = "flow (Euler)" if c["model"] == "flow" else "autoregressive"
    ax.plot(c["step"], [v / c["floor"] for v in c["gen_nll_per_token"]], marker="o", label=label)
  ax.axhline(TARGET, color="gray", linestyle="--", label=f"{TARGET}x floor")
  ax.axhline(1.0, color="black", linewidth=0.8, label=f"floor {curves[0]['floor']:.3f} nats/token")
  ax.set_xlabel("training step")
  ax.set_ylabel("exact gen NLL / floor")
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--sources", default="o1_v16,o2_v32_c05")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--steps", type=int, default=1200)
  ap.add_argument("--every", type=int, default=100)
  ap.add_argument("--samples", type=int, default=256)
  ap.add_argument("--sampler_steps", type=int, default=128)
  ap.add_argument("--models", default="flow,ar")
  ap.add_argument("--out", default="results/learning_curves")
  ap.add_argument("--workroot", default="runs/learning_curves")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  table = args.out.rstrip("/") + ".md"
  if not os.path.exists(table):
    with open(table, "w") as f:
      f.write("| source | seed | steps | every | samples | flow @1.10x | AR @1.10x | flow last / floor "
              "| AR last / floor | minutes (flow, AR) |\n|---|---|---|---|---|---|---|---|---|---|\n")
  for source in args.sources.split(","):
    curves = [curve(m, source, args.seed, args.steps, args.every, args.samples, args.sampler_steps,
                    args.workroot) for m in args.models.split(",")]
    name = f"{source}-s{args.seed}"
    with open(os.path.join(args.out, name + ".json"), "w") as f:
      json.dump(curves, f, indent=1)
    plot(curves, f"{source}, seed {args.seed}: Euler@{args.sampler_steps} vs AR, {args.samples} samples",
         os.path.join(args.out, name + ".png"))
    by = {c["model"]: c for c in curves}
    cell = lambda m, f: f(by[m]) if m in by else "-"  # noqa: E731
    reached = lambda c: str(first_step_at_target(c) or "not reached")  # noqa: E731
    last = lambda c: f"{c['gen_nll_per_token'][-1] / c['floor']:.2f}"  # noqa: E731
    line = (f"| {source} | {args.seed} | {args.steps} | {args.every} | {args.samples} | {cell('flow', reached)} | "
            f"{cell('ar', reached)} | {cell('flow', last)} | {cell('ar', last)} | "
            f"{', '.join(format(c['minutes'], '.1f') for c in curves)} |")
    print(line, flush=True)
    with open(table, "a") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  main()
