"""Shared test setup: 8 fake CPU devices (so sharding is exercised) and a tiny Markov config."""

import os
import shutil
import sys

# Must be set before JAX initialises its backend.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# Cheaper CPU compiles: the programs are tiny, so compiling them (LLVM), not running them, is the
# cost on 2 cores; these halve it (measured on tests/test_training.py + test_flow_map_math.py, whose
# tolerances hold). CFMJAX_TEST_FULL_XLA=1 keeps XLA's default optimisation.
if not os.environ.get("CFMJAX_TEST_FULL_XLA") and "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole run (and the CLI subprocesses it starts): the same
# tiny programs are compiled by several tests, and compiling dominates their run time on 2 cores.
# It lives in the checkout (.cache/ is git-ignored), not in a /tmp shared with other checkouts.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO_ROOT, ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import filelock  # noqa: E402
import pytest  # noqa: E402

from cfmjax.run import configs  # noqa: E402
from cfmjax.run.configs import base_config  # noqa: E402


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

  from cfmjax.run import experiment  # noqa: PLC0415
  from cfmjax.training import train  # noqa: PLC0415

  exp = experiment.build(config, None, devices=devices or jax.devices()[:1])
  state = experiment.init_state(exp, config.seed)
  step = train.make_train_step(exp)
  it = exp.data.train_iterator(config.train.batch_size, seed=0)
  out = []
  with exp.activate():
    for _ in range(num_steps):
      state, m = step(state, train.global_batch(exp, np.asarray(next(it))))
      out.append(float(m["loss"]))
  return np.array(out), state


def assert_same_tree(tree, reference):
  """Bit-equal pytrees: the same leaf paths, each array equal (the tree is fetched to the host)."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  flat_ref = dict(jax.tree_util.tree_flatten_with_path(reference)[0])
  flat = dict(jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0])
  assert flat.keys() == flat_ref.keys()
  for k in flat_ref:
    np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(flat_ref[k]), err_msg=str(k))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("CFMJAX_CACHE", str(tmp_path / "cache"))
  return tmp_path / "cache"




def run_cli(*argv):
  """`cfmjax ARGV` in this process (flags parsed as absl would), sparing a JAX start-up and reusing
  this process's compiled programs. Returns (stdout, log): what it printed, and what it logged
  through the `cfmjax` loggers (resumes, handoffs) which the real command writes to stderr."""
  import contextlib  # noqa: PLC0415
  import io  # noqa: PLC0415
  import logging  # noqa: PLC0415

  from absl import flags  # noqa: PLC0415

  from cfmjax import cli  # noqa: PLC0415

  log, stream, stdout = logging.getLogger("cfmjax"), io.StringIO(), io.StringIO()
  handler, level = logging.StreamHandler(stream), log.level
  log.addHandler(handler)  # also keeps cli.main from binding a handler to this test's stderr
  log.setLevel(logging.INFO)
  flags.FLAGS.unparse_flags()
  saved_argv, sys.argv = sys.argv, ["cfmjax", *argv]  # ml_collections reads --config.* overrides there
  try:
    with contextlib.redirect_stdout(stdout):
      cli.main(flags.FLAGS(sys.argv))
  finally:
    sys.argv = saved_argv
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:  # defined per parse, from argv
      delattr(flags.FLAGS, name)
    log.removeHandler(handler)
    log.setLevel(level)
  return stdout.getvalue(), stream.getvalue()


# Model and batch sizes of the command-line tests (what tiny_config sets, as flags).
TINY_FLAGS = ["--config.model.d_model=32", "--config.model.num_layers=2", "--config.model.num_heads=2",
              "--config.model.mlp_dim=64", "--config.model.time_features=16", "--config.data.seq_len=16",
              "--config.train.batch_size=16", "--config.train.log_every=1", "--config.train.eval_every=2",
              "--config.train.eval_batch_size=16", "--config.train.checkpoint_every=2"]


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
  """CFMJAX_CACHE for the session-scoped runs (prepared corpora, tokenizers)."""
  path = tmp_path_factory.mktemp("cfmjax_cache")
  old = os.environ.get("CFMJAX_CACHE")
  os.environ["CFMJAX_CACHE"] = str(path)
  yield path
  if old is None:
    os.environ.pop("CFMJAX_CACHE", None)
  else:
    os.environ["CFMJAX_CACHE"] = old


def built_once(tmp_path_factory, name, build):
  """The folder `build(folder)` fills, built once per test run and shared by pytest-xdist's workers,
  which would otherwise each train their own copy: the first worker to ask builds it under a file
  lock, the others wait for it. A failed build leaves no marker, so the next asker tries again and
  fails with its own traceback. Shared: tests that write into it must copy it."""
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's folder, not /tmp
  folder = root / "built_once" / name
  with filelock.FileLock(str(root / f"built_once_{name}.lock")):
    if not (folder / ".built").exists():
      shutil.rmtree(folder, ignore_errors=True)
      folder.mkdir(parents=True)
      build(folder)
      (folder / ".built").touch()
  return folder


@pytest.fixture(scope="session")
def markov_base(tmp_path_factory, session_cache):
  """A tiny base flow trained through `cfmjax train` on a 2x2x2 mesh (V = 12): 2 steps, then resumed
  to 4. Shared: tests that write into it must copy it (outputs of eval / sample can go elsewhere
  with --checkpoint=THIS --workdir=OTHER). Returns (workdir, log of the resumed run)."""
  def build(folder):
    args = ["train", "--config=experiments/base_flow/markov_tiny.py", f"--workdir={folder / 'w'}",
            "--config.data.markov.vocab_size=12", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", *TINY_FLAGS]
    with _in_repo():
      run_cli(*args, "--config.train.num_steps=2")
      _, log = run_cli(*args, "--config.train.num_steps=4")
    (folder / "log.txt").write_text(log)

  folder = built_once(tmp_path_factory, "markov_base", build)
  return folder / "w", (folder / "log.txt").read_text()


@pytest.fixture(scope="session")
def markov_psd(tmp_path_factory, markov_base):
  """PSD distilled 2 steps from `markov_base` on another mesh (8x1x1) through `cfmjax distill`.
  Returns (workdir, log)."""
  def build(folder):
    with _in_repo():
      _, log = run_cli("distill", "--config=experiments/flow_map/markov_tiny_psd.py", f"--workdir={folder / 'w'}",
                       f"--config.init_from={markov_base[0]}", "--config.train.num_steps=2",
                       "--config.train.batch_size=16", "--config.train.log_every=1", "--config.mesh.data=8")
    (folder / "log.txt").write_text(log)

  folder = built_once(tmp_path_factory, "markov_psd", build)
  return folder / "w", (folder / "log.txt").read_text()


@pytest.fixture(scope="session")
def markov_ar(tmp_path_factory, markov_base):
  """The AR baseline on markov_base's source (V = 12), 2 steps through `cfmjax train`."""
  def build(folder):
    with _in_repo():
      run_cli("train", "--config=experiments/ar/markov_tiny.py", f"--workdir={folder / 'w'}",
              "--config.data.markov.vocab_size=12", *TINY_FLAGS, "--config.train.num_steps=2",
              "--config.train.eval_every=0")

  return built_once(tmp_path_factory, "markov_ar", build) / "w"


def _in_repo():
  """cwd = the repository root for the duration (config paths are relative to it, as in the README)."""
  import contextlib  # noqa: PLC0415

  @contextlib.contextmanager
  def cm():
    old = os.getcwd()
    os.chdir(REPO_ROOT)
    try:
      yield
    finally:
      os.chdir(old)

  return cm()
