"""Measuring instruments for the base flow's denoiser (SPEC §5, §6, §9): shared by `cfmjax eval` and training.

Denoiser gap. Held-out cross-entropy −log μθ(x_γ, γ)[x1] of the model's denoiser (EMA parameters, one
pass through the experiment's StateSpace, so vocab and embedding space both work; a self-conditioned
model is called with μ̂ = 0, a prompt-trained one without prompt), averaged over positions and rows,
per bin of λ = log SNR = 2 log(γ/(1 − γ)). Bins are equal-width over a fixed λ range (default
[−9, 9], γ ≈ 0.011 .. 0.989) and each row draws its λ uniformly inside the bin (stratified over the
rows), so the mean over bins is the CE averaged uniformly in λ: a number that does not move when the
τ schedule or the τ-sampling of training changes. For a Markov source the same rows and the same V-space
states x_γ also give
  exact_ce         the exact posterior's CE (forward-backward, float64: the floor any denoiser can reach),
  context_free_ce  the CE of log π + γx/(1 − γ)² (a denoiser that ignores the other positions).
A V-space model is fed exactly those x_γ; an embedding-space model draws h_γ = x_γW itself from the
same seeds (the same law, not the same draw). Everything is a function of (rows, num_bins, seed).

Exact reference sampler. `exact_euler_sample` runs the Euler sampler of samplers.py with the exact
Markov posterior in place of the network: what the sampler reaches with a perfect denoiser (SPEC §9).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cfmjax import objectives
from cfmjax.flow import corruption, oracles, schedules, scores
from cfmjax.models import state_space
from cfmjax.parallel import sharding
from cfmjax.run import inference
from cfmjax.sampling import samplers

LAMBDA_RANGE = (-9.0, 9.0)
DEFAULT_BINS = 12


class GapSettings(NamedTuple):
  """How the denoiser gap is measured: equal bins over a λ range, the seed of the λ draws and noise,
  and rows per network call."""
  num_bins: int = DEFAULT_BINS
  lambda_range: tuple = LAMBDA_RANGE
  seed: int = 0
  batch_size: int = 64


# ----------------------------------------------------------------------------------------------
# The exact Markov posterior as a traceable logits function.


def exact_logits_fn(posterior: oracles.MarkovPosterior):
  """(x [B, L, V], γ [B]) -> float32 log E[x1 | x_γ = x], traceable (jit, scan).

  Computed in float64: call (and trace) it inside `jax.enable_x64(True)`, or it runs in float32.
  The output is float32 so that it slots into the samplers' float32 state.
  """
  vocab, order = posterior.vocab_size, posterior.order

  def logits(x, gamma):
    probs = oracles._markov_forward_backward(  # noqa: SLF001 (the jitted kernel of MarkovPosterior)
        x.astype(jnp.float64), gamma.astype(jnp.float64), jnp.asarray(posterior.transition, jnp.float64),
        jnp.asarray(posterior.initial, jnp.float64), vocab, order)
    return jnp.log(jnp.maximum(probs, 1e-30)).astype(jnp.float32)

  return logits


def exact_euler_sample(posterior: oracles.MarkovPosterior, schedule, steps: int, num_samples: int,
                       length: int, batch_size: int, seed: int) -> np.ndarray:
  """Euler samples (SPEC §2, same τ grid and schedule as the model's sampler) of the exact denoiser.

  int32 [num_samples, length]; batch i draws its prior from key(seed + i) as `inference.generate` does.
  """
  batch_size = max(1, min(batch_size, num_samples))
  with jax.enable_x64(True):
    logits = exact_logits_fn(posterior)
    denoise = lambda x, tau: logits(x, schedule.gamma(tau))
    shape = (batch_size, length, posterior.vocab_size)
    fn = jax.jit(lambda rng: samplers.euler_sample(denoise, rng, shape, schedule, steps)[0])
    out = [np.asarray(fn(jax.random.key(seed + i))) for i in range(0, num_samples, batch_size)]
  return np.concatenate(out)[:num_samples].astype(np.int32)


# ----------------------------------------------------------------------------------------------
# The denoiser gap.


@functools.partial(jax.jit, static_argnums=3)
def _noisy(rng, tokens, gamma, vocab: int):
  return corruption.noisy_state(rng, tokens, gamma, vocab)


def _oracle_ce(posterior: oracles.MarkovPosterior, x, gamma, tokens):
  """(exact CE, context-free CE) per row [B], each averaged over positions, in float64."""
  with jax.enable_x64(True):
    x = jnp.asarray(x, jnp.float64)
    gamma = jnp.asarray(gamma, jnp.float64)
    tokens = jnp.asarray(tokens)
    probs = oracles._markov_forward_backward(  # noqa: SLF001
        x, gamma, jnp.asarray(posterior.transition), jnp.asarray(posterior.initial), posterior.vocab_size,
        posterior.order)
    picked = jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]
    exact = -jnp.mean(jnp.log(jnp.maximum(picked, 1e-300)), axis=-1)
    log_pi = jnp.log(jnp.maximum(jnp.asarray(posterior.unigram(), jnp.float64), 1e-300))
    cf = jax.nn.log_softmax(log_pi + oracles.emission_logits(x, gamma), axis=-1)
    context_free = -jnp.mean(jnp.take_along_axis(cf, tokens[..., None], axis=-1)[..., 0], axis=-1)
    return np.asarray(exact), np.asarray(context_free)


def gap_per_bin(model_ce, rows, vocab_size: int, *, settings: GapSettings = GapSettings(), posterior=None,
                needs_x: bool = True, tau_of_gamma=None) -> dict:
  """The denoiser-gap record for any `model_ce(tokens, gamma, x, rng) -> per-row CE [B]` (numpy).

  `tokens` [B, L] int32, `gamma` [B] float32, `x` the V-space x_γ [B, L, V] (None when `needs_x` is
  False and no `posterior` asks for it: an embedding-space model draws its own state from `rng`).
  `posterior` (oracles.MarkovPosterior) adds exact_ce and context_free_ce. `tau_of_gamma` (the
  schedule's τ) only labels the bins. Every row is used in every bin; the last batch is padded.
  """
  rows = np.asarray(rows, np.int32)
  num_rows = len(rows)
  num_bins, lambda_range, seed, batch_size = settings
  if num_rows == 0 or num_bins < 1:
    raise ValueError(f"the denoiser gap needs rows and bins, got {num_rows} rows and {num_bins} bins")
  lo, hi = float(lambda_range[0]), float(lambda_range[1])
  if not hi > lo:
    raise ValueError(f"lambda_range must be increasing, got {lambda_range}")
  edges = np.linspace(lo, hi, num_bins + 1)
  batch_size = max(1, batch_size)
  draw_x = needs_x or posterior is not None
  key = jax.random.key(seed)
  bins = []
  for b in range(num_bins):
    # Stratified λ inside the bin: one draw per stratum of rows, strata shuffled over the rows.
    rng = np.random.default_rng([seed, b])
    u = (rng.permutation(num_rows) + rng.random(num_rows)) / num_rows
    gammas = schedules.gamma_of_log_snr(edges[b] + (edges[b + 1] - edges[b]) * u).astype(np.float32)
    model, exact, context_free = [], [], []
    for c, start in enumerate(range(0, num_rows, batch_size)):
      tokens = rows[start:start + batch_size]
      gamma = gammas[start:start + batch_size]
      n = len(tokens)
      if n < batch_size:  # pad with copies of the first row so every call has one shape
        tokens = np.concatenate([tokens, np.repeat(tokens[:1], batch_size - n, axis=0)])
        gamma = np.concatenate([gamma, np.repeat(gamma[:1], batch_size - n)])
      chunk_key = jax.random.fold_in(jax.random.fold_in(key, b), c)
      x = np.asarray(_noisy(chunk_key, jnp.asarray(tokens), jnp.asarray(gamma), vocab_size)) if draw_x else None
      model.append(np.asarray(model_ce(tokens, gamma, x if needs_x else None, chunk_key))[:n])
      if posterior is not None:
        e, f = _oracle_ce(posterior, x, gamma, tokens)
        exact.append(e[:n])
        context_free.append(f[:n])
    model = np.concatenate(model).astype(np.float64)
    mid = 0.5 * (edges[b] + edges[b + 1])
    entry = {"lambda_lo": float(edges[b]), "lambda_hi": float(edges[b + 1]), "lambda_mid": float(mid),
             "gamma_mid": float(schedules.gamma_of_log_snr(mid)),
             "denoiser_ce": float(np.mean(model)),
             "denoiser_ce_stderr": float(np.std(model, ddof=1) / math.sqrt(num_rows)) if num_rows > 1 else None}
    if tau_of_gamma is not None:
      entry["tau_mid"] = float(tau_of_gamma(np.float32(schedules.gamma_of_log_snr(mid))))
    if posterior is not None:
      exact = np.concatenate(exact)
      entry["exact_ce"] = float(np.mean(exact))
      entry["context_free_ce"] = float(np.mean(np.concatenate(context_free)))
      entry["gap"] = entry["denoiser_ce"] - entry["exact_ce"]
      # the paired difference (same rows, same states in V-space) has far less noise than either CE
      entry["gap_stderr"] = float(np.std(model - exact, ddof=1) / math.sqrt(num_rows)) if num_rows > 1 else None
    bins.append(entry)
  record = {"lambda_range": [lo, hi], "num_bins": num_bins, "num_rows": num_rows,
            "seq_len": int(rows.shape[1]), "seed": seed, "vocab_size": vocab_size,
            "log_vocab": math.log(vocab_size), "bins": bins,
            "denoiser_ce": float(np.mean([e["denoiser_ce"] for e in bins]))}
  if posterior is not None:
    record["exact_ce"] = float(np.mean([e["exact_ce"] for e in bins]))
    record["context_free_ce"] = float(np.mean([e["context_free_ce"] for e in bins]))
    record["gap"] = record["denoiser_ce"] - record["exact_ce"]
  return record


def space_ce(space: state_space.StateSpace, schedule):
  """(params, tokens [B, L], γ [B], rng, x [B, L, V] or None) -> per-row CE [B] of the denoiser on the
  diagonal τ_s = τ_t = τ(γ). In V-space the state is the given x; in embedding space it is drawn from rng."""

  def ce(params, tokens, gamma, rng, x):
    tau = schedule.tau(gamma)
    state = space.noisy_state(params, rng, tokens, gamma) if space.embedded else x
    stats = space.output_stats(params, state, tau, tau, tokens=tokens)
    return jnp.mean(state_space.cross_entropy(stats), axis=-1)

  return ce


def model_ce_fn(exp, params_sharding=None):
  """(bind, needs_x): bind(params) is the `model_ce(tokens, gamma, x, rng)` of `gap_per_bin` for the
  experiment's network, compiled once; needs_x says whether it consumes the V-space x_γ."""
  space = state_space.from_config(exp.apply_fn, exp.vocab_size, exp.config)
  ce = space_ce(space, exp.schedule)
  x_sharding = None if space.embedded else exp.batch_sharding
  fn = jax.jit(ce, in_shardings=(params_sharding or exp.state_shardings["ema_params"], exp.batch_sharding,
                                 None, None, x_sharding))

  def to_global(a):
    return sharding.global_rows(np.asarray(a), exp.batch_sharding)

  def bind(params):
    def model_ce(tokens, gamma, x, rng):
      with exp.activate():
        return np.asarray(sharding.to_host(fn(params, to_global(tokens), jnp.asarray(gamma), rng,
                                              None if x is None else to_global(x))))
    return model_ce

  return bind, not space.embedded


def denoiser_gap(exp, params, rows, num_bins: int = DEFAULT_BINS, seed: int = 0, lambda_range=LAMBDA_RANGE,
                 batch_size: int = 64, _bound=None) -> dict:
  """Held-out CE of the experiment's denoiser per λ bin (see the module docstring), plus the exact and
  context-free posteriors' CE for a Markov source. `params`: the EMA parameters. `_bound`: a
  (bind, needs_x) pair from `model_ce_fn`, to reuse its compiled function across calls."""
  if exp.model_config.causal:
    raise ValueError("the denoiser gap applies to flows; this workdir holds an autoregressive model")
  bind, needs_x = _bound or model_ce_fn(exp)
  dp = sharding.data_parallel_size(exp.mesh, exp.rules)
  batch_size = max(dp, min(batch_size, -(-len(rows) // dp) * dp) // dp * dp)
  posterior = oracles.MarkovPosterior.from_source(exp.data.markov) if exp.data.markov is not None else None
  settings = GapSettings(num_bins, lambda_range, seed, batch_size)
  record = gap_per_bin(bind(params), rows, exp.vocab_size, settings=settings, posterior=posterior, needs_x=needs_x,
                       tau_of_gamma=lambda g: np.asarray(exp.schedule.tau(jnp.asarray(g))))
  record["state_space"] = "vocab" if needs_x else "embedding"
  return record


# ----------------------------------------------------------------------------------------------
# Periodic evaluation during training (train.diagnostics_every).


def training_diagnostics(exp):
  """A function ema_params -> {metric: float} for train.py's metrics writer, compiled once.

  Flows: the denoiser gap's means over λ bins (denoiser_ce; for a Markov source also exact_ce,
  context_free_ce and denoiser_gap = denoiser_ce − exact_ce), on train.diagnostics_rows held-out rows,
  train.diagnostics_bins bins, seed 0. Markov sources: also gen_nll_per_token (exact judge) and
  gen_entropy of train.diagnostics_samples samples at train.diagnostics_steps steps (0: no samples),
  fixed seed, with the objective's sampler (Euler for a base flow and a fixed-point student, the flow
  map for a distilled one, ancestral sampling for the autoregressive baseline, which gets no denoiser
  gap), plus the floor data_nll_per_token.
  """
  cfg = exp.config.train
  bound = None if exp.model_config.causal else model_ce_fn(exp)
  rows = exp.data.eval_rows(cfg.diagnostics_rows) if bound is not None else None
  markov = exp.data.markov
  generator = None
  num_samples, steps = int(cfg.diagnostics_samples), int(cfg.diagnostics_steps)
  if markov is not None and num_samples > 0 and steps > 0:
    sampler = objectives.get(exp.config).sampler
    batch = inference._padded_batch_size(exp, exp.config.eval.batch_size, num_samples)  # noqa: SLF001
    generator = (inference.make_generator(exp, inference.Sampling(sampler, steps, batch)), batch)

  def diagnose(params) -> dict:
    out = {}
    if bound is not None:
      gap = denoiser_gap(exp, params, rows, num_bins=cfg.diagnostics_bins, seed=0,
                         batch_size=exp.config.eval.batch_size, _bound=bound)
      out["denoiser_ce"] = gap["denoiser_ce"]
      if "exact_ce" in gap:
        out.update(exact_ce=gap["exact_ce"], context_free_ce=gap["context_free_ce"], denoiser_gap=gap["gap"])
    if generator is not None:
      fn, batch = generator
      with exp.activate():
        tokens = np.concatenate([np.asarray(sharding.to_host(fn(params, jax.random.key(i))))
                                 for i in range(0, num_samples, batch)])[:num_samples]
      out.update(gen_nll_per_token=scores.exact_markov_nll(markov, tokens),
                 gen_entropy=scores.unigram_entropy(tokens),
                 data_nll_per_token=markov.expected_nll_per_token(tokens.shape[1]))
    return out

  return diagnose


# ----------------------------------------------------------------------------------------------
# Output.


def plot_gap(record: dict, path: str, title: str | None = None) -> str:
  """Left: CE per λ bin of the model and, for a Markov source, of the exact and context-free posteriors,
  with log V. Right (Markov): the excess over the exact posterior (model − exact, context-free − exact)."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  bins = record["bins"]
  lam = [e["lambda_mid"] for e in bins]
  markov = "exact_ce" in record
  fig, axes = plt.subplots(1, 2 if markov else 1, figsize=(11.5 if markov else 6.5, 4.2), squeeze=False)
  ax = axes[0][0]
  err = [e.get("denoiser_ce_stderr") or 0.0 for e in bins]
  ax.errorbar(lam, [e["denoiser_ce"] for e in bins], yerr=err, marker="o",
              label=f"model (mean {record['denoiser_ce']:.4f})")
  if markov:
    ax.plot(lam, [e["exact_ce"] for e in bins], marker="s", label=f"exact posterior (mean {record['exact_ce']:.4f})")
    ax.plot(lam, [e["context_free_ce"] for e in bins], marker="^", linestyle="--",
            label=f"context-free posterior (mean {record['context_free_ce']:.4f})")
    excess = axes[0][1]
    excess.errorbar(lam, [e["gap"] for e in bins], yerr=[e.get("gap_stderr") or 0.0 for e in bins], marker="o",
                    label=f"model − exact (mean {record['gap']:.4f})")
    excess.plot(lam, [e["context_free_ce"] - e["exact_ce"] for e in bins], marker="^", linestyle="--", color="C2",
                label=f"context-free − exact (mean {record['context_free_ce'] - record['exact_ce']:.4f})")
    excess.axhline(0.0, color="grey", linewidth=0.8)
    excess.set_ylabel("CE above the exact posterior (nats/token)")
  ax.axhline(record["log_vocab"], color="grey", linestyle=":", label=f"log V = {record['log_vocab']:.3f}")
  ax.set_ylabel("held-out cross-entropy (nats/token)")
  for a in axes[0]:
    a.set_xlabel("λ = log SNR = 2 log(γ/(1 − γ))")
    a.grid(True, alpha=0.3)
    a.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def gap_table(record: dict) -> str:
  """A Markdown table of the per-bin CE."""
  cols = ["lambda_mid", "gamma_mid", "tau_mid", "denoiser_ce", "denoiser_ce_stderr", "exact_ce",
          "context_free_ce", "gap", "gap_stderr"]
  cols = [c for c in cols if c in record["bins"][0]]
  fmt = lambda v: "-" if v is None else f"{v:.4f}"
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(fmt(e.get(c)) for c in cols) + " |" for e in record["bins"]]
  means = [f"{k} {record[k]:.4f}" for k in ("denoiser_ce", "exact_ce", "context_free_ce", "gap") if k in record]
  return "\n".join(lines) + "\n\nmean over bins: " + ", ".join(means)
