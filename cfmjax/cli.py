"""The `cfmjax` command line.

  cfmjax train  --config=experiments/base_flow/markov_tiny.py --workdir=W [--config.train.num_steps=...]
  cfmjax distill --config=experiments/flow_map/markov_tiny_psd.py --workdir=W2 --config.init_from=W
  cfmjax sample --workdir=W --sampler=euler --steps=128 --num_samples=16
  cfmjax eval   --workdir=W --sampler=euler --steps=128,16,4 --num_samples=256
  cfmjax eval   --workdir=W2 --sampler=flowmap --steps=1,2,4
  cfmjax sample --workdir=W --prompt="..." [--block_size=8 --num_blocks=4] [--guidance=1.5]
  cfmjax eval   --workdir=W --prompt_len=24 --guidance=2    (held-out prefixes; NLL of the rest)

(`export` arrives with the evaluation suite.)
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

COMMANDS = ("train", "distill", "sample", "eval")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (ml_collections).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples and eval.")
_SAMPLER = flags.DEFINE_string("sampler", "euler", "Sampler: euler (base flow) | flowmap (k-step flow map).")
_STEPS = flags.DEFINE_string("steps", None, "Network evaluations: one number, or a comma list for eval.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", None, "Number of sequences to generate.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Sequences generated per compiled call.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step to load (default: latest).")
_PROMPT = flags.DEFINE_string("prompt", None, "sample: text to continue (tokenised with the run's tokenizer).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "sample: a file with one prompt per line.")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", None, "sample: tokens per generated block (default: "
                                   "the rest of the window after the prompt).")
_NUM_BLOCKS = flags.DEFINE_integer("num_blocks", 1, "sample: blocks generated one after another.")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Classifier-free guidance ω for the Euler sampler "
                               "(0 unconditional, 1 conditional); default: sample.guidance (< 0: off).")
_RENOISE = flags.DEFINE_float("renoise", None, "Flow-map sampler: CTM-style renoising η in [0, 1] "
                              "(0 deterministic); default: sample.renoise.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 0, "eval: condition on the first N tokens of held-out "
                                   "rows and judge only the rest (exact judge: log p(rest | prefix)).")
_LIKELIHOOD = flags.DEFINE_bool("likelihood", False, "eval: also bound the NLL of held-out rows (SPEC §5).")
_LIKELIHOOD_POINTS = flags.DEFINE_integer("likelihood_points", 128, "eval: quadrature points in log-SNR.")
_LIKELIHOOD_ROWS = flags.DEFINE_integer("likelihood_rows", 256, "eval: held-out rows for the bound.")


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
  from cfmjax import inference  # noqa: PLC0415

  workdir = _require_workdir()
  exp, params, step = inference.load(workdir, _STEP.value)
  return workdir, exp, params, step


def _guidance_and_renoise(cfg):
  guidance = _GUIDANCE.value if _GUIDANCE.value is not None else cfg.get("guidance", -1.0)
  renoise = _RENOISE.value if _RENOISE.value is not None else cfg.get("renoise", 0.0)
  return (None if guidance < 0 else guidance), renoise


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


def cmd_sample():
  from cfmjax import inference  # noqa: PLC0415

  workdir, exp, params, step = _load_for_inference()
  cfg = exp.config.sample
  (steps,) = _steps_list(cfg.steps)[:1]
  guidance, renoise = _guidance_and_renoise(cfg)
  contexts = _read_prompts(exp.data.tokenizer)
  batch_size = _BATCH_SIZE.value or cfg.batch_size
  label = f"{_SAMPLER.value} {steps} steps"
  if contexts is None:
    if _BLOCK_SIZE.value is not None or _NUM_BLOCKS.value != 1:
      raise app.UsageError("--block_size / --num_blocks continue a prompt: give --prompt or --prompts_file")
    num = _NUM_SAMPLES.value or cfg.num_samples
    tokens = inference.generate(exp, params, _SAMPLER.value, steps, num, batch_size, _SEED.value,
                                progress=_progress_bar(label), guidance=guidance, renoise=renoise)
    rows = [dict(tokens=row.tolist()) for row in tokens]
  else:
    length = exp.config.data.seq_len
    longest = max(len(c) for c in contexts)
    block = _BLOCK_SIZE.value or max(length - longest, 1)
    contexts = [c for c in contexts for _ in range(_NUM_SAMPLES.value or 1)]  # N continuations each
    continuations = inference.generate_blocks(exp, params, contexts, _SAMPLER.value, steps, block,
                                              _NUM_BLOCKS.value, batch_size, _SEED.value,
                                              guidance=guidance, renoise=renoise)
    rows = [dict(prompt=c, tokens=c + g, continuation=g) for c, g in zip(contexts, continuations)]
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  tag = ("_prompted" if contexts is not None else "") + (f"_cfg{guidance:g}" if guidance is not None else "") + (
      f"_renoise{renoise:g}" if renoise else "")
  path = os.path.join(out_dir, f"{_SAMPLER.value}_{steps}steps{tag}_ckpt{step}.jsonl")
  decode = exp.data.tokenizer.decode
  with open(path, "w") as f:
    for i, row in enumerate(rows):
      record = {"index": i, "sampler": _SAMPLER.value, "steps": steps, "checkpoint_step": step,
                "guidance": guidance, "renoise": renoise, "text": decode(row["tokens"]), "tokens": row["tokens"]}
      if "prompt" in row:
        record.update(prompt=decode(row["prompt"]), continuation=decode(row["continuation"]))
      f.write(json.dumps(record) + "\n")
  for row in rows[:3]:
    if "prompt" in row:
      print(f"--- [{decode(row['prompt'])}] {decode(row['continuation'])}")
    else:
      print("---\n" + decode(row["tokens"]))
  print(f"wrote {len(rows)} samples to {path}")


def cmd_eval():
  from cfmjax import evaluate, inference  # noqa: PLC0415

  workdir, exp, params, step = _load_for_inference()
  cfg = exp.config.eval
  num = _NUM_SAMPLES.value or cfg.num_samples
  held_out = exp.data.eval_rows(num)
  guidance, renoise = _guidance_and_renoise(exp.config.sample)
  prompt_len = _PROMPT_LEN.value
  if not 0 <= prompt_len < exp.config.data.seq_len:
    raise app.UsageError(f"--prompt_len must lie in [0, data.seq_len={exp.config.data.seq_len})")
  prompts = inference.prefix_prompts(held_out[:, :prompt_len].tolist(), held_out.shape[1]) if prompt_len else None
  records = []
  for steps in _steps_list(cfg.steps):
    tokens = inference.generate(exp, params, _SAMPLER.value, steps, num, _BATCH_SIZE.value or cfg.batch_size,
                                _SEED.value, progress=_progress_bar(f"{_SAMPLER.value} {steps} steps"),
                                prompts=prompts, guidance=guidance, renoise=renoise)
    record = {"sampler": _SAMPLER.value, "steps": steps, "checkpoint_step": step}
    if prompt_len or guidance is not None or renoise:
      record.update(prompt_len=prompt_len, guidance=guidance, renoise=renoise)
    record.update(evaluate.score(exp.data, tokens, held_out, prompt_len=prompt_len))
    records.append(record)
    print(json.dumps(record))
  if _LIKELIHOOD.value:
    rows = exp.data.eval_rows(_LIKELIHOOD_ROWS.value)
    record = evaluate.likelihood_bound(exp, params, rows, _LIKELIHOOD_POINTS.value,
                                       _BATCH_SIZE.value or cfg.batch_size, _SEED.value,
                                       progress=_progress_bar("likelihood bound"))
    record["checkpoint_step"] = step
    records.append(record)
    print(json.dumps(record))
  path = os.path.join(workdir, "eval", "results.json")
  all_records = evaluate.write_results(path, records)
  table = evaluate.format_table(all_records)
  with open(os.path.join(workdir, "eval", "results.md"), "w") as f:
    f.write(table + "\n")
  print(table)
  print(f"results: {path}")


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
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
  from cfmjax import distributed  # noqa: PLC0415

  distributed.maybe_initialize()  # before anything asks JAX for devices
  {"train": cmd_train, "distill": cmd_distill, "sample": cmd_sample, "eval": cmd_eval}[argv[1]]()


def run():
  """Console-script entry point."""
  app.run(main)
