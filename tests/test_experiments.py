"""Every file in experiments/ runs: one train / distill step of it through the trainer, shrunk.

The glob is the list: a new config file without a base run named here (distillation) fails
`test_every_distillation_config_names_its_base`, and every file gets its own step test. The sizes
are shrunk (model, sequence, batch) and the data too: TFDS sources (170M / 1.7B configs; their
datasets are not here) run on synthetic Markov tokens, the embedded Bible on a tiny text corpus with
a 64-token vocabulary (V > d_model, so `auto` keeps the embedding-space state of text configs). What
is kept: the stage, the loss, model features (self-conditioning, prompts, dtype, remat, scan, state
space), the schedule and the optimizer. Distillation configs start from a 1-step run of their base
config, shrunk alike (as their docstrings chain them), so fixed-point and fixed-point→PSD distil
from a real self-conditioned base, and the guided variant from a prompt-trained one.

The step runs are the slow tier (a compile each); the config-level checks (every config builds its
FLOP count, every distillation config has its base) are in the default tier.
"""

import glob
import json
import os

import jax
import numpy as np
import pytest

from cfmjax import objectives
from cfmjax.data import store
from cfmjax.run import configs, loading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(REPO, "experiments")
CONFIGS = sorted(os.path.relpath(p, EXPERIMENTS) for p in glob.glob(os.path.join(EXPERIMENTS, "**", "*.py"),
                                                                   recursive=True))

# The run each distillation config starts from (--config.init_from in its docstring).
BASE_OF = {
    "flow_map/markov_tiny_psd.py": "base_flow/markov_tiny.py",
    "flow_map/markov_tiny_lsd.py": "base_flow/markov_tiny.py",
    "flow_map/markov_tiny_esd.py": "base_flow/markov_tiny.py",
    "flow_map/text_tiny_psd.py": "base_flow/text_tiny.py",
    "flow_map/lm1b_170m_psd.py": "base_flow/lm1b_170m.py",
    "flow_map/lm1b_170m_esd.py": "base_flow/lm1b_170m.py",
    "flow_map/owt_170m_psd.py": "base_flow/owt_170m.py",
    "flow_map/owt_170m_esd.py": "base_flow/owt_170m.py",
    "flow_map/owt_1p7b_psd.py": "base_flow/owt_1p7b.py",
    "conditional/markov_tiny_fixed_point.py": "conditional/markov_tiny_selfcond.py",
    "conditional/markov_tiny_fixed_point_psd.py": "conditional/markov_tiny_fixed_point.py",
    "conditional/text_tiny_fixed_point.py": "conditional/text_tiny_selfcond.py",
    "conditional/text_tiny_fixed_point_psd.py": "conditional/text_tiny_fixed_point.py",
}
# Variants that no file spells out: guided distillation (distill.guidance = ω >= 0) from the
# prompt-trained base. name -> (config file, base run, overrides).
VARIANTS = {
    "guided_psd": ("flow_map/markov_tiny_psd.py", "conditional/markov_tiny_prompt.py", {"distill.guidance": 2.0}),
    # the same in embedding space: text_tiny's prompt-trained, self-conditioned base (V = 64 > d_model)
    "guided_psd_text": ("flow_map/text_tiny_psd.py", "conditional/text_tiny_selfcond.py", {"distill.guidance": 2.0}),
}

CORPUS_WORDS = "in the beginning god created heavens and earth was without form void darkness light".split()


def load(rel):
  return configs.from_file(os.path.join(EXPERIMENTS, rel))


def shrink(c, corpus_dir):
  """`c` at test size, on data that is here; everything else as the file says."""
  with c.unlocked():
    if c.data.source in ("tfds",):
      c.data.source = "markov"
      c.data.markov.vocab_size, c.data.markov.order = 8, 1
    elif c.data.source == "prepared":  # a synthetic token store stands in for the prepared corpus
      path = os.path.join(corpus_dir, "synthetic_store")
      if not os.path.exists(os.path.join(path, "manifest.json")):
        store.write_synthetic(path, 256, 16, vocab_size=64, heldout_rows=16)
      c.data.prepared.path = path
    elif c.data.source in ("bible", "text"):
      c.data.source = "text"
      c.data.text.paths = os.path.join(corpus_dir, "*.txt")
      c.data.tokenizer.vocab_size = 64
      c.data.heldout_fraction = 0.2
    else:
      c.data.markov.vocab_size = min(int(c.data.markov.vocab_size), 8)
    c.data.seq_len = 16
    m = c.model
    m.d_model, m.num_layers, m.num_heads, m.mlp_dim, m.time_features = 32, 2, 2, 64, 16
    if m.vocab_chunk > 0:
      m.vocab_chunk = 16  # still chunked (V = 64 text, 8 Markov: one chunk), at test size
    if objectives.stage(c) == "distill":
      c.flow.prompt.max_len = min(int(c.flow.prompt.max_len), 8)
    else:
      c.flow.prompt.max_len = min(int(c.flow.prompt.max_len), 8)
      c.flow.prompt.min_len = min(int(c.flow.prompt.min_len), c.flow.prompt.max_len)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    c.train.batch_size = 8
    c.train.eval_batch_size = 8
    c.train.num_steps = 1
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.checkpoint_every = 1
    c.optim.warmup_steps = min(int(c.optim.warmup_steps), 1)
  return c


def write_corpus(path, num_docs=40, seed=0):
  rng = np.random.default_rng(seed)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "corpus.txt"), "w") as f:
    f.write("\n\n".join(" ".join(rng.choice(CORPUS_WORDS, size=rng.integers(10, 40))) for _ in range(num_docs)))


# ------------------------------------------------------------------------------------------------
# Default tier: config-level checks, no compile.


def test_every_distillation_config_names_its_base():
  for rel in CONFIGS:
    c = load(rel)
    if objectives.stage(c) == "distill":
      assert rel in BASE_OF, f"{rel}: add its base run to BASE_OF in {__file__}"
      assert BASE_OF[rel] in CONFIGS
    else:
      assert rel not in BASE_OF
  assert set(BASE_OF) <= set(CONFIGS)


@pytest.mark.parametrize("rel", CONFIGS)
def test_every_config_has_a_flop_count(rel):
  """What the trainer computes before its first step (the fixed-point crash was here)."""
  c = load(rel)
  if objectives.stage(c) == "distill":  # the model comes from the base run: count with the base's model
    root = BASE_OF[rel]
    while root in BASE_OF:
      root = BASE_OF[root]
    with c.unlocked():
      c.model = load(root).model
  vocab = c.data.markov.vocab_size if c.data.source == "markov" else c.data.tokenizer.vocab_size
  got = objectives.step_flops(c, vocab=vocab)
  assert got["total"] > got["forward"] > 0
  if objectives.stage(c) == "distill":
    assert got["teacher"] > 0


# ------------------------------------------------------------------------------------------------
# Slow tier: one step of each, through train.train.


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """rel -> workdir of its shrunk 1-step run, trained on first use (bases before distillations)."""
  root = tmp_path_factory.mktemp("experiments")
  corpus = str(root / "corpus")
  write_corpus(corpus)
  old = os.environ.get("CFMJAX_CACHE")
  os.environ["CFMJAX_CACHE"] = str(root / "cache")
  done = {}

  def run(rel, base=None, overrides=None, name=None):
    from cfmjax.training import train  # noqa: PLC0415

    name = name or rel
    if name in done:
      return done[name]
    c = shrink(load(rel), corpus)
    if objectives.stage(c) == "distill":
      base_dir = run(base or BASE_OF[rel])
      with c.unlocked():
        c.init_from = base_dir
    c = configs.override(c, overrides or {})
    workdir = str(root / name.replace("/", "__").replace(".py", ""))
    last = train.train(c, workdir, devices=jax.devices()[:1])
    done[name] = workdir
    assert last["step"] == 1 and np.isfinite(last["loss"]), (name, last)
    return workdir

  yield run
  if old is None:
    os.environ.pop("CFMJAX_CACHE", None)
  else:
    os.environ["CFMJAX_CACHE"] = old


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _check_step(workdir, expect_stage):
  (record,) = [r for r in _records(workdir) if "loss" in r]
  assert record["step"] == 1 and np.isfinite(record["loss"])
  assert record["model_tflops_per_sec_per_device"] > 0  # the FLOP count ran (fixed_point crashed here)
  saved = json.loads(open(os.path.join(workdir, "config.json")).read())
  assert objectives.stage(configs.from_saved(saved)) == expect_stage
  # What the run used: the request with a distillation's base sections (run.json), and what it derived.
  start = json.loads(open(os.path.join(workdir, "run.json")).read())["starts"][-1]
  return record, saved, loading.load_config(workdir), start


@pytest.mark.slow
@pytest.mark.parametrize("rel", CONFIGS)
def test_one_step_of_every_config(runs, rel):
  c = load(rel)
  workdir = runs(rel)
  record, saved, used, start = _check_step(workdir, objectives.stage(c))
  if objectives.stage(c) == "distill":
    assert saved["init_from"] and saved["objective"] == c.objective
    if c.objective == "fixed_point":
      assert "fixed_point_kl" in record and used.model.self_condition
    else:
      assert "consistency_kl" in record
  if rel.startswith(("base_flow/text_tiny", "conditional/text_tiny")) or rel == "flow_map/text_tiny_psd.py":
    # The README's main job, and the conditioned features on its corpus (prompts, self-conditioning,
    # fixed-point distillation), run in embedding space (V = 64 > d_model = 32 under 'auto').
    assert start["state_space"] == "embedding" and start["vocab_size"] > used.model.d_model
  if c.objective == "ar":
    assert saved["objective"] == "ar" and "causal" not in saved["model"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_one_step_of_each_variant(runs, name):
  rel, base, overrides = VARIANTS[name]
  workdir = runs(rel, base=base, overrides=overrides, name=name)
  record, saved, used, start = _check_step(workdir, "distill")
  assert saved["distill"]["guidance"] == overrides["distill.guidance"] and used.flow.prompt.max_len > 0
  assert "consistency_kl" in record and start["prompt_flag"]
  assert start["state_space"] == ("embedding" if name.endswith("_text") else "vocab")
