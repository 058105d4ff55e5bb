"""Sweeps of the conditional samplers on a Markov run, one compiled sampler per sweep (SPEC §8).

  PYTHONPATH=. python bench/conditional_sweep.py --workdir=W --guidance=0,0.5,1,1.5,2,3 --prompt_len=24 --steps=64
  PYTHONPATH=. python bench/conditional_sweep.py --workdir=W --steps=64,4 --self_condition=1,0
  PYTHONPATH=. python bench/conditional_sweep.py --workdir=W --sampler=flowmap --steps=2 --renoise=0,0.3,0.6

Like `cfmjax eval`, but ω, η and self-conditioning on/off are traced (or looped in one process), so
a sweep compiles once per step count instead of once per value; on a busy machine that is the
difference between seconds and minutes. Prompts are the first `prompt_len` tokens of held-out rows
and only the rest is judged (exact: log p(rest | prompt) under the chain). Prints one JSON record
per setting and a table.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from cfmjax.evaluation import evaluate
from cfmjax.models import state_space
from cfmjax.run import inference, loading
from cfmjax.sampling import flow_map, samplers


def floats(text):
  return [float(v) for v in text.split(",") if v.strip()]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--sampler", default="euler", choices=inference.SAMPLERS)
  ap.add_argument("--steps", default="64")
  ap.add_argument("--prompt_len", type=int, default=0)
  ap.add_argument("--guidance", default="", help="comma list of ω (Euler; needs --prompt_len)")
  ap.add_argument("--renoise", default="0", help="comma list of η (flow map)")
  ap.add_argument("--self_condition", default="", help="comma list of 1/0: feed μ̂ back or not (Euler)")
  ap.add_argument("--num_samples", type=int, default=512)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--checkpoint_step", type=int, default=None, help="default: the latest")
  args = ap.parse_args()

  exp, params, step = loading.load(args.workdir, args.checkpoint_step)
  length, vocab, n = exp.config.data.seq_len, exp.vocab_size, args.num_samples
  held_out = exp.data.eval_rows(n)
  prompt = None
  if args.prompt_len:
    tokens, mask = inference.prefix_prompts(held_out[:, :args.prompt_len].tolist(), length)
    prompt = (jnp.asarray(tokens), jnp.asarray(mask))
  guidances = floats(args.guidance) or [None]
  self_conds = [bool(int(v)) for v in args.self_condition.split(",") if v.strip()] or [
      bool(exp.config.model.self_condition) and exp.config.sample.feed_back_estimate]

  # The run's own state space, as `cfmjax sample` uses it: embedding space where configured, and a
  # model trained without prompts is prompted by inpainting.
  space = state_space.from_config(exp.apply_fn, vocab, exp.config).bind(params)

  def sample(steps, guidance, renoise, self_condition):
    if args.sampler == "flowmap":
      return flow_map.flowmap_sample(space, jax.random.key(args.seed), (n, length, vocab), exp.schedule, steps,
                                     conditioning=samplers.Conditioning(prompt), renoise=renoise)[0]
    return samplers.euler_sample(space, jax.random.key(args.seed), (n, length, vocab), exp.schedule, steps,
                                 conditioning=samplers.Conditioning(prompt, guidance, self_condition))[0]

  records = []
  with exp.activate():
    for steps in [int(s) for s in args.steps.split(",")]:
      for self_condition in self_conds:
        for renoise in floats(args.renoise):  # a Python number (range-checked): one compile per value
          # ω is traced: one compile serves the whole guidance sweep.
          fn = jax.jit(lambda g, steps=steps, r=renoise, sc=self_condition: sample(steps, g, r, sc))
          for guidance in guidances:
            tokens = np.asarray(fn(None if guidance is None else jnp.float32(guidance)))
            record = {"workdir": args.workdir, "checkpoint_step": step, "sampler": args.sampler,
                      "steps": steps, "prompt_len": args.prompt_len, "guidance": guidance,
                      "renoise": renoise, "self_condition": self_condition}
            record.update(evaluate.score(exp.data, tokens, held_out, prompt_len=args.prompt_len))
            records.append(record)
            print(json.dumps(record), flush=True)
  cols = ["sampler", "steps", "guidance", "renoise", "self_condition", "gen_nll_per_token", "entropy",
          "data_entropy", "data_nll_per_token"]
  fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
  print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
  for r in records:
    print("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")


if __name__ == "__main__":
  main()
