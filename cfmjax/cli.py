"""The `cfmjax` command line.

  cfmjax train  --config=experiments/base_flow/markov_tiny.py --workdir=W [--config.train.num_steps=...]
  cfmjax distill --config=experiments/flow_map/markov_tiny_psd.py --workdir=W2 --config.init_from=W
  cfmjax sample --workdir=W --sampler=euler --steps=128 --num_samples=16
  cfmjax eval   --workdir=W --sampler=euler --steps=128,16,4 --num_samples=256
  cfmjax eval   --workdir=W2 --sampler=flowmap --steps=1,2,4
  cfmjax export --workdir=W --out=D [--dtype=bfloat16]     (then: cfmjax eval --checkpoint=D ...)
  cfmjax report W1 W2 ... [--out=report] [--names=ar,base,psd]
  cfmjax compile --config=experiments/base_flow/owt_1p7b.py --mesh=4,8,2 [--stage=distill]
  cfmjax eval   --workdir=W --judge=ar:W_AR   (W_AR: `cfmjax train --config=experiments/ar/...`)
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

COMMANDS = ("train", "distill", "sample", "eval", "export", "report", "compile")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (ml_collections).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples and eval.")
_SAMPLER = flags.DEFINE_string("sampler", "euler", "Sampler: euler (base flow) | flowmap (k-step flow map) | "
                               "ar (autoregressive workdir; the default there).")
_STEPS = flags.DEFINE_string("steps", None, "Network evaluations: one number, or a comma list for eval.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", None, "Number of sequences to generate.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Sequences generated per compiled call.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step to load (default: latest).")
_LIKELIHOOD = flags.DEFINE_bool("likelihood", False, "eval: also bound the NLL of held-out rows (SPEC §5).")
_LIKELIHOOD_POINTS = flags.DEFINE_integer("likelihood_points", 128, "eval: quadrature points in log-SNR.")
_LIKELIHOOD_ROWS = flags.DEFINE_integer("likelihood_rows", 256, "eval: held-out rows for the bound.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "sample/eval: an exported directory (`cfmjax export`) or a workdir to load instead of "
    "--workdir; outputs go under --workdir when given, else under this directory.")
_OUT = flags.DEFINE_string("out", None, "export: the directory to write; report: output directory (default report).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "export: dtype of the saved weights.")
_NAMES = flags.DEFINE_string("names", None, "report: comma-separated model names (default: directory names).")
_MESH = flags.DEFINE_string("mesh", None, "compile: mesh sizes data,fsdp,tensor, e.g. 4,8,2.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "compile: fake CPU devices (default: the mesh's size).")
_STAGE = flags.DEFINE_enum("stage", None, ["base", "distill"], "compile: the step to compile (default: the config's).")
_JUDGE = flags.DEFINE_string("judge", "", "eval: exact | ar:<AR workdir> | gpt2:<HF directory> | none "
                             "(default: exact for the Markov source, none for text).")


def _steps_list(default) -> list[int]:
  raw = _STEPS.value if _STEPS.value is not None else str(default)
  try:
    steps = [int(s) for s in raw.split(",") if s.strip()]
  except ValueError:
    raise app.UsageError(f"--steps must be integers separated by commas, got {raw!r}") from None
  if not steps or min(steps) < 1:
    raise app.UsageError(f"--steps must be positive, got {raw!r}")
  return steps


def _require_workdir() -> str:
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  return _WORKDIR.value


def _progress_bar(label: str):
  start = time.time()
  tty = sys.stdout.isatty()

  def show(done, total):
    if not tty and done < total:
      return  # in a log file, one line per finished sampler run is enough
    sys.stdout.write(f"{chr(13) if tty else ''}{label}: {done}/{total} sequences, {time.time() - start:.1f}s")
    if done >= total:
      sys.stdout.write("\n")
    sys.stdout.flush()

  return show


def _run_stage(stage: str):
  from cfmjax import train  # noqa: PLC0415 (keeps `cfmjax --help` fast)

  command = "train" if stage == "base" else "distill"
  if _CONFIG.value is None:
    raise app.UsageError(f"{command} needs --config=experiments/....py")
  if _CONFIG.value.stage != stage:
    other = "train" if _CONFIG.value.stage == "base" else "distill"
    raise app.UsageError(f"this config is for stage {_CONFIG.value.stage!r}: run `cfmjax {other}`")
  workdir = _require_workdir()
  last = train.train(_CONFIG.value, workdir)
  print(f"{command} done: {json.dumps(last)}\nworkdir: {os.path.abspath(workdir)} "
        f"(metrics.jsonl, checkpoints/, tensorboard/)")


def cmd_train():
  _run_stage("base")


def cmd_distill():
  _run_stage("distill")


def _load_for_inference():
  from cfmjax import export  # noqa: PLC0415

  # --checkpoint: an export (or a workdir); results go to --workdir if given, else next to it.
  source = _CHECKPOINT.value or _require_workdir()
  try:
    export.checkpoint_kind(source)
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from None
  exp, params, step = export.load_any(source, _STEP.value)
  return _WORKDIR.value or source, exp, params, step


def _sampler_for(exp) -> str:
  """--sampler, except that an autoregressive workdir samples with `ar` unless told otherwise."""
  if exp.model_config.causal and not flags.FLAGS["sampler"].present:
    return "ar"
  return _SAMPLER.value


def _steps_for(exp, sampler: str, default) -> list[int]:
  # The AR sampler has no step count: it takes one network evaluation per position, recorded as steps.
  return [exp.config.data.seq_len] if sampler == "ar" else _steps_list(default)


def cmd_sample():
  from cfmjax import inference  # noqa: PLC0415

  workdir, exp, params, step = _load_for_inference()
  cfg = exp.config.sample
  num = _NUM_SAMPLES.value or cfg.num_samples
  sampler = _sampler_for(exp)
  (steps,) = _steps_for(exp, sampler, cfg.steps)[:1]
  tokens = inference.generate(exp, params, sampler, steps, num, _BATCH_SIZE.value or cfg.batch_size,
                              _SEED.value, progress=_progress_bar(f"{sampler} {steps} steps"))
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{sampler}_{steps}steps_ckpt{step}.jsonl")
  with open(path, "w") as f:
    for i, row in enumerate(tokens):
      f.write(json.dumps({"index": i, "sampler": sampler, "steps": steps, "checkpoint_step": step,
                          "text": exp.data.tokenizer.decode(row.tolist()), "tokens": row.tolist()}) + "\n")
  for row in tokens[:3]:
    print("---\n" + exp.data.tokenizer.decode(row.tolist()))
  print(f"wrote {len(tokens)} samples to {path}")


def cmd_eval():
  from cfmjax import ar, evaluate, inference, judges  # noqa: PLC0415

  workdir, exp, params, step = _load_for_inference()
  cfg = exp.config.eval
  num = _NUM_SAMPLES.value or cfg.num_samples
  held_out = exp.data.eval_rows(num)
  judge = judges.make_judge(_JUDGE.value, exp.data)
  sampler = _sampler_for(exp)
  records = []
  for steps in _steps_for(exp, sampler, cfg.steps):
    tokens = inference.generate(exp, params, sampler, steps, num, _BATCH_SIZE.value or cfg.batch_size,
                                _SEED.value, progress=_progress_bar(f"{sampler} {steps} steps"))
    record = {"sampler": sampler, "steps": steps, "checkpoint_step": step}
    record.update(evaluate.score(exp.data, tokens, held_out, judge))
    records.append(record)
    print(json.dumps(record))
  if exp.model_config.causal:  # the AR model's exact held-out NLL (it needs no bound: --likelihood is moot)
    rows = exp.data.eval_rows(_LIKELIHOOD_ROWS.value)
    record = ar.heldout_nll(exp, params, rows, _BATCH_SIZE.value or cfg.batch_size)
    record["checkpoint_step"] = step
    records.append(record)
    print(json.dumps(record))
  elif _LIKELIHOOD.value:
    rows = exp.data.eval_rows(_LIKELIHOOD_ROWS.value)
    record = evaluate.likelihood_bound(exp, params, rows, _LIKELIHOOD_POINTS.value,
                                       _BATCH_SIZE.value or cfg.batch_size, _SEED.value,
                                       progress=_progress_bar("likelihood bound"))
    record["checkpoint_step"] = step
    records.append(record)
    print(json.dumps(record))
  path = os.path.join(workdir, "eval", "results.json")
  all_records = evaluate.write_results(path, records)
  from cfmjax import report  # noqa: PLC0415

  table_path, plot_path = report.write_eval_report(os.path.dirname(path), all_records,
                                                   os.path.basename(os.path.abspath(workdir)))
  print(report.eval_table(all_records))
  print(f"results: {path}, {table_path}, {plot_path}")


def cmd_export():
  from cfmjax import export  # noqa: PLC0415

  if not _OUT.value:
    raise app.UsageError("export needs --out=DIR (the directory to write)")
  info = export.export(_require_workdir(), _OUT.value, _DTYPE.value, _STEP.value)
  print(f"exported: {json.dumps(info)}\nto: {os.path.abspath(_OUT.value)} (params.safetensors, config.json, "
        f"export_info.json{', tokenizer.model' if os.path.exists(os.path.join(_OUT.value, 'tokenizer.model')) else ''})")


def cmd_report(paths):
  from cfmjax import report  # noqa: PLC0415

  if not paths:
    raise app.UsageError("usage: cfmjax report W1 [W2 ...] [--out=DIR] [--names=a,b,...]")
  names = _NAMES.value.split(",") if _NAMES.value else [os.path.basename(os.path.abspath(p)) for p in paths]
  if len(names) != len(paths):
    raise app.UsageError(f"--names has {len(names)} names for {len(paths)} directories")
  runs = [(name, report.load_records(p)) for name, p in zip(names, paths)]
  table_path, plot_path = report.write_comparison(runs, _OUT.value or "report")
  print(report.comparison_table(runs))
  print(f"report: {table_path}, {plot_path}")


def cmd_compile():
  from cfmjax import aot  # noqa: PLC0415

  if _CONFIG.value is None or not _MESH.value:
    raise app.UsageError("compile needs --config=FILE --mesh=data,fsdp,tensor")
  try:
    mesh = aot.parse_mesh(_MESH.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  aot.use_fake_cpu_devices(_NUM_DEVICES.value or mesh[0] * mesh[1] * mesh[2])
  report = aot.compile_report(_CONFIG.value, mesh, _STAGE.value)
  print(aot.format_report(report))
  print("compile report: " + json.dumps(report))
  if _WORKDIR.value:
    os.makedirs(_WORKDIR.value, exist_ok=True)
    with open(os.path.join(_WORKDIR.value, "compile_report.json"), "w") as f:
      json.dump(report, f, indent=2)


def main(argv):
  if len(argv) < 2 or argv[1] not in COMMANDS or (len(argv) > 2 and argv[1] != "report"):
    raise app.UsageError(f"usage: cfmjax {{{'|'.join(COMMANDS)}}} --workdir=DIR [--config=FILE] [flags]")
  # Our own progress and summaries at INFO; libraries (Orbax, XLA) only when they warn.
  logging.getLogger("absl").setLevel(logging.WARNING)
  log = logging.getLogger("cfmjax")
  if not log.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
  if argv[1] == "compile":  # one process on fake CPU devices: no cluster to join
    cmd_compile()
    return
  from cfmjax import distributed  # noqa: PLC0415

  distributed.maybe_initialize()  # before anything asks JAX for devices
  if argv[1] == "report":  # the only command with positional arguments (the workdirs)
    return cmd_report(argv[2:])
  {"train": cmd_train, "distill": cmd_distill, "sample": cmd_sample, "eval": cmd_eval,
   "export": cmd_export}[argv[1]]()


def run():
  """Console-script entry point."""
  app.run(main)
