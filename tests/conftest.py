"""Shared test setup: 8 fake CPU devices (so sharding is exercised) and a tiny Markov config."""

import os

# Must be set before JAX initialises its backend.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole run (and the CLI subprocesses it starts): the same
# tiny programs are compiled by several tests, and compiling dominates their run time on 2 cores.
# It lives in the checkout (.cache/ is git-ignored), not in a /tmp shared with other checkouts.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO_ROOT, ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402

from cfmjax import configs  # noqa: E402
from cfmjax.configs import base_config  # noqa: E402


def tiny_config(**overrides):
  """A model small enough that a train step compiles in seconds on 2 cores."""
  c = base_config()
  c.data.source = "markov"
  c.data.seq_len = 16
  c.data.markov.vocab_size = 8
  c.data.markov.order = 1
  c.model.d_model = 32
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.mlp_dim = 64
  c.model.time_features = 16
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 2
  c.optim.ema_decay = 0.9
  c.train.batch_size = 16
  c.train.num_steps = 4
  c.train.log_every = 1
  c.train.eval_every = 0
  c.train.checkpoint_every = 2
  c.sample.num_samples = 8
  c.sample.batch_size = 8
  c.eval.num_samples = 16
  c.eval.batch_size = 16
  return configs.override(c, overrides)


def run_steps(config, devices=None, num_steps=3):
  """Per-step losses and the final train state of a fresh run of `config` on `devices` (default: the
  first device), reading the config's own data stream from its start."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from cfmjax import experiment, train  # noqa: PLC0415

  exp = experiment.build(config, None, devices=devices or jax.devices()[:1])
  state = experiment.init_state(exp, config.seed)
  step = train.make_train_step(exp)
  it = exp.data.train_iterator(config.train.batch_size, seed=0)
  out = []
  with jax.set_mesh(exp.mesh):
    for _ in range(num_steps):
      state, m = step(state, train.global_batch(exp, np.asarray(next(it))))
      out.append(float(m["loss"]))
  return np.array(out), state


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("CFMJAX_CACHE", str(tmp_path / "cache"))
  return tmp_path / "cache"


