"""Memory matrix (issue 16): per-device memory of every stage of the big configs on pod-sized meshes,
from ahead-of-time compiles on fake CPU devices (`cfmjax compile`; nothing runs, no data needed).

  .venv/bin/python bench/memory.py                       # the README's matrix (about 15 minutes on 2 cores)
  .venv/bin/python bench/memory.py --configs=owt_1p7b --stages=psd --meshes=4,8,2

Cells: configs x stages x meshes. A stage is `base`, `psd`, `lsd`, `esd` (the base config distilled
with that loss, through `cfmjax compile --stage=distill`, with the settings of
experiments/flow_map/owt_1p7b_psd.py) or `ar` (the config made causal). Extra overrides (remat,
gradient accumulation, ...) are `--set=key=value,key=value`, recorded with each cell. Each cell is
one `cfmjax compile` process (the fake device count is fixed when JAX starts) and appends a row to
--out (a crash keeps the cells already measured); the table is printed at the end. The count of
XLA's "Involuntary full rematerialization" warnings of each compile is recorded too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"owt_170m": "experiments/base_flow/owt_170m.py", "owt_1p7b": "experiments/base_flow/owt_1p7b.py",
           "markov_tiny": "experiments/base_flow/markov_tiny.py"}
# The distillation settings of experiments/flow_map/owt_1p7b_psd.py (as_distillation's arguments).
DISTILL = {"objective": "psd", "distill.mode": "two_stage", "distill.gradient_surgery": True,
           "distill.boundary_prob": 0.05, "distill.gap_warmup_steps": 10000, "optim.lr": 1e-4}
REMAT = "Involuntary full rematerialization"


def overrides_for(stage: str) -> dict:
  if stage == "base":
    return {}
  if stage == "ar":
    return {"objective": "ar"}
  if stage in ("psd", "lsd", "esd"):
    return dict(DISTILL, **{"objective": stage})
  raise ValueError(f"unknown stage {stage!r}: base | psd | lsd | esd | ar")


def measure(config: str, stage: str, mesh: str, extra: dict, workdir: str) -> dict:
  """One `cfmjax compile` of a cell in a fresh process; its report with the cell's settings."""
  settings = dict(overrides_for(stage), **extra)
  flags = [f"--config.{k}={v}" for k, v in settings.items() if k != "stage"]
  command = [sys.executable, "-m", "cfmjax", "compile", f"--config={CONFIGS[config]}", f"--mesh={mesh}",
             f"--workdir={workdir}", *(["--stage=distill"] if stage in ("psd", "lsd", "esd") else []), *flags]
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  start = time.time()
  proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
  row = {"config": config, "stage": stage, "mesh": mesh, "settings": extra, "seconds": time.time() - start,
         "command": "cfmjax " + " ".join(command[3:]).replace(f"--workdir={workdir} ", "")}
  if proc.returncode != 0:
    return dict(row, error=proc.stderr.strip().splitlines()[-1][:400] if proc.stderr.strip() else "failed")
  with open(os.path.join(workdir, "compile_report.json")) as f:
    report = json.load(f)
  return dict(row, per_device_gib=report["per_device_gib"], flops_per_step_per_device=report["flops_per_step_per_device"],
              num_params=report["num_params"], remat_warnings=proc.stderr.count(REMAT))


def table(rows: list[dict]) -> str:
  lines = ["| config | stage | mesh | settings | params | opt state | temporaries | peak | TFLOP/device/step | remat warnings |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "-"
    if "error" in r:
      lines.append(f"| {r['config']} | {r['stage']} | {r['mesh']} | {settings} | failed: {r['error']} |||||| ")
      continue
    m = r["per_device_gib"]
    lines.append(f"| {r['config']} | {r['stage']} | {r['mesh']} | {settings} | {m['params']:.2f} | {m['opt_state']:.2f} | "
                 f"{m['temporaries']:.1f} | {m['peak_estimate']:.1f} | {r['flops_per_step_per_device'] / 1e12:.1f} | "
                 f"{r['remat_warnings']} |")
  return "\n".join(lines)


def parse_settings(text: str) -> dict:
  out = {}
  for item in filter(None, text.split(",")):
    key, _, value = item.partition("=")
    out[key] = value
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--configs", default="owt_170m,owt_1p7b")
  ap.add_argument("--stages", default="base,psd,lsd,esd,ar")
  ap.add_argument("--meshes", default="4,8,2;2,64,2", help="';'-separated data,fsdp,tensor meshes")
  ap.add_argument("--set", default="", help="extra config overrides for every cell: key=value,key=value")
  ap.add_argument("--out", default="bench/results/memory.json", help="JSON lines, one per cell (appended)")
  ap.add_argument("--workdir", default="/tmp/cfmjax_memory")
  args = ap.parse_args()
  extra = parse_settings(args.set)
  cells = [(c, s, m) for c in args.configs.split(",") for m in args.meshes.split(";") for s in args.stages.split(",")]
  rows = []
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  for i, (config, stage, mesh) in enumerate(cells):
    row = measure(config, stage, mesh, extra, os.path.join(args.workdir, f"{config}-{stage}-{mesh.replace(',', 'x')}"))
    rows.append(row)
    with open(args.out, "a") as f:
      f.write(json.dumps(row) + "\n")
    peak = row.get("per_device_gib", {}).get("peak_estimate")
    print(f"[{i + 1}/{len(cells)}] {config} {stage} {mesh}: "
          + (f"peak {peak:.1f} GiB/device, {row['remat_warnings']} remat warnings" if peak is not None
             else f"failed: {row['error']}") + f" ({row['seconds']:.0f} s)", flush=True)
  print(table(rows))


if __name__ == "__main__":
  main()
