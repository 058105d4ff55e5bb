"""The `cfmjax` command line.

  cfmjax pipeline --workdir=runs/main   (the README's main job: base flow, AR judge, flow map, eval, report)
  cfmjax prepare --config=experiments/base_flow/text_tiny.py --out=DIR [--workers=2]   (a token store)
  cfmjax train  --config=experiments/base_flow/markov_tiny.py --workdir=W [--config.train.num_steps=...]
  cfmjax distill --config=experiments/flow_map/markov_tiny_psd.py --workdir=W2 --config.init_from=W
  cfmjax sample --workdir=W --sampler=euler --steps=128 --num_samples=16
  cfmjax eval   --workdir=W --sampler=euler --steps=128,16,4 --num_samples=256
  cfmjax eval   --workdir=W2 --sampler=flowmap --steps=1,2,4
  cfmjax export --workdir=W --out=D [--dtype=bfloat16]     (then: cfmjax eval --checkpoint=D ...)
  cfmjax report W1 W2 ... [--out=report] [--names=ar,base,psd]
  cfmjax sweep --config=... --workdir=ROOT --sweep="flow.schedule=linear,argmax;optim.lr=1e-3,3e-3"
               [--sweep_launch=local|slurm|tpu]          (then: cfmjax report ROOT)
  cfmjax compile --config=experiments/base_flow/owt_1p7b.py --mesh=4,8,2 [--stage=distill]
  cfmjax eval   --workdir=W --judge=ar:W_AR   (W_AR: `cfmjax train --config=experiments/ar/...`)
  cfmjax sample --workdir=W --prompt="..." [--block_size=8 --num_blocks=4] [--guidance=1.5]
  cfmjax eval   --workdir=W --prompt_len=24 --guidance=2    (held-out prefixes; NLL of the rest)
  cfmjax eval   --workdir=W --denoiser_gap --steps=0          (held-out CE per noise bin; no sampling)
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from cfmjax import main_job, objectives, sweep
from cfmjax.data import pipeline, store
from cfmjax.evaluation import diagnostics, evaluate, judges, likelihood, report
from cfmjax.objectives import ar
from cfmjax.parallel import distributed
from cfmjax.run import export, inference, loading
from cfmjax.training import aot, train

COMMANDS = ("pipeline", "prepare", "train", "distill", "sample", "eval", "export", "report", "compile", "sweep")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (ml_collections).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples and eval.")
_SAMPLER = flags.DEFINE_string("sampler", "euler", "Sampler: euler (base flow) | flowmap (k-step flow map) | "
                               "ar (autoregressive workdir; the default there).")
_STEPS = flags.DEFINE_string("steps", None, "Network evaluations: one number, or a comma list for eval; "
                             "eval --steps=0 samples nothing (e.g. with --denoiser_gap or --likelihood alone).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", None, "Number of sequences to generate.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Sequences generated per compiled call.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_string("checkpoint_step", None, "Checkpoint step to load: a step number, or 'best' for the "
                            "state kept by train.best_metric (default: latest).")
_PROMPT = flags.DEFINE_string("prompt", None, "sample: text to continue (tokenised with the run's tokenizer).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "sample: a file with one prompt per line.")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", None, "sample: tokens per generated block (default: "
                                   "the rest of the window after the prompt).")
_NUM_BLOCKS = flags.DEFINE_integer("num_blocks", 1, "sample: blocks generated one after another.")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Classifier-free guidance ω for the Euler sampler "
                               "(0 unconditional, 1 conditional; < 0: off); default: sample.guidance (unset: off).")
_RENOISE = flags.DEFINE_float("renoise", None, "Flow-map sampler: CTM-style renoising η in [0, 1] "
                              "(0 deterministic); default: sample.renoise.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 0, "eval: condition on the first N tokens of held-out "
                                   "rows and judge only the rest (exact judge: log p(rest | prefix)).")
_LIKELIHOOD = flags.DEFINE_bool("likelihood", False, "eval: also bound the NLL of held-out rows (SPEC §5).")
_LIKELIHOOD_POINTS = flags.DEFINE_integer("likelihood_points", 128, "eval --likelihood: importance-sampled "
                                          "log-SNR points per report row (one noise draw each).")
_LIKELIHOOD_ROWS = flags.DEFINE_integer("likelihood_rows", 256, "eval --likelihood: held-out rows the bound is "
                                        "reported on (eval_rows index range [0, N)).")
_LIKELIHOOD_SELECTION_ROWS = flags.DEFINE_integer(
    "likelihood_selection_rows", 64, "eval --likelihood: further held-out rows [N, N + this) on which the "
    "endpoint λ1 and the λ proposal are chosen (never reported; SPEC §9).")
_LIKELIHOOD_ENDPOINTS = flags.DEFINE_string(
    "likelihood_endpoints", "-4,-3,-2,-1,0,1,2,3,4,5,6,7,8,9,10,11,12", "eval --likelihood: candidate clean-end "
    "log-SNR endpoints λ1 (multiples of 0.25 above -12); the one with the lowest bound on the selection rows is "
    "used (likelihood.py).")
_LIKELIHOOD_SPACE = flags.DEFINE_enum(
    "likelihood_space", "auto", ["auto", "vocab"], "eval --likelihood: which bound. auto: the ELBO of the "
    "embedding diffusion (whitened Brier) when the state lives in embedding space with V > D, else the V-space "
    "bound; vocab: always the V-space bound (SPEC §5; likelihood.py).")
_SAMPLE_PRECISION = flags.DEFINE_enum("sample_precision", None, ["float32", "float64"],
                                      "sample/eval: dtype of the Euler / flow-map sampler state and its affine "
                                      "updates (the network keeps its own dtype); default: sample.precision.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "sample/eval: an exported directory (`cfmjax export`) or a workdir to load instead of "
    "--workdir; outputs go under --workdir when given, else under this directory.")
_OUT = flags.DEFINE_string("out", None, "export / prepare: the directory to write; report: output directory "
                           "(default report).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "export: dtype of the saved weights.")
_NAMES = flags.DEFINE_string("names", None, "report: comma-separated model names (default: directory names).")
_MESH = flags.DEFINE_string("mesh", None, "compile: mesh sizes data,fsdp,tensor, e.g. 4,8,2.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "compile: fake CPU devices (default: the mesh's size).")
_SHARDINGS_OUT = flags.DEFINE_string("shardings_out", None, "compile: write every parameter's and optimizer "
                                     "leaf's partition spec to this JSON file instead of compiling.")
_STAGE = flags.DEFINE_enum("stage", None, ["base", "distill"], "compile: the step to compile (default: the config's).")
_EXACT_REFERENCE = flags.DEFINE_bool(
    "exact_reference", True, "eval, Markov source, --sampler=euler: also run the same Euler sampler (schedule, "
    "grid, step counts, number of samples, seed) with the exact posterior (SPEC §9) in place of the network, "
    "judged exactly, recorded as sampler euler_exact: what a perfect denoiser reaches. Costs O(V**(order+1)) "
    "per position and step; --exact_reference=false skips it. Not run with --prompt_len or --guidance.")
_DENOISER_GAP = flags.DEFINE_bool(
    "denoiser_gap", False, "eval: write eval/denoiser_gap.json and .png: held-out cross-entropy of the "
    "denoiser (EMA params) per bin of λ = log SNR in [-9, 9], and for a Markov source that of the exact and "
    "the context-free posteriors (cfmjax/evaluation/diagnostics.py). Add --steps=0 to skip sampling.")
_DENOISER_GAP_BINS = flags.DEFINE_integer("denoiser_gap_bins", 12, "eval --denoiser_gap: number of λ bins.")
_DENOISER_GAP_ROWS = flags.DEFINE_integer("denoiser_gap_rows", 256, "eval --denoiser_gap: held-out rows "
                                          "(each used in every bin).")
_DENOISER_GAP_RANGE = flags.DEFINE_string("denoiser_gap_range", "-9,9", "eval --denoiser_gap: the λ range "
                                           "lo,hi split into the bins (keep it fixed to compare runs).")
_WORKERS = flags.DEFINE_integer("workers", 1, "prepare: tokenizing worker processes.")
_HOST_INDEX = flags.DEFINE_integer("host_index", 0, "prepare: this host's index when several hosts share the work.")
_HOST_COUNT = flags.DEFINE_integer("host_count", 1, "prepare: how many hosts share the work (each takes every "
                                   "host_count-th shard; the last to finish writes the manifest).")
_DOCS_PER_SHARD = flags.DEFINE_integer("docs_per_shard", 4096, "prepare: documents per shard (one unit of work).")
_PROFILE_STEPS = flags.DEFINE_string("profile_steps", None, "train / distill: write a jax.profiler trace of steps "
                                     "N,M (inclusive) to <workdir>/profile (sets train.profile_steps).")
_SWEEP = flags.DEFINE_string("sweep", None, "sweep: the grid, key=v1,v2,... items joined by ';'.")
_SWEEP_LAUNCH = flags.DEFINE_enum("sweep_launch", "local", ["local", "slurm", "tpu"],
                                  "sweep: run the points here in sequence, or write a SLURM job array / a "
                                  "TPU job list under the sweep's root.")
_FORMAT = flags.DEFINE_enum("format", "text", ["text", "jsonl"], "sample: print every sample as readable text "
                            "(a prompt highlighted) or as the JSON lines written to samples/.")
_BASE_STEPS = flags.DEFINE_integer("base_steps", 340, "pipeline: base-flow training steps.")
_JUDGE_STEPS = flags.DEFINE_integer("judge_steps", 340, "pipeline: AR judge training steps.")
_DISTILL_STEPS = flags.DEFINE_integer("distill_steps", 130, "pipeline: flow-map distillation steps.")
_STAGE_ARGS = flags.DEFINE_string("stage_args", "", "pipeline: extra flags for both trainings (e.g. a smaller "
                                  "model: '--config.model.d_model=64').")
_JUDGE = flags.DEFINE_string("judge", "", "eval: exact | ar:<AR workdir> | gpt2:<HF directory> | none "
                             "(default: exact for the Markov source, none for text).")


def _steps_list(default, allow_none: bool = False) -> list[int]:
  raw = _STEPS.value if _STEPS.value is not None else str(default)
  try:
    steps = [int(s) for s in raw.split(",") if s.strip()]
  except ValueError:
    raise app.UsageError(f"--steps must be integers separated by commas, got {raw!r}") from None
  if allow_none and steps == [0]:  # eval --steps=0: no sampling
    return []
  if not steps or min(steps) < 1:
    raise app.UsageError(f"--steps must be positive, got {raw!r}")
  return steps


def _checkpoint_step() -> int | str | None:
  raw = _STEP.value
  if raw is None or raw == "best":
    return raw
  try:
    return int(raw)
  except ValueError:
    raise app.UsageError(f"--checkpoint_step={raw!r}: give a step number or 'best'") from None


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


def _run_objective(command: str):
  # `cfmjax train` runs any objective, so that the launchers (launch/*) need one command; `cfmjax
  # distill` is the same run for a distillation objective and refuses a base one (a typo'd config).
  if _CONFIG.value is None:
    raise app.UsageError(f"{command} needs --config=experiments/....py")
  if command == "distill" and objectives.stage(_CONFIG.value) != "distill":
    raise app.UsageError(f"this config's objective ({_CONFIG.value.objective!r}) is not a distillation: it is "
                         f"trained by `cfmjax train`")
  workdir = _require_workdir()
  if _PROFILE_STEPS.value:
    _CONFIG.value.train.profile_steps = _PROFILE_STEPS.value
  last = train.train(_CONFIG.value, workdir)
  print(f"{command} done: {json.dumps(last)}\nworkdir: {os.path.abspath(workdir)} "
        f"(metrics.jsonl, checkpoints/, tensorboard/)")


def cmd_prepare():
  out = _OUT.value or (_CONFIG.value.data.prepared.path if _CONFIG.value is not None else "")
  if _CONFIG.value is None or not out:
    raise app.UsageError("prepare needs --config=experiments/....py (its data section) and --out=DIR "
                         "(or data.prepared.path)")
  work = store.Work(docs_per_shard=_DOCS_PER_SHARD.value, num_workers=_WORKERS.value,
                    host_index=_HOST_INDEX.value, host_count=_HOST_COUNT.value)
  manifest = pipeline.prepare_store(_CONFIG.value.data, out, work)
  if manifest is not None:
    print(f"train on it with: --config.data.source=prepared --config.data.prepared.path={os.path.abspath(out)}"
          f" --config.data.seq_len={manifest['seq_len']}")


def cmd_train():
  _run_objective("train")


def cmd_distill():
  _run_objective("distill")


def _load_for_inference():
  # --checkpoint: an export (or a workdir); results go to --workdir if given, else next to it.
  source = _CHECKPOINT.value or _require_workdir()
  try:
    loading.kind(source)
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from None
  exp, params, step = loading.load(source, _checkpoint_step())
  return _WORKDIR.value or source, exp, params, step


def _sampler_for(exp) -> str:
  """--sampler, except that an autoregressive workdir samples with `ar` unless told otherwise."""
  if objectives.get(exp.config).sampler == "ar" and not flags.FLAGS["sampler"].present:
    return "ar"
  return _SAMPLER.value


def _steps_for(exp, sampler: str, default, allow_none: bool = False) -> list[int]:
  # The AR sampler has no step count: it takes one network evaluation per position, recorded as steps.
  if sampler == "ar":
    return [] if allow_none and (_STEPS.value or "").strip() == "0" else [exp.config.data.seq_len]
  return _steps_list(default, allow_none)


def _guidance_and_renoise(cfg):
  guidance = _GUIDANCE.value if _GUIDANCE.value is not None else cfg.guidance
  renoise = _RENOISE.value if _RENOISE.value is not None else cfg.renoise
  return (None if guidance is None or guidance < 0 else guidance), renoise


def _read_prompts(tokenizer) -> list[list[int]] | None:
  if _PROMPT.value is not None and _PROMPTS_FILE.value:
    raise app.UsageError("give --prompt or --prompts_file, not both")
  if _PROMPT.value is not None:
    texts = [_PROMPT.value]
  elif _PROMPTS_FILE.value:
    with open(_PROMPTS_FILE.value) as f:
      texts = [line.rstrip("\n") for line in f if line.strip()]
    if not texts:
      raise app.UsageError(f"--prompts_file={_PROMPTS_FILE.value} has no non-empty line")
  else:
    return None
  return [tokenizer.encode(t) for t in texts]


def _sample_precision(sample_cfg) -> str:
  """--sample_precision, else sample.precision (float32 for configs saved before the key existed)."""
  return _SAMPLE_PRECISION.value or sample_cfg.get("precision", "float32")


def cmd_sample():
  workdir, exp, params, step = _load_for_inference()
  cfg = exp.config.sample
  sampler = _sampler_for(exp)
  (steps,) = _steps_for(exp, sampler, cfg.steps)[:1]
  guidance, renoise = _guidance_and_renoise(cfg)
  contexts = _read_prompts(exp.data.tokenizer)
  sampling = inference.Sampling(sampler, steps, _BATCH_SIZE.value or cfg.batch_size, guidance, renoise,
                                _sample_precision(cfg))
  label = f"{sampler} {steps} steps"
  if contexts is None:
    if _BLOCK_SIZE.value is not None or _NUM_BLOCKS.value != 1:
      raise app.UsageError("--block_size / --num_blocks continue a prompt: give --prompt or --prompts_file")
    num = _NUM_SAMPLES.value or cfg.num_samples
    tokens = inference.generate(exp, params, sampling, num, _SEED.value, progress=_progress_bar(label))
    rows = [dict(tokens=row.tolist()) for row in tokens]
  else:
    length = exp.config.data.seq_len
    longest = max(len(c) for c in contexts)
    block = _BLOCK_SIZE.value or max(length - longest, 1)
    contexts = [c for c in contexts for _ in range(_NUM_SAMPLES.value or 1)]  # N continuations each
    continuations = inference.generate_blocks(exp, params, contexts, sampling, block, _NUM_BLOCKS.value,
                                              _SEED.value)
    rows = [dict(prompt=c, tokens=c + g, continuation=g) for c, g in zip(contexts, continuations)]
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  tag = ("_prompted" if contexts is not None else "") + (f"_cfg{guidance:g}" if guidance is not None else "") + (
      f"_renoise{renoise:g}" if renoise else "")
  path = os.path.join(out_dir, f"{sampler}_{steps}steps{tag}_ckpt{step}.jsonl")
  decode = exp.data.tokenizer.decode
  records = []
  for i, row in enumerate(rows):
    record = {"index": i, "sampler": sampler, "steps": steps, "checkpoint_step": step,
              "guidance": guidance, "renoise": renoise, "text": decode(row["tokens"]), "tokens": row["tokens"]}
    if "prompt" in row:
      record.update(prompt=decode(row["prompt"]), continuation=decode(row["continuation"]))
    records.append(record)
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  _point_latest_at(path)
  if _FORMAT.value == "jsonl":
    sys.stdout.writelines(json.dumps(r) + "\n" for r in records)
  else:
    # The prompt in bold on a terminal, in [brackets] in a file, so it never passes for generated text.
    mark = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("[", "]")
    for r in records:
      body = f"{mark[0]}{r['prompt']}{mark[1]} {r['continuation']}" if "prompt" in r else r["text"]
      print(f"--- sample {r['index']} ({sampler}, {steps} steps, checkpoint {step})\n{body}")
  print(f"wrote {len(rows)} samples to {path} (samples/latest points at it)", file=sys.stderr)


def _point_latest_at(path: str):
  """samples/latest -> the file just written (a relative symlink, replaced atomically)."""
  link = os.path.join(os.path.dirname(path), "latest")
  tmp = f"{link}.tmp{os.getpid()}"
  os.symlink(os.path.basename(path), tmp)
  os.replace(tmp, link)


def cmd_eval():
  workdir, exp, params, step = _load_for_inference()
  cfg = exp.config.eval
  num = _NUM_SAMPLES.value or cfg.num_samples
  held_out = exp.data.eval_rows(num)
  judge = judges.make_judge(_JUDGE.value, exp.data)
  sampler = _sampler_for(exp)
  guidance, renoise = _guidance_and_renoise(exp.config.sample)
  prompt_len = _PROMPT_LEN.value
  precision = _sample_precision(exp.config.sample)
  if not 0 <= prompt_len < exp.config.data.seq_len:
    raise app.UsageError(f"--prompt_len must lie in [0, data.seq_len={exp.config.data.seq_len})")
  prompts = inference.prefix_prompts(held_out[:, :prompt_len].tolist(), held_out.shape[1]) if prompt_len else None
  records = []
  exact_reference = (_EXACT_REFERENCE.value and sampler == "euler" and exp.data.markov is not None
                     and not prompt_len and guidance is None)
  for steps in _steps_for(exp, sampler, cfg.steps, allow_none=True):
    started = time.perf_counter()
    sampling = inference.Sampling(sampler, steps, _BATCH_SIZE.value or cfg.batch_size, guidance, renoise, precision)
    tokens = inference.generate(exp, params, sampling, num, _SEED.value,
                                progress=_progress_bar(f"{sampler} {steps} steps"), prompts=prompts)
    # Wall time of the whole generate call over the samples, its compilation included.
    record = {"sampler": sampler, "steps": steps, "checkpoint_step": step,
              "seconds_per_sample": (time.perf_counter() - started) / num}
    if prompt_len or guidance is not None or renoise:
      record.update(prompt_len=prompt_len, guidance=guidance, renoise=renoise)
    if precision != "float32" and sampler != "ar":
      record["precision"] = precision
    record.update(evaluate.score(exp.data, tokens, held_out, judge, prompt_len=prompt_len))
    records.append(record)
    print(json.dumps(record))
    if exact_reference:  # the same sampler with the exact denoiser, beside the model's record
      record = evaluate.exact_reference_record(exp, steps, num, _BATCH_SIZE.value or cfg.batch_size, _SEED.value,
                                               held_out, progress=_progress_bar(f"euler_exact {steps} steps"))
      records.append(record)
      print(json.dumps(record))
  if _DENOISER_GAP.value:
    if exp.model_config.causal:
      raise app.UsageError("--denoiser_gap measures a flow's denoiser; this workdir holds an autoregressive model")
    try:
      lambda_range = [float(v) for v in _DENOISER_GAP_RANGE.value.split(",")]
    except ValueError:
      lambda_range = []
    if len(lambda_range) != 2 or not lambda_range[0] < lambda_range[1]:
      raise app.UsageError(f"--denoiser_gap_range must be lo,hi with lo < hi, got {_DENOISER_GAP_RANGE.value!r}")
    gap = diagnostics.denoiser_gap(exp, params, exp.data.eval_rows(_DENOISER_GAP_ROWS.value),
                                   num_bins=_DENOISER_GAP_BINS.value, seed=_SEED.value, lambda_range=lambda_range,
                                   batch_size=_BATCH_SIZE.value or cfg.batch_size)
    gap["checkpoint_step"] = step
    print(diagnostics.gap_table(gap))
    if evaluate.writes_files():  # process 0 of several; the others hold the same numbers
      gap_json = os.path.join(workdir, "eval", "denoiser_gap.json")
      os.makedirs(os.path.dirname(gap_json), exist_ok=True)
      with open(gap_json, "w") as f:
        json.dump(gap, f, indent=2)
      gap_png = diagnostics.plot_gap(gap, os.path.join(workdir, "eval", "denoiser_gap.png"),
                                     title=f"{os.path.basename(os.path.abspath(workdir))}, step {step}")
      print(f"denoiser gap: {gap_json}, {gap_png}")
  if exp.model_config.causal:  # the AR model's exact held-out NLL (it needs no bound: --likelihood is moot)
    rows = exp.data.eval_rows(_LIKELIHOOD_ROWS.value)
    record = ar.heldout_nll(exp, params, rows, _BATCH_SIZE.value or cfg.batch_size)
    record["checkpoint_step"] = step
    records.append(record)
    print(json.dumps(record))
  elif _LIKELIHOOD.value:
    try:
      endpoints = [float(v) for v in _LIKELIHOOD_ENDPOINTS.value.split(",") if v.strip()]
    except ValueError:
      endpoints = []
    if not endpoints:
      raise app.UsageError(f"--likelihood_endpoints must be numbers separated by commas, got "
                           f"{_LIKELIHOOD_ENDPOINTS.value!r}")
    settings = likelihood.BoundSettings(num_points=_LIKELIHOOD_POINTS.value, candidates=tuple(endpoints),
                                        batch_size=_BATCH_SIZE.value or cfg.batch_size)
    record = evaluate.likelihood_bound(exp, params, _LIKELIHOOD_ROWS.value, _SEED.value,
                                       progress=_progress_bar("likelihood bound"),
                                       selection_rows=_LIKELIHOOD_SELECTION_ROWS.value, settings=settings,
                                       bound_space=_LIKELIHOOD_SPACE.value)
    record["checkpoint_step"] = step
    records.append(record)
    print(json.dumps(record))
  if not records:
    if not _DENOISER_GAP.value:
      print("--steps=0 and nothing else asked for (--denoiser_gap, --likelihood): nothing to do")
    return
  if not evaluate.writes_files():
    return
  path = os.path.join(workdir, "eval", "results.json")
  all_records = evaluate.write_results(path, records)
  table_path, plot_path = report.write_eval_report(os.path.dirname(path), all_records,
                                                   os.path.basename(os.path.abspath(workdir)))
  print(report.eval_table(all_records))
  print(f"results: {path}, {table_path}, {plot_path}")


def cmd_export():
  if not _OUT.value:
    raise app.UsageError("export needs --out=DIR (the directory to write)")
  workdir = _require_workdir()
  if loading.kind(workdir) != "workdir":
    raise app.UsageError(f"{workdir} is already an exported checkpoint; export a training workdir")
  exp, params, step = loading.load(workdir, _checkpoint_step())
  info = export.write(exp, params, step, workdir, _OUT.value, _DTYPE.value)
  print(f"exported: {json.dumps(info)}\nto: {os.path.abspath(_OUT.value)} (params.safetensors, config.json, "
        f"export_info.json{', tokenizer.model' if os.path.exists(os.path.join(_OUT.value, 'tokenizer.model')) else ''})")


def cmd_report(paths):
  if not paths:
    raise app.UsageError("usage: cfmjax report W1 [W2 ...] [--out=DIR] [--names=a,b,...]")
  planned = sweep.read_plan(paths[0]) if len(paths) == 1 else None
  if planned is not None:  # a sweep's root: its points, named as the sweep named them
    paths = [e["workdir"] for e in planned]
    if not _NAMES.value:
      names = [e["name"] for e in planned]
  names = _NAMES.value.split(",") if _NAMES.value else (
      names if planned is not None else [os.path.basename(os.path.abspath(p)) for p in paths])
  if len(names) != len(paths):
    raise app.UsageError(f"--names has {len(names)} names for {len(paths)} directories")
  runs = [(name, report.load_records(p)) for name, p in zip(names, paths)]
  table_path, plot_path = report.write_comparison(runs, _OUT.value or "report")
  print(report.comparison_table(runs))
  print(f"report: {table_path}, {plot_path}")


def cmd_pipeline():
  main_job.run(_WORKDIR.value or "runs/main", _BASE_STEPS.value, _JUDGE_STEPS.value, _DISTILL_STEPS.value,
               _NUM_SAMPLES.value or 64, shlex.split(_STAGE_ARGS.value))


def cmd_sweep():
  if _CONFIG.value is None or not _SWEEP.value:
    raise app.UsageError("sweep needs --config=FILE --workdir=ROOT --sweep='key=v1,v2;key2=...'")
  root = _require_workdir()
  extra = [a for a in sys.argv[2:] if a.startswith("--config.")]  # the run's own overrides, kept per point
  config_path = config_flags.get_config_filename(flags.FLAGS["config"])
  try:
    entries = sweep.plan(_CONFIG.value, config_path, root, _SWEEP.value, extra)
  except (KeyError, ValueError) as e:
    raise app.UsageError(str(e).strip("'\"")) from None
  print(f"sweep: {len(entries)} points under {os.path.abspath(root)} (sweep.json): "
        + ", ".join(e["name"] for e in entries))
  if _SWEEP_LAUNCH.value == "slurm":
    print(f"submit with: sbatch {sweep.write_slurm(root, entries)}")
  elif _SWEEP_LAUNCH.value == "tpu":
    print(f"run the lines of {sweep.write_tpu(root, entries, config_path)}")
  else:
    sweep.run_local(entries)
    print(f"compare them with: cfmjax report {root}")


def cmd_compile():
  if _CONFIG.value is None or not _MESH.value:
    raise app.UsageError("compile needs --config=FILE --mesh=data,fsdp,tensor")
  try:
    mesh = aot.parse_mesh(_MESH.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  aot.use_fake_cpu_devices(_NUM_DEVICES.value or mesh[0] * mesh[1] * mesh[2])
  if _SHARDINGS_OUT.value:
    table = aot.sharding_table(_CONFIG.value, mesh)
    with open(_SHARDINGS_OUT.value, "w") as f:
      json.dump(table, f, indent=1, sort_keys=True)
      f.write("\n")
    print(f"wrote the partition specs of {len(table)} state leaves to {_SHARDINGS_OUT.value} (nothing compiled)")
    return
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
  if argv[1] == "prepare":  # no devices and no cluster: tokenizing is CPU work (hosts split it by flags)
    cmd_prepare()
    return
  if argv[1] == "pipeline":  # a driver of other cfmjax processes: it touches no device itself
    cmd_pipeline()
    return
  distributed.maybe_initialize()  # before anything asks JAX for devices
  if argv[1] == "report":  # the only command with positional arguments (the workdirs)
    return cmd_report(argv[2:])
  {"train": cmd_train, "distill": cmd_distill, "sample": cmd_sample, "eval": cmd_eval,
   "export": cmd_export, "sweep": cmd_sweep}[argv[1]]()


def run():
  """Console-script entry point."""
  app.run(main)
