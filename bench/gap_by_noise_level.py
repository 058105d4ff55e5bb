"""Where along the sampling path does a trained Markov flow lose its gen NLL? (issue 12)

The Euler sampler is run with the model's denoiser on one side of a noise level λ* = log SNR and the
exact posterior (SPEC §9, forward-backward) on the other, for several λ*, and each run is judged
exactly. "exact below λ*" swaps the early, noisy part of the path for the ideal denoiser; "exact above
λ*" the late, clean part. The λ* at which the gen NLL moves shows where the model's errors cost
samples, which the λ-averaged CE of `cfmjax eval --denoiser_gap` does not say. The first step reads
the pure-noise state (τ = 0, λ = −∞), which is below every λ*.

  .venv/bin/python bench/gap_by_noise_level.py --workdir=W [--samples=512 --steps=128]

W is a base flow trained on the Markov source (e.g. `cfmjax train
--config=experiments/base_flow/markov_tiny.py --workdir=W`). Prints one JSON row per run and writes them
to W/eval/gap_by_noise_level.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cfmjax.evaluation import diagnostics, judges  # noqa: E402
from cfmjax.flow import oracles, schedules  # noqa: E402
from cfmjax.models import state_space  # noqa: E402
from cfmjax.run import loading  # noqa: E402
from cfmjax.sampling import samplers  # noqa: E402

LAMBDA_STARS = (-2.0, 0.0, 1.0, 2.0, 3.0, 4.0, 6.0)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--samples", type=int, default=512)
  ap.add_argument("--batch_size", type=int, default=256)
  ap.add_argument("--steps", type=int, default=128)
  ap.add_argument("--lambda_stars", default=",".join(map(str, LAMBDA_STARS)))
  args = ap.parse_args()

  exp, params, step = loading.load(args.workdir)
  vocab_space = state_space.resolve(exp.config.model.state_space, exp.vocab_size, exp.config.model.d_model) == "vocab"
  if exp.data.markov is None or exp.model_config.causal or not vocab_space:
    raise SystemExit("gap_by_noise_level needs a V-space base flow trained on the Markov source")
  markov, schedule = exp.data.markov, exp.schedule
  floor = markov.expected_nll_per_token(exp.config.data.seq_len)
  judge = judges.ExactMarkovJudge(markov)
  shape = (min(args.batch_size, args.samples), exp.config.data.seq_len, markov.vocab_size)

  with jax.enable_x64(True):  # the exact posterior runs in float64 (diagnostics.exact_logits_fn)
    exact = diagnostics.exact_logits_fn(oracles.MarkovPosterior.from_source(markov))

    def gen_nll(lam_star: float, exact_below: bool) -> float:
      def denoise(x, tau):
        gamma = schedule.gamma(tau)
        lam = schedules.log_snr(gamma)
        tau32 = tau.astype(jnp.float32)
        use_exact = lam[0] < lam_star if exact_below else lam[0] >= lam_star  # one τ for all rows per step
        # lax.cond runs one of the two denoisers per step (jnp.where would run both).
        return jax.lax.cond(use_exact, lambda: exact(x, gamma),
                            lambda: exp.apply_fn(params, x.astype(jnp.float32), tau32, tau32).astype(jnp.float32))

      fn = jax.jit(lambda rng: samplers.euler_sample(denoise, rng, shape, schedule, args.steps)[0])
      tokens = np.concatenate([np.asarray(fn(jax.random.key(i)))
                               for i in range(0, args.samples, shape[0])])[:args.samples]
      nll, count = judge.nll(tokens=tokens)
      return nll / count

    # exact below -inf: the model everywhere; exact below +inf: the exact denoiser everywhere.
    runs = [("model", -np.inf, True), ("exact", np.inf, True)]
    runs += [(f"exact below {s}", float(s), True) for s in args.lambda_stars.split(",")]
    runs += [(f"exact above {s}", float(s), False) for s in args.lambda_stars.split(",")]
    rows = []
    for name, lam_star, exact_below in runs:
      value = gen_nll(lam_star, exact_below)
      rows.append({"run": name, "lambda_star": lam_star if np.isfinite(lam_star) else None,
                   "gen_nll_per_token": value, "ratio_to_floor": value / floor, "floor": floor,
                   "steps": args.steps, "samples": args.samples, "checkpoint_step": int(step)})
      print(json.dumps(rows[-1]), flush=True)
  os.makedirs(os.path.join(args.workdir, "eval"), exist_ok=True)
  with open(os.path.join(args.workdir, "eval", "gap_by_noise_level.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
  main()
