"""What the benchmark scripts share: a sized config, a dataset-free experiment, a timed train step.

Benchmarks feed random token ids (speed does not depend on the data), so any vocabulary size works
without a tokenizer or a V × V Markov chain, and build the experiment from shapes (`aot.py`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cfmjax import objectives  # noqa: E402
from cfmjax.run import configs, experiment  # noqa: E402
from cfmjax.training import aot, train  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def add_size_flags(parser, vocab=8192, d_model=128, layers=2, heads=4, mlp=512, seq_len=128, batch=8):
  parser.add_argument("--d_model", type=int, default=d_model)
  parser.add_argument("--layers", type=int, default=layers)
  parser.add_argument("--heads", type=int, default=heads)
  parser.add_argument("--mlp", type=int, default=mlp)
  parser.add_argument("--seq_len", type=int, default=seq_len)
  parser.add_argument("--batch", type=int, default=batch)
  parser.add_argument("--dtype", default="float32")


def sized_config(args, vocab: int, seq_len: int | None = None, **overrides):
  """A base-flow config of the requested size on one device (the markov source stands in for data)."""
  c = configs.base_config()
  c.data.source = "markov"
  c.data.markov.vocab_size = vocab  # what the (abstract) data stand-in gives: aot.vocab_size_of
  c.data.seq_len = seq_len or args.seq_len
  c.model.d_model, c.model.num_layers, c.model.num_heads = args.d_model, args.layers, args.heads
  c.model.mlp_dim, c.model.time_features, c.model.dtype = args.mlp, 64, args.dtype
  c.train.batch_size = args.batch
  c.mesh.data = 1
  return configs.override(c, overrides)


def has_module(name: str) -> bool:
  return importlib.util.find_spec(name) is not None


def require_ar():
  """The autoregressive baseline lives in cfmjax/objectives/ar.py (issue 4); say so instead of failing obscurely."""
  if not has_module("cfmjax.objectives.ar"):
    raise RuntimeError("the autoregressive baseline (cfmjax/objectives/ar.py, objective=ar configs) is not in "
                       "this checkout; merge it (issue 4) to benchmark AR")


def build(config):
  return aot.abstract_experiment(config, jax.devices()[:1])


def random_tokens(config, seed: int = 0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, aot.vocab_size_of(config), (config.train.batch_size, config.data.seq_len), dtype=np.int32)


def time_train_step(config, steps: int) -> dict:
  """Median seconds of the compiled train step (compile excluded) and its compiled memory."""
  exp = build(config)
  step_fn = train.make_train_step(exp)
  tokens = jax.device_put(random_tokens(config), exp.batch_sharding)
  with exp.activate():
    compiled = step_fn.lower(exp.abstract_state, tokens).compile()
    mem = compiled.memory_analysis()
    state = experiment.init_state(exp, 0)
    state, m = compiled(state, tokens)  # warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      state, m = compiled(state, tokens)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
  seconds = float(np.median(times))
  step_flops = objectives.step_flops(exp.config, vocab=exp.vocab_size)["total"]
  return {"ms_per_step": 1000 * seconds,
          "peak_mib": (mem.temp_size_in_bytes + mem.argument_size_in_bytes) / 2 ** 20,
          "temp_mib": mem.temp_size_in_bytes / 2 ** 20,
          "model_gflops_per_step": step_flops / 1e9,
          "gflops_per_sec": step_flops / seconds / 1e9}


def write_results(name: str, payload: dict):
  os.makedirs(RESULTS, exist_ok=True)
  payload = dict(payload, devices=[str(d) for d in jax.devices()], jax=jax.__version__)
  path = os.path.join(RESULTS, f"{name}.json")
  with open(path, "w") as f:
    json.dump(payload, f, indent=2)
  print(f"wrote {path}")


def print_table(rows: list[dict], columns: list[str]):
  print("| " + " | ".join(columns) + " |")
  print("|" + "---|" * len(columns))
  for r in rows:
    print("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")


def _fmt(v):
  if isinstance(v, float):
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
  return "-" if v is None else str(v)
