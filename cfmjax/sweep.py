"""Sweeps for ablations: a grid of config overrides, one workdir per point.

    cfmjax sweep --config=experiments/base_flow/markov_tiny.py --workdir=runs/schedules \
        --sweep="flow.schedule=linear,argmax,mixed;optim.lr=1e-3,3e-3" [--sweep_launch=local|slurm|tpu] \
        [--config.train.num_steps=600 ...]
    cfmjax report runs/schedules          (one table and plot over the points)

`--sweep` is `key=v1,v2,...` items joined by `;`; the points are their product. Each point gets
`<root>/<name>/` (the name lists the swept keys' last parts and values) and its overrides are
recorded in `<root>/sweep.json` with the exact commands. `local` runs the points in sequence, each
as `cfmjax train` (which trains every objective, distillations included) then `cfmjax eval` (the
same commands a user runs by hand; a point whose eval
results exist is skipped, so a rerun finishes an interrupted sweep). `slurm` and `tpu` write the
commands as a SLURM job array (`<root>/sweep.sbatch`) or a list of `launch/tpu_pod.sh` lines
(`<root>/tpu_jobs.sh`) and run nothing.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import subprocess
import sys


LAUNCHES = ("local", "slurm", "tpu")


def parse_grid(text: str) -> list[tuple[str, list[str]]]:
  """"a.b=1,2;c=x" -> [("a.b", ["1", "2"]), ("c", ["x"])] (values still strings)."""
  grid = []
  for item in (i.strip() for i in text.split(";") if i.strip()):
    key, sep, values = item.partition("=")
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key.strip() or not vals:
      raise ValueError(f"--sweep item {item!r} is not key=v1,v2,... (items are joined by ';', e.g. "
                       f"--sweep='flow.schedule=linear,argmax;optim.lr=1e-3,3e-3')")
    grid.append((key.strip(), vals))
  if not grid:
    raise ValueError("--sweep is empty: give key=v1,v2,... items joined by ';'")
  return grid


def typed(config, key: str, raw: str):
  """`raw` converted to the type of the config's current value at `key` (a KeyError names a typo)."""
  node = config
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  if leaf not in node:
    raise KeyError(f"unknown config key {key!r} in --sweep; see cfmjax/run/configs.py base_config for the keys")
  current = node[leaf]
  if isinstance(current, bool):
    if raw.lower() not in ("true", "false"):
      raise ValueError(f"--sweep {key}={raw!r}: give true or false")
    return raw.lower() == "true"
  if isinstance(current, int):
    return int(raw)
  if isinstance(current, float):
    return float(raw)
  return raw


def points(config, grid) -> list[dict]:
  """The product of the grid as override dicts, typed from `config`."""
  keys = [k for k, _ in grid]
  return [{k: typed(config, k, v) for k, v in zip(keys, combo)} for combo in itertools.product(*(v for _, v in grid))]


def point_name(point: dict) -> str:
  return "_".join(re.sub(r"[^A-Za-z0-9.+-]", "-", f"{k.split('.')[-1]}-{v}") for k, v in point.items())


def commands(config_path: str, root: str, point: dict, extra: list[str]) -> dict:
  """The training and eval command lines of one point (what `local` runs and the launchers emit)."""
  workdir = os.path.join(root, point_name(point))
  sets = [f"--config.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in point.items()]
  train = ["cfmjax", "train", f"--config={config_path}", f"--workdir={workdir}", *extra, *sets]
  return {"name": point_name(point), "workdir": workdir, "overrides": point, "train": train,
          "eval": ["cfmjax", "eval", f"--workdir={workdir}"]}


def plan(config, config_path: str, root: str, grid_text: str, extra: list[str]) -> list[dict]:
  """Writes <root>/sweep.json (points, overrides, commands) and returns its entries."""
  entries = [commands(config_path, root, p, extra) for p in points(config, parse_grid(grid_text))]
  names = [e["name"] for e in entries]
  if len(set(names)) != len(names):
    raise ValueError(f"--sweep gives two points the same name: {names}")
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "sweep.json"), "w") as f:
    json.dump({"config": config_path, "sweep": grid_text, "extra": extra, "points": entries}, f, indent=1)
  return entries


def read_plan(root: str) -> list[dict] | None:
  path = os.path.join(root, "sweep.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)["points"]


def _as_module(argv: list[str]) -> list[str]:
  return [sys.executable, "-m", "cfmjax", *argv[1:]]  # the same interpreter as this `cfmjax`


def run_local(entries: list[dict], progress=print):
  """Each point's train then eval, in sequence; points already evaluated are skipped."""
  for i, e in enumerate(entries):
    if os.path.exists(os.path.join(e["workdir"], "eval", "results.json")):
      progress(f"sweep point {i + 1}/{len(entries)} {e['name']}: evaluated already, skipped")
      continue
    for stage in ("train", "eval"):
      progress(f"sweep point {i + 1}/{len(entries)} {e['name']}: {shlex.join(e[stage])}")
      subprocess.run(_as_module(e[stage]), check=True)


def write_slurm(root: str, entries: list[dict]) -> str:
  """A SLURM job array over the points: task i runs point i's train then eval."""
  lines = "\n".join(f"  {i}) {shlex.join(e['train'])} && {shlex.join(e['eval'])} ;;" for i, e in enumerate(entries))
  path = os.path.join(root, "sweep.sbatch")
  with open(path, "w") as f:
    f.write(f"#!/usr/bin/env bash\n#SBATCH --array=0-{len(entries) - 1}\n#SBATCH --job-name=cfmjax-sweep\n"
            f"#SBATCH --output={root}/slurm-%A_%a.log\nset -euo pipefail\n"
            f"case \"$SLURM_ARRAY_TASK_ID\" in\n{lines}\nesac\n")
  return path


def write_tpu(root: str, entries: list[dict], config_path: str) -> str:
  """One `launch/tpu_pod.sh` line per point (set TPU_NAME per line or per slice before running)."""
  # tpu_pod.sh runs `cfmjax train`, which runs distillation objectives too (cli._run_objective).
  path = os.path.join(root, "tpu_jobs.sh")
  with open(path, "w") as f:
    f.write("#!/usr/bin/env bash\n# One line per sweep point; each needs TPU_NAME, ZONE and ACCELERATOR set.\n")
    for e in entries:
      f.write(shlex.join(["launch/tpu_pod.sh", config_path, e["workdir"], *e["train"][4:]]) + "\n")
  return path
