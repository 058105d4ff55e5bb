"""The default value of every config key. Experiment files start from `base_config()` and override.

Keeping every key here (rather than scattered `config.get(..., default)`) means any setting can be
overridden from the command line (`--config.flow.schedule=argmax`) and `config.json` in a workdir
lists the complete run.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections
from ml_collections import config_dict

from cfmjax.data import pipeline
from cfmjax.parallel import sharding
from cfmjax.run import schema

ON_NONFINITE = ("stop", "skip")  # train.on_nonfinite

# Not config keys: the vocabulary follows the data (experiment.Experiment.vocab_size) and the prompt
# flag follows flow.prompt (prompting.enabled); run.json records both (run_record.py).


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # What the run optimises (objectives.py): flow | ar (the autoregressive baseline, ar.py) — trained by
  # `cfmjax train` — or psd | lsd | esd (flow-map distillation) | fixed_point — by `cfmjax distill`.
  c.objective = "flow"
  c.init_from = ""  # distill: a base-flow workdir (or exported checkpoint) to start from
  c.init_step = config_dict.placeholder(int)  # its checkpoint step; unset (None): the latest

  c.data = pipeline.default_data_config()

  c.model = ml_collections.ConfigDict()
  c.model.d_model = 256
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.mlp_dim = 1024
  c.model.time_features = 256
  c.model.time_scale = 10.0  # τ scale inside the sinusoidal time features (see model.py)
  c.model.dtype = "float32"
  c.model.attention = "xla"
  c.model.scan_layers = True
  c.model.remat = "none"  # none | full | dots (save matmul outputs only); works with scan_layers
  # Where the flow's state lives (SPEC §4, state_space.py): vocab (x ∈ R^V, the reference) |
  # embedding (h = xW ∈ R^D) | auto (embedding when vocab_size > d_model).
  c.model.state_space = "auto"
  c.model.vocab_chunk = 0  # > 0: losses and ψW fuse the head matmul per chunk of this many tokens
  c.model.embedded_noise = "cholesky"  # cholesky (ξCᵀ, CCᵀ = WᵀW) | project (draw ε ∈ R^V, reference)
  c.model.self_condition = False  # feed the previous estimate μ̂ through a zero-init projection (SPEC §8)
  # Skip parametrisation (SPEC §9, model.py): logits = f_θ + the context-free posterior's evidence
  # term, so the network learns only the correction from context; the head starts at zero with its
  # bias at the data's log unigram law, so an untrained model is the context-free posterior. On
  # markov_tiny it took Euler@128 from 1.63× to 1.39× the floor in the same 1200 steps, and it is
  # what keeps the likelihood bound finite (results/recipe_ablation.md).
  c.model.skip = True
  c.model.gate_init = 0.0  # residual gates start here (0: adaLN-zero, blocks start off; model.py)
  c.model.head_init_scale = 0.0  # with model.skip: 0 starts the head at zero, > 0 random (model.py; measured
  # with gates 1 and local_mix 2: order 2 4.63 -> 4.56, both order-1 sources worse; results/recipe_ablation.md)
  # Posterior input (model.py): each position also reads its own context-free posterior through an
  # embedding table, so neighbours arrive without the √V-sized noise of xW. On an order-1 V=48
  # source it took Euler@128 from 1.76/2.05x to 1.32/1.37x the floor (seeds 0/1), elsewhere it
  # changed nothing measurable (results/recipe_ablation.md).
  c.model.posterior_input = True
  c.model.local_mix = 0  # > 0: depthwise convolution over ±local_mix positions in every block

  c.flow = ml_collections.ConfigDict()
  c.flow.schedule = "mixed"  # linear | argmax | mixed (SPEC §1)
  c.flow.adaptive_weighting = False  # detached weight (‖μ − x1‖² + c)^(−r) (SPEC §2)
  c.flow.weight_power = 0.5
  c.flow.weight_offset = 0.01
  # Share of training rows whose positions each get their own noise level (corruption.position_times).
  # Off: at 0.5 it did not teach an order-2 source its context (results/recipe_ablation.md, stop 23).
  c.flow.position_noise = 0.0
  # Prefix conditioning (SPEC §8, prompting.py): each training row gets a clean prompt prefix of
  # length U{min_len..max_len} (not noised, no loss), dropped (zeros, no flag) with prob drop_prob.
  c.flow.prompt = ml_collections.ConfigDict()
  c.flow.prompt.min_len = 0
  c.flow.prompt.max_len = 0  # 0: no prompts (unconditional model)
  c.flow.prompt.drop_prob = 0.1

  # Distillation (SPEC §3, §8); used by the objectives psd, lsd, esd and fixed_point.
  c.distill = ml_collections.ConfigDict()
  c.distill.mode = "two_stage"  # two_stage (from init_from) | joint (self-distillation from scratch)
  c.distill.diag_fraction = 0.25  # rows of each batch that keep training the diagonal (cross-entropy)
  c.distill.boundary_prob = 0.1  # probability of the pair (s, t) = (0, 1)
  c.distill.teacher = "ema"  # ema | student (stop-gradient copy of the live network)
  c.distill.gradient_surgery = False  # psd: project out consistency-gradient parts opposing the diagonal
  c.distill.adaptive_weighting = False  # detached weight with the teacher in place of x1
  c.distill.learned_weighting = "none"  # none | s | st: learnable log-weights w(s) or w(s, t)
  c.distill.min_ratio = 1e-3  # clamp inside the log of the LSD / ESD teachers
  c.distill.t_max = 0.99  # cap on t for LSD / ESD, whose identities degenerate at t = 1
  c.distill.gap_warmup_steps = 0  # > 0: gaps t − s grow from 5% to the full range over these steps
  # Guided distillation (SPEC §8, distill.guided_diagonal_loss): >= 0 makes the student's diagonal the base
  # model's guided denoiser μ_ω at this fixed ω (one student per ω); < 0: off.
  c.distill.guidance = -1.0
  # Fixed-point distillation (objective = "fixed_point", fixed_point.py): teacher iterations per
  # target (the target is T^k(student's own estimate); 1 = the bootstrapped k -> k+1 objective).
  c.distill.fixed_point_iters = 1

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.warmup_steps = 2500
  c.optim.decay = "constant"  # constant | cosine
  c.optim.final_lr_fraction = 0.0  # cosine only
  c.optim.clip_norm = 1.0
  c.optim.ema_decay = 0.9999

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 512  # global, over all processes
  # Split each global batch into this many microbatches run one after another (their gradients are
  # averaged): the same run in 1/k of the activation memory. batch_size / k must still divide over
  # the data-parallel shards.
  c.train.grad_accum_steps = 1
  c.train.profile_steps = ""  # "N,M": a jax.profiler trace of steps N..M in <workdir>/profile (--profile_steps)
  c.train.num_steps = 1_000_000
  c.train.log_every = 100
  c.train.eval_every = 1000  # held-out loss of the EMA parameters; 0 disables
  c.train.eval_batch_size = 64
  c.train.checkpoint_every = 5000
  c.train.keep_checkpoints = 3
  # A NaN/Inf loss or gradient (ON_NONFINITE): stop, naming the step and parameter group | skip the update.
  c.train.on_nonfinite = "stop"
  # Periodic diagnostics of the EMA parameters (diagnostics.py), logged to metrics.jsonl / TensorBoard:
  # denoiser_ce (held-out CE averaged over λ = log SNR bins in [-9, 9]) and, for a Markov source,
  # exact_ce, context_free_ce, denoiser_gap and the exact gen_nll_per_token / gen_entropy of samples.
  c.train.diagnostics_every = 0  # steps between diagnostics (and at the last step); 0 disables
  c.train.diagnostics_rows = 128  # held-out rows for the denoiser gap (each used in every bin)
  c.train.diagnostics_bins = 12  # λ bins of the denoiser gap
  c.train.diagnostics_samples = 256  # Markov: samples judged exactly; 0 = no sampling
  c.train.diagnostics_steps = 32  # their sampler's steps (Euler; flow map when distilling; AR: one per token)
  # Keep the state with the lowest value of this diagnostic in <workdir>/best/ (load it with
  # --checkpoint_step=best): denoiser_ce | denoiser_gap (Markov) | gen_nll_per_token (Markov); "" = off.
  c.train.best_metric = ""

  # Mesh sizes for (data, fsdp, tensor); one may be -1 (the rest of the devices).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = [list(r) for r in sharding.DEFAULT_RULES]

  c.sample = ml_collections.ConfigDict()
  c.sample.steps = 128
  c.sample.num_samples = 16
  c.sample.batch_size = 64
  c.sample.guidance = config_dict.placeholder(float)  # ω of classifier-free guidance; unset (None): none
  # Euler sampling of a self-conditioned model (model.self_condition) feeds the last estimate μ̂ back
  # in; a fixed-point-distilled student (fixed_point.py) answers for the limit in one pass and is
  # sampled with μ̂ = 0 (False). No effect on a model without self-conditioning.
  c.sample.feed_back_estimate = True
  c.sample.renoise = 0.0  # flow-map sampler: CTM-style renoising η in [0, 1]; 0 = deterministic
  # Euler / flow-map sampler state and affine updates: "float32" | "float64" (the network keeps its
  # own dtype; samplers.py). Overridden by `--sample_precision` on sample / eval.
  c.sample.precision = "float32"

  c.eval = ml_collections.ConfigDict()
  c.eval.steps = "128,16,4"
  c.eval.num_samples = 256
  c.eval.batch_size = 128
  return c


def from_saved(saved: dict) -> ml_collections.ConfigDict:
  """A workdir's config.json, brought to today's schema (schema.py), on top of today's defaults, so
  that workdirs written before a key existed still load (config.json records every key, so a
  missing key takes today's default only for workdirs older than the key itself)."""
  return with_sections(base_config(), schema.migrate_config(saved))


def with_sections(config: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
  """A copy of `config` with the nested `values` ({"model": {...}, "flow": {"schedule": ...}})
  written over it: how a saved config lands on today's defaults, and how a distillation run takes
  the sections of its base run (handoff.py, run_record.py)."""
  config = ml_collections.ConfigDict(config.to_dict())

  def merge(node, values):
    for key, value in values.items():
      if isinstance(value, dict) and key in node and isinstance(node[key], ml_collections.ConfigDict):
        merge(node[key], value)
      else:
        node[key] = value

  merge(config, values)
  return config


def override(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """Sets dotted keys ({"model.d_model": 64, ...}) in place, as `--config.model.d_model=64` would."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    if leaf not in node:  # as `--config.` would: a typo must not add a key nothing reads
      raise KeyError(f"unknown config key {key!r}; see cfmjax/run/configs.py base_config for the keys")
    node[leaf] = value
  return config


def from_file(path: str, *args):
  """Calls `get_config(*args)` of the config file at `path` (so one config can build on another)."""
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def as_distillation(c: ml_collections.ConfigDict, loss: str, *, num_steps: int, lr: float,
                    warmup_steps: int, ema_decay: float, gap_warmup_steps: int,
                    boundary_prob: float = 0.1) -> ml_collections.ConfigDict:
  """Turns a base-flow config into the two-stage distillation config that starts from its run.

  The model, data and schedule are taken from the base workdir at run time (`handoff.py`); what is
  set here is the distillation itself and a fresh optimizer (distill.gradient_surgery off: a config
  that wants it sets it after this call).
  """
  c.objective = loss
  c.init_from = ""  # set on the command line: --config.init_from=<base workdir>
  c.distill.mode = "two_stage"
  c.distill.diag_fraction = 0.25
  c.distill.boundary_prob = boundary_prob
  c.distill.teacher = "ema"
  c.distill.gradient_surgery = False
  # Short jumps first: at the start the network's long-jump outputs are untrained extrapolations of
  # the diagonal, and teachers built from them (LSD, ESD especially) are noise. On markov_tiny this
  # turned LSD from worse-than-Euler into better-than-Euler at 2 and 4 steps.
  c.distill.gap_warmup_steps = gap_warmup_steps
  c.optim.lr = lr
  c.optim.warmup_steps = warmup_steps
  c.optim.decay = "constant"
  c.optim.ema_decay = ema_decay
  c.train.num_steps = num_steps
  c.train.eval_every = 0  # the held-out diagonal loss says little about the flow map
  c.eval.steps = "1,2,4,8"
  return c
