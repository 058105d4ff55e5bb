"""Recipe ablation for the base flow (issue 12): each variant × Markov source × seed is trained with the
real trainer (`train.train`, as `cfmjax train` runs it), with the in-training diagnostics on, and the
last diagnostics row is tabulated: the denoiser's held-out CE against the exact and context-free
posteriors (means over λ bins, SPEC §9) and the exact gen NLL of Euler samples against the floor.

  .venv/bin/python bench/recipe_ablation.py --variants=baseline,recipe --sources=o1_v16,o2_v32_c05 \
      --seeds=0,1 --steps=1200 --out=results/recipe_ablation.md

Sources are generated here (`SOURCES`), never the private ones. Variants are config overrides on top of
experiments/base_flow/markov_tiny.py (`VARIANTS`). Rows append to --out as they finish (a crash loses
nothing), and each row states the command that reproduces it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cfmjax.run import configs  # noqa: E402
from cfmjax.training import train  # noqa: E402

CONFIG = os.path.join(os.path.dirname(__file__), "..", "experiments", "base_flow", "markov_tiny.py")

# name -> data.markov overrides (vocab, order, concentration, chain seed)
SOURCES = {
    "o1_v16": dict(vocab_size=16, order=1, concentration=0.1, seed=0),  # markov_tiny's public chain
    "o1_v48_c03": dict(vocab_size=48, order=1, concentration=0.3, seed=11),
    "o1_v64_c1": dict(vocab_size=64, order=1, concentration=1.0, seed=12),
    "o2_v32_c05": dict(vocab_size=32, order=2, concentration=0.5, seed=13),
    "o2_v48_c01": dict(vocab_size=48, order=2, concentration=0.1, seed=14),  # nearly pairwise-silent
    "o1_v32_c05": dict(vocab_size=32, order=1, concentration=0.5, seed=21),
}

# name -> config overrides; "baseline" is the recipe before issue 12 (every new switch off). Rows
# labelled "recipe" before 2026-12-03 measured today's "skip" (the defaults then).
OFF = {"model.skip": False, "model.gate_init": 0.0, "model.posterior_input": False}
VARIANTS = {
    "baseline": OFF,
    "skip": dict(OFF, **{"model.skip": True}),
    "skip_gates": dict(OFF, **{"model.skip": True, "model.gate_init": 1.0}),
    "recipe": {},  # today's defaults in cfmjax/run/configs.py and the config file
    # + self-conditioning (SPEC §8) with the residual gates started on
    "recipe_sc": {"model.self_condition": True, "model.gate_init": 1.0},
    # + a depthwise convolution over positions ±2 at the start of every block (model.local_mix)
    "recipe_mix": {"model.local_mix": 2},
    "skip_mix": dict(OFF, **{"model.skip": True, "model.local_mix": 2}),
    # today's defaults at 3x the learning rate (markov_tiny's 1e-3 -> 3e-3)
    "recipe_lr3e-3": {"optim.lr": 3e-3},
    # + the detached per-position weight (‖μ − x1‖² + 0.01)^(−1/2) of SPEC §2, which puts up to 10x the
    # weight on confident (high-λ) positions, where the sampler's path error is weighted most (SPEC §5)
    "recipe_aw": {"flow.adaptive_weighting": True},
    # recipe_aw with self-conditioning (as recipe_sc)
    "recipe_aw_sc": {"flow.adaptive_weighting": True, "model.self_condition": True, "model.gate_init": 1.0},
    # recipe_aw at a constant learning rate after warmup: for runs many times the configured length
    "recipe_aw_const": {"flow.adaptive_weighting": True, "optim.decay": "constant"},
    "recipe_aw_const_lr3e-3": {"flow.adaptive_weighting": True, "optim.decay": "constant", "optim.lr": 3e-3},
    # recipe_aw at 4x the batch (same steps, so 4x the compute): does the gradient's signal-to-noise
    # ratio, not the step count, hold back the sources whose loss carries little context signal?
    "recipe_aw_b256": {"flow.adaptive_weighting": True, "train.batch_size": 256},
    # a share of the rows noised with one level per position (corruption.position_times), so that
    # targets are seen next to cleaner neighbours; markov_tiny.py's weight is on in all of these
    "recipe_pn25": {"flow.position_noise": 0.25},
    "recipe_pn50": {"flow.position_noise": 0.5},
    # the blocks and the head start on (random head, gates at 1) and see their neighbours at full
    # weight (local_mix): no zero-gradient start for a context the loss has no pairwise signal for
    "recipe_on": {"model.head_init_scale": 1.0, "model.gate_init": 1.0, "model.local_mix": 2},
    "recipe_on_pn50": {"model.head_init_scale": 1.0, "model.gate_init": 1.0, "model.local_mix": 2,
                       "flow.position_noise": 0.5},
    # the same weight at power 1: up to 100x on confident positions
    "recipe_aw1": {"flow.adaptive_weighting": True, "flow.weight_power": 1.0},
    # today's defaults at twice the width, and at twice the depth (issue 12 lists width among the
    # candidates): is the denoiser's error in λ ∈ [1, 3] a matter of capacity?
    "recipe_w2": {"model.d_model": 192, "model.mlp_dim": 768},
    "recipe_l6": {"model.num_layers": 6},
}


def train_with(overrides: dict, workdir: str) -> tuple[list[dict], float, str]:
  """Trains CONFIG with `overrides` into a fresh `workdir` with the real trainer. Returns its metrics
  rows that carry an exact gen NLL (the in-training diagnostics), the minutes it took, and the command."""
  config = configs.override(configs.from_file(CONFIG), overrides)
  shutil.rmtree(workdir, ignore_errors=True)
  start = time.time()
  train.train(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [r for r in map(json.loads, f) if "gen_nll_per_token" in r]
  command = ("cfmjax train --config=experiments/base_flow/markov_tiny.py --workdir=W "
             + " ".join(f"--config.{k}={v}" for k, v in overrides.items()))
  return rows, (time.time() - start) / 60, command


def run_one(variant: str, source: str, seed: int, steps: int, workroot: str, every: int = 0, samples: int = 512,
            sampler_steps: int = 128) -> dict:
  overrides = dict(VARIANTS[variant])
  overrides.update({f"data.markov.{k}": v for k, v in SOURCES[source].items()})
  overrides.update({"seed": seed, "data.shuffle_seed": seed, "train.num_steps": steps,
                    "train.diagnostics_every": every or steps, "train.diagnostics_samples": samples,
                    "train.diagnostics_steps": sampler_steps, "train.diagnostics_rows": 256,
                    "train.eval_every": 0, "train.checkpoint_every": steps, "train.log_every": 100})
  rows, minutes, command = train_with(overrides, os.path.join(workroot, f"{variant}-{source}-s{seed}"))
  last = rows[-1]
  return dict(variant=variant, source=source, seed=seed, steps=steps, minutes=minutes,
              command=command, **{k: last[k] for k in ("denoiser_ce", "exact_ce", "context_free_ce",
                                                        "gen_nll_per_token", "gen_entropy", "data_nll_per_token")})


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--variants", default="baseline,recipe")
  ap.add_argument("--sources", default="o1_v16,o2_v32_c05")
  ap.add_argument("--seeds", default="0")
  ap.add_argument("--steps", type=int, default=1200)
  ap.add_argument("--diagnostics_every", type=int, default=0, help="also diagnose every N steps (0: at the end only); "
                  "the row reports the last, metrics.jsonl of the run keeps them all")
  ap.add_argument("--samples", type=int, default=512, help="Euler samples per diagnostic (exact judge)")
  ap.add_argument("--sampler_steps", type=int, default=128, help="Euler steps per sample")
  ap.add_argument("--out", default="results/recipe_ablation.md")
  ap.add_argument("--workroot", default="runs/recipe_ablation")
  args = ap.parse_args()
  new = not os.path.exists(args.out)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "a") as f:
    if new:
      f.write("| variant | source | seed | steps | CE model | CE exact | CE context-free | closed | gen NLL @128 "
              "| floor | gen/floor | entropy | min |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
  for source in args.sources.split(","):
    for variant in args.variants.split(","):
      for seed in (int(s) for s in args.seeds.split(",")):
        r = run_one(variant, source, seed, args.steps, args.workroot, args.diagnostics_every, args.samples,
                    args.sampler_steps)
        # "closed": the fraction of the context-free posterior's excess CE the model has removed.
        closed = (r["context_free_ce"] - r["denoiser_ce"]) / max(r["context_free_ce"] - r["exact_ce"], 1e-9)
        line = (f"| {variant} | {source} | {seed} | {r['steps']} | {r['denoiser_ce']:.4f} | {r['exact_ce']:.4f} | "
                f"{r['context_free_ce']:.4f} | {closed:.2f} | {r['gen_nll_per_token']:.3f} | "
                f"{r['data_nll_per_token']:.3f} | {r['gen_nll_per_token'] / r['data_nll_per_token']:.2f} | "
                f"{r['gen_entropy']:.3f} | {r['minutes']:.1f} |")
        print(line, flush=True)
        with open(args.out, "a") as f:
          f.write(line + "\n")
        with open(args.out.replace(".md", ".jsonl"), "a") as f:
          f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main()
