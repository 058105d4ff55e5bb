"""`cfmjax pipeline`: the README's main job, the whole pipeline on the embedded corpus in a few minutes.

    cfmjax pipeline --workdir=runs/main [--base_steps=340 --judge_steps=340 --distill_steps=130]

Stages, each the command a user would type (printed before it runs), handing off through the
workdirs' Orbax checkpoints, so any stage can be rerun alone:
  1. base flow      cfmjax train   --config=experiments/base_flow/text_tiny.py     --workdir=W/base
  2. AR judge       cfmjax train   --config=experiments/ar/text_tiny.py            --workdir=W/ar_judge
  3. flow map (PSD) cfmjax distill --config=experiments/flow_map/text_tiny_psd.py  --workdir=W/psd
  4-6. evaluation   cfmjax eval on each: the judge's own held-out perplexity; the base flow's Euler
                    samples at 4 and 128 steps and its likelihood bound; the flow map at 1, 2, 4 steps;
                    samples judged by the AR judge, whose held-out perplexity the report names
  7. samples        cfmjax sample (two from each sampler)
  8. report         cfmjax report W/ar_judge W/base W/psd --out=W/report
and ends with a summary on the terminal. The step budgets are far below the tiny configs' own runs
(those are the longer, better runs: the configs' docstrings give their commands): this job shows the
pipeline and honest numbers in under ten minutes on 2 CPU cores, not a good language model. (Budgets
cut from 400 / 400 / 150 steps and 64 bound rows on 2026-12-04: the job took 10.4 and 11.5 minutes,
install included, on a day this machine ran 15-40% slower; the 10 minutes are the target.)
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {name: os.path.join(ROOT, "experiments", *rel) for name, rel in
           (("base", ("base_flow", "text_tiny.py")), ("ar_judge", ("ar", "text_tiny.py")),
            ("psd", ("flow_map", "text_tiny_psd.py")))}


def stages(workdir: str, base_steps: int, judge_steps: int, distill_steps: int, num_samples: int,
           extra: list[str]) -> list[tuple[str, list[str]]]:
  """(title, argv) of every stage; `extra` (e.g. --config.model.d_model=32) goes to both trainings."""
  w = {name: os.path.join(workdir, name) for name in CONFIGS}
  judge = f"--judge=ar:{w['ar_judge']}"
  n = f"--num_samples={num_samples}"
  return [
      ("base flow", ["train", f"--config={CONFIGS['base']}", f"--workdir={w['base']}",
                     f"--config.train.num_steps={base_steps}", *extra]),
      ("AR judge", ["train", f"--config={CONFIGS['ar_judge']}", f"--workdir={w['ar_judge']}",
                    f"--config.train.num_steps={judge_steps}", *extra]),
      ("flow map (PSD)", ["distill", f"--config={CONFIGS['psd']}", f"--workdir={w['psd']}",
                          f"--config.init_from={w['base']}", f"--config.train.num_steps={distill_steps}"]),
      ("judge's held-out perplexity", ["eval", f"--workdir={w['ar_judge']}", "--steps=0", "--num_samples=64"]),
      ("base flow: Euler 4 / 128 steps, likelihood bound",
       ["eval", f"--workdir={w['base']}", "--sampler=euler", "--steps=4,128", n, judge, "--likelihood",
        "--likelihood_rows=32", "--likelihood_selection_rows=32", "--likelihood_points=64"]),
      ("flow map: 1 / 2 / 4 steps", ["eval", f"--workdir={w['psd']}", "--sampler=flowmap", "--steps=1,2,4", n, judge]),
      ("samples: flow map, 4 steps", ["sample", f"--workdir={w['psd']}", "--sampler=flowmap", "--steps=4",
                                      "--num_samples=2"]),
      ("samples: Euler, 128 steps", ["sample", f"--workdir={w['base']}", "--sampler=euler", "--steps=128",
                                     "--num_samples=2"]),
      ("report", ["report", w["ar_judge"], w["base"], w["psd"], "--names=ar_judge,base,psd",
                  f"--out={os.path.join(workdir, 'report')}"]),
  ]


def run(workdir: str, base_steps: int = 340, judge_steps: int = 340, distill_steps: int = 130,
        num_samples: int = 64, extra: list[str] | None = None) -> str:
  """Runs every stage in order (stopping at the first failure) and returns the summary it prints."""
  plan = stages(workdir, base_steps, judge_steps, distill_steps, num_samples, list(extra or []))
  start = time.time()
  for i, (title, argv) in enumerate(plan):
    print(f"\n=== stage {i + 1}/{len(plan)}: {title} ({time.time() - start:.0f}s so far)\n"
          f"$ cfmjax {shlex.join(argv)}", flush=True)
    subprocess.run([sys.executable, "-m", "cfmjax", *argv], check=True, cwd=ROOT)
  text = summary(workdir, time.time() - start)
  print("\n" + text)
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(text + "\n")
  return text


def _records(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    return json.load(f)


def _samples(workdir: str) -> list[str]:
  with open(os.path.join(workdir, "samples", "latest")) as f:
    return [json.loads(line)["text"] for line in f][:2]


def summary(workdir: str, seconds: float) -> str:
  """Where the results are, the samplers' table next to its references, the bound, two samples each."""
  w = {name: os.path.join(workdir, name) for name in CONFIGS}
  held_out = next(r for r in _records(w["ar_judge"]) if r.get("metric") == "nll_per_token")
  base, psd = _records(w["base"]), _records(w["psd"])
  gen = [r for r in psd + base if "sampler" in r and "metric" not in r]
  bound = next((r for r in base if r.get("metric") == "nll_bound_per_token"), None)
  data_entropy = next((r["data_entropy"] for r in gen if r.get("data_entropy") is not None), None)
  lines = [f"# cfmjax main job: {seconds / 60:.1f} minutes", "",
           f"Results: {workdir}/report/report.md and report.png; each stage's workdir holds its eval/ and samples/.",
           f"Judge: the AR model in {w['ar_judge']} (held-out perplexity {held_out['ppl']:.1f}, "
           f"{held_out['value']:.3f} nats/token, exact).", "",
           f"| sampler | network evaluations | gen PPL (AR judge) | entropy (data: {data_entropy or float('nan'):.3f}) "
           "| seconds per sample (wall, compile included) |", "|---|---|---|---|---|"]
  for r in sorted(gen, key=lambda r: (r["sampler"] != "flowmap", r["steps"])):
    name = "flow map" if r["sampler"] == "flowmap" else "Euler (base flow)"
    lines.append(f"| {name} | {r['steps']} | {r['gen_ppl']:.1f} | {r['entropy']:.3f} | "
                 f"{r.get('seconds_per_sample', float('nan')):.4f} |")
  if bound is not None:
    lines += ["", f"Likelihood bound of the base flow (SPEC §5): {bound['value']:.3f} ± {bound['stderr']:.3f} "
                  f"nats/token, perplexity ≤ {bound['ppl_bound']:.1f} (the AR judge's exact held-out perplexity: "
                  f"{held_out['ppl']:.1f})."]
  for title, directory in (("flow map, 4 steps", w["psd"]), ("Euler, 128 steps", w["base"])):
    lines += ["", f"Samples, {title}:"] + [f"  - {text}" for text in _samples(directory)]
  lines += ["", "These budgets are minutes; the tiny configs' own runs are longer and better (see their docstrings)."]
  return "\n".join(lines)
