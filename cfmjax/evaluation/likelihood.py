"""A variational bound on the NLL of held-out sequences (SPEC §5, §9), for perplexity bounds.

With λ = log SNR = 2 log(γ/(1−γ)) (so γ = sigmoid(λ/2)), per sequence of L positions:

  NLL(x1) ≤ L γ0²/(2(1−γ0)²)                                   prior at γ0 = γ(λ0)
          + ½ ∫_{λ0}^{λ1} e^λ E_ε ‖x1 − μθ(x_γ(λ), γ(λ))‖² dλ     diffusion (Brier score, summed over L)
          − Σ_positions log μθ(x_{γ1}, γ1)[x1]                   reconstruction at γ1 = γ(λ1)

Any λ1 gives a valid bound; the reconstruction term covers the rest (SPEC §9).

Embedding space (`embedded_denoiser_terms`, `whitened_brier`). When the network only sees h = xW
(W: V × D, V > D), the V-space diffusion term above is not tight even for the best denoiser given h:
h loses information about x, and e^λ times the irreducible Brier error diverges. The bound then is the
ELBO of the diffusion of h itself. With Σ = WᵀW = CCᵀ (`model.whitened_embedding`, the factor the
noise is drawn with) and Ŵ = WC⁻ᵀ, the whitened state ĥ = C⁻¹h = γ Ŵ_{x1} + (1−γ) ξ, ξ ~ N(0, I_D),
is an ordinary Gaussian diffusion of the point Ŵ_{x1}, so (sums over positions)

  NLL(x1) ≤ γ0² ‖Ŵ_{x1}‖²/(2(1−γ0)²)                               prior (leverage of x1, ≤ 1 each)
          + ½ ∫_{λ0}^{λ1} e^λ E ‖(e_{x1} − μθ)Ŵ‖² dλ                 diffusion, whitened Brier
          − log μθ(h_{γ1}, γ1)[x1]                                   reconstruction

with ‖(e_{x1} − μ)Ŵ‖² = ‖C⁻¹(W_{x1} − μW)ᵀ‖² (μW: the softmax-weighted embedding). It is tight in
expectation when μθ is the exact posterior given h, and with D = V, W invertible (ŴŴᵀ = I) it is the
V-space bound. The V-space bound is the case Ŵ = I: prior L e^λ0/2, Brier ‖e_{x1} − μ‖².

The integral. λ is drawn from a proposal q that is piecewise constant on bins (edges, masses), by
stratifying its CDF: point k of N has u_k = (k + U)/N, λ_k = Q⁻¹(u_k), and contributes
f(λ_k)/(N q(λ_k)) with f = ½ e^λ Brier; the sum is unbiased for ∫ f (E = ∫₀¹ f(Q⁻¹(u))/q(Q⁻¹(u)) du).
One noise draw per point; every sequence draws its own points, so the per-sequence estimates are
independent and the standard error comes from them (`summarize`). A single bin is the plain
stratified uniform estimator (N equal strata, weight = the stratum width).

Choosing λ1 and q (`select_endpoint`, `bound_with_selection`). e^λ Brier is heavy-tailed at high λ,
and a denoiser that is poor near the clean end makes the integral explode there, so the endpoint and
the proposal are fitted, on a *selection* split of held-out rows only, by a pilot pass:
  - the pilot covers [λ0, max candidate] with `pilot_width`-wide strata, one uniform point per stratum
    and row, and evaluates the reconstruction term at every candidate λ1 (which lie on the strata's
    edges), so the bound at each candidate is prior + Σ strata below it + reconstruction there;
  - λ1 is the candidate with the smallest mean bound on the selection rows;
  - q on [λ0, λ1] is proportional, per pilot stratum, to the root mean square of f over the
    selection rows (the variance-minimising density for an importance sampler of a random
    integrand), mixed with the uniform density (weight `defensive`) so that q > 0 everywhere.
The reported bound is then estimated on a disjoint *report* split at that fixed λ1 with that q: as λ1
and q do not depend on the report rows, it is an unbiased estimate of a valid bound on them.

Conditional bounds (`split_rows`, `state_space_terms`). The rows of a bound are tokens [B, L], or a
pair (tokens, scored [B, L]) with scored 1 at the positions bounded and 0 at clean context: the
network then sees the context positions clean (a prompt-trained model also gets their prompt flag),
and the prior, diffusion and reconstruction terms sum over the scored positions only. Any denoiser
that is given the context gives a valid bound on −log p(scored tokens | context), since only the
scored positions are diffused; it is tight when the denoiser is the exact posterior given the context
(tests/test_likelihood.py checks it against a Markov chain's exact conditional NLL).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cfmjax.flow import corruption, schedules
from cfmjax.models import model as model_lib, state_space
from cfmjax.objectives import losses

LAMBDA_MIN = -12.0  # λ0: the prior term there is L e^λ0 / 2 ≈ 3e-6 L nats
# λ1 candidates (log SNR -4 .. 12): a model that is poor near the clean end does best stopping early.
CANDIDATES = tuple(float(c) for c in range(-4, 13))
PILOT_WIDTH = 0.25  # pilot strata width in λ (96 strata over [-12, 12])
DEFENSIVE = 0.1  # weight of the uniform density in the proposal mixture


class BoundSettings(NamedTuple):
  """How a bound is estimated: the pilot that picks λ1 and the proposal (`select_endpoint`), the
  points of the reported integral (`bound_terms`), and how much goes through the network per call."""
  num_points: int = 128  # λ points per row in the reported integral
  lambda_min: float = LAMBDA_MIN  # λ0
  candidates: tuple = CANDIDATES  # λ1 candidates, on the pilot grid λ0 + k·width
  width: float = PILOT_WIDTH  # pilot strata width in λ
  defensive: float = DEFENSIVE  # weight of the uniform density in the fitted proposal
  points_per_call: int = 16  # λ points per row in one network call
  batch_size: int = 64  # rows per network call


class Terms(NamedTuple):
  """A network's bound terms: `terms_fn(params, rows, gamma, rng) -> (Brier [R], CE [R])` (sums over
  the bounded positions) and `prior_fn(params, rows) -> [R]` (Σ ‖clean point‖²; None: V-space, 1 per
  position)."""
  terms_fn: Callable
  prior_fn: Callable | None = None


def prior_term(length: int, lambda_min: float) -> float:
  """L γ0²/(2(1−γ0)²) = L e^λ0 / 2 (γ0/(1−γ0) = e^(λ0/2))."""
  return 0.5 * length * float(np.exp(lambda_min))


def whitened_brier(chol, target_embedding, mean_embedding):
  """‖C⁻¹(W_{x1} − μW)ᵀ‖² per position [...]: the Brier score of the whitened clean point (float32).

  `chol` [D, D] lower-triangular, CCᵀ = WᵀW; target_embedding = W[x1], mean_embedding = μW, [..., D].
  """
  diff = (target_embedding.astype(jnp.float32) - mean_embedding.astype(jnp.float32))
  d = diff.shape[-1]
  white = jax.scipy.linalg.solve_triangular(chol.astype(jnp.float32), diff.reshape(-1, d).T, lower=True)
  return jnp.sum(jnp.square(white), axis=0).reshape(diff.shape[:-1])


def embedding_prior_norms(leverage, tokens):
  """Σ_positions ‖Ŵ_{x1}‖² [B] (leverage [V] from `model.whitened_embedding`): the prior term is
  e^λ0/2 times this (L for the one-hot points of V-space)."""
  return jnp.sum(jnp.take(leverage.astype(jnp.float32), tokens, axis=0), axis=-1)


def uniform_proposal(lambda_min: float, lambda_max: float):
  """(edges [2], masses [1]): the uniform density on [λ0, λ1]."""
  return np.asarray([lambda_min, lambda_max], np.float64), np.ones(1, np.float64)


def fitted_proposal(edges, scale, defensive: float = DEFENSIVE):
  """(edges, masses) of the density ∝ `scale` per bin (a density, not a mass), mixed with uniform.

  masses_j = (1 − α) scale_j w_j / Σ scale w + α w_j / Σ w, w_j the bin widths; all-zero `scale` gives
  the uniform density.
  """
  edges = np.asarray(edges, np.float64)
  widths = np.diff(edges)
  mass = np.maximum(np.asarray(scale, np.float64), 0.0) * widths
  uniform = widths / widths.sum()
  if not np.isfinite(mass).all() or mass.sum() <= 0:
    return edges, uniform
  return edges, (1.0 - defensive) * mass / mass.sum() + defensive * uniform


def proposal_points(rng, batch: int, num_points: int, edges, masses):
  """λ [B, N] drawn from the piecewise-constant proposal, stratified in its CDF (one point per 1/N
  of probability, its own uniform offset per row), and the importance weights 1/(N q(λ)) [B, N]."""
  edges = jnp.asarray(edges, jnp.float32)
  masses = jnp.asarray(masses, jnp.float32)
  masses = masses / jnp.sum(masses)
  cdf = jnp.concatenate([jnp.zeros(1), jnp.cumsum(masses)])
  u = (jnp.arange(num_points)[None, :] + jax.random.uniform(rng, (batch, num_points))) / num_points
  j = jnp.clip(jnp.searchsorted(cdf, u, side="right") - 1, 0, len(masses) - 1)
  widths = edges[1:] - edges[:-1]
  frac = jnp.clip((u - cdf[j]) / jnp.maximum(masses[j], 1e-30), 0.0, 1.0)
  lam = edges[j] + frac * widths[j]
  weight = widths[j] / (num_points * masses[j])  # 1/(N q), q = mass / width on bin j
  return lam, weight


def split_rows(rows):
  """(tokens [B, L], scored [B, L] float32 or None) of a bound's rows: plain tokens (every position
  bounded), or (tokens, scored), scored 1 where bounded and 0 at clean context."""
  if isinstance(rows, (tuple, list)):
    tokens, scored = rows
    return tokens, scored.astype(jnp.float32)
  return rows, None


def num_rows(rows) -> int:
  return jax.tree.leaves(rows)[0].shape[0]


def state_space_terms(space: state_space.StateSpace, schedule, bound_space: str = "vocab") -> Terms:
  """The `Terms` of a
  network seen through its state space (V-space x_γ or h_γ = x_γW; `output_stats`), summed over the
  scored positions of the rows (`split_rows`). `bound_space` "embedding": the whitened Brier and the
  tokens' leverages of the h-diffusion's ELBO; "vocab": ‖e_x1 − μ‖² and ‖e_x1‖² = 1."""
  embedded_bound = bound_space == "embedding"

  def terms(params, rows, gamma, rng):
    tokens, scored = split_rows(rows)
    tau = schedule.tau(gamma)
    state = space.noisy_state(params, rng, tokens, gamma)
    conditioning = {}
    if scored is not None:  # the context, clean: the readout's prompt clamp (StateSpace.readout)
      context = scored == 0
      state = jnp.where(context[..., None], space.clean_state(params, tokens).astype(state.dtype), state)
      if space.prompt_flag:
        conditioning["prompt_mask"] = context
    w = model_lib.embedding_matrix(params) if embedded_bound else None
    stats = space.output_stats(params, state, tau, tau, tokens=tokens, embedding=w, **conditioning)
    if embedded_bound:
      w = w.astype(jnp.float32)
      chol, _ = model_lib.whitened_embedding(w)
      brier = whitened_brier(chol, jnp.take(w, tokens, axis=0), stats["mean_embedding"])
    else:
      brier = state_space.brier_score(stats)
    ce = state_space.cross_entropy(stats)
    if scored is not None:
      brier, ce = brier * scored, ce * scored
    return jnp.sum(brier, axis=-1), jnp.sum(ce, axis=-1)

  def prior(params, rows):
    tokens, scored = split_rows(rows)
    if embedded_bound:
      _, leverage = model_lib.whitened_embedding(model_lib.embedding_matrix(params))
      norms = jnp.take(leverage.astype(jnp.float32), tokens, axis=0)
    else:
      norms = jnp.ones(tokens.shape, jnp.float32)
    return jnp.sum(norms if scored is None else norms * scored, axis=-1)

  return Terms(terms, prior)


def point_terms(terms_fn, tokens, rng, lam, points_per_call: int):
  """(Brier [B, N], CE [B, N]) of one noise draw of each row at each λ [B, N] (sums over positions).

  `terms_fn(tokens [R, L], gamma [R], rng) -> (brier [R], ce [R])`; it is called with
  R = B × `points_per_call` rows at a time inside a `lax.scan` (N is padded to a multiple).
  """
  batch, num_points = lam.shape
  per_call = max(1, min(points_per_call, num_points))
  num_calls = -(-num_points // per_call)
  pad = num_calls * per_call - num_points
  if pad:
    lam = jnp.concatenate([lam, jnp.repeat(lam[:, -1:], pad, axis=1)], axis=1)
  rows = jax.tree.map(lambda a: jnp.repeat(a, per_call, axis=0), tokens)

  def chunk(_, index):
    lam_c = jax.lax.dynamic_slice_in_dim(lam, index * per_call, per_call, axis=1)
    brier, ce = terms_fn(rows, schedules.gamma_of_log_snr(lam_c).reshape(-1), jax.random.fold_in(rng, index))
    return None, (brier.reshape(batch, per_call), ce.reshape(batch, per_call))

  _, (brier, ce) = jax.lax.scan(chunk, None, jnp.arange(num_calls))
  unstack = lambda a: jnp.moveaxis(a, 0, 1).reshape(batch, -1)[:, :num_points]
  return unstack(brier), unstack(ce)


def _prior(prior_fn, tokens, lambda_min: float):
  """The prior term per row [B]: e^λ0/2 × `prior_fn(tokens)` (Σ ‖clean point‖²; None: L, V-space)."""
  if prior_fn is None:
    if not hasattr(tokens, "shape"):
      raise ValueError("conditional rows (tokens, scored) need a prior_fn (state_space_terms gives one)")
    batch, length = tokens.shape
    return jnp.full((batch,), prior_term(length, lambda_min), jnp.float32)
  return 0.5 * float(np.exp(lambda_min)) * prior_fn(tokens).astype(jnp.float32)


def bound_terms(terms_fn, tokens, rng, *, lambda_max: float, proposal=None, settings: BoundSettings = BoundSettings(),
                prior_fn=None):
  """One estimate of the bound per sequence, (total [B], parts dict of [B]: prior, diffusion,
  reconstruction), with `settings.num_points` λ points on [λ0 = settings.lambda_min, λ1 = `lambda_max`].
  `proposal` = (edges, masses) on [λ0, λ1]; None: uniform (plain stratified).
  `prior_fn(tokens) -> [B]`: Σ_positions ‖clean point‖² (embedding space: the leverages of the tokens,
  `embedding_prior_norms`); None: L (V-space)."""
  batch, lambda_min = num_rows(tokens), settings.lambda_min
  edges, masses = proposal if proposal is not None else uniform_proposal(lambda_min, lambda_max)
  rng_lam, rng_points, rng_recon = jax.random.split(rng, 3)
  lam, weight = proposal_points(rng_lam, batch, settings.num_points, edges, masses)
  brier, _ = point_terms(terms_fn, tokens, rng_points, lam, settings.points_per_call)
  diffusion = jnp.sum(0.5 * jnp.exp(lam) * brier * weight, axis=1)
  _, reconstruction = terms_fn(tokens, jnp.full((batch,), schedules.gamma_of_log_snr(jnp.float32(lambda_max))), rng_recon)
  prior = _prior(prior_fn, tokens, lambda_min)
  return prior + diffusion + reconstruction, {"prior": prior, "diffusion": diffusion,
                                               "reconstruction": reconstruction}


def denoiser_terms(denoise_fn, vocab_size: int):
  """The V-space `terms_fn(params, tokens, gamma, rng)` of a plain `denoise_fn(x, gamma) -> logits`
  (exact oracles, tests; params is ignored)."""

  def terms(_, tokens, gamma, rng):
    x = corruption.noisy_state(rng, tokens, gamma, vocab_size)
    logits = denoise_fn(x, gamma).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    return (jnp.sum(losses.brier_score(probs, tokens), axis=-1),
            jnp.sum(losses.cross_entropy(logits, tokens), axis=-1))

  return terms


def embedded_denoiser_terms(denoise_fn, w, noise: str = "cholesky"):
  """The embedding-space `terms_fn(params, tokens, gamma, rng)` of a plain `denoise_fn(h, gamma) ->
  logits` that sees only h_γ = x_γW (W [V, D], fixed; params is ignored): (whitened Brier [R], CE [R]),
  h drawn as the network's state is (`state_space.draw_noise`). Pair it with
  `prior_fn=embedded_prior_fn(w)` (`sequence_bounds`, `bound_with_selection`)."""
  w = jnp.asarray(w, jnp.float32)
  chol, _ = model_lib.whitened_embedding(w)

  def terms(_, tokens, gamma, rng):
    n, _ = state_space.draw_noise(rng, tokens.shape, w, mode=noise)
    h = state_space.interpolate_embedded(n, w, tokens, gamma)
    logits = denoise_fn(h, gamma).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    brier = whitened_brier(chol, model_lib.gather_rows(w, tokens), state_space.embed_probs(probs, w))
    return jnp.sum(brier, axis=-1), jnp.sum(losses.cross_entropy(logits, tokens), axis=-1)

  return terms


def embedded_prior_fn(w):
  """`prior_fn(params, tokens)` of a fixed embedding W (params ignored): Σ_positions leverage of x1."""
  _, leverage = model_lib.whitened_embedding(jnp.asarray(w, jnp.float32))
  return lambda _, tokens: embedding_prior_norms(leverage, tokens)


def sequence_bounds(denoise_fn, tokens, rng, vocab_size: int, *, lambda_max: float = 12.0, proposal=None,
                    embedding=None, settings: BoundSettings = BoundSettings()):
  """`bound_terms` for a V-space `denoise_fn(x, gamma) -> logits` ([B, L, V] and [B]); with `embedding`
  W [V, D] the embedding-space bound of a `denoise_fn(h, gamma)` that sees h_γ = x_γW only."""
  if embedding is None:
    terms, prior_fn = denoiser_terms(denoise_fn, vocab_size), None
  else:
    terms, prior_fn = embedded_denoiser_terms(denoise_fn, embedding), embedded_prior_fn(embedding)
  return bound_terms(functools.partial(terms, None), tokens, rng, lambda_max=lambda_max, proposal=proposal,
                     settings=settings, prior_fn=_bind(prior_fn, None))


def pilot_edges(lambda_min: float, candidates, width: float):
  """The pilot strata edges on [λ0, max candidate] and each candidate's edge index (candidates must
  lie on the grid λ0 + k·width)."""
  top = max(candidates)
  num = int(round((top - lambda_min) / width))
  edges = lambda_min + width * np.arange(num + 1)
  index = [int(round((c - lambda_min) / width)) for c in candidates]
  for c, i in zip(candidates, index):
    if i < 1 or abs(edges[i] - c) > 1e-6:
      raise ValueError(f"λ1 candidate {c} is not above λ0={lambda_min} on the pilot grid of width {width}")
  return edges, np.asarray(index)


def pilot_terms(terms_fn, tokens, rng, *, settings: BoundSettings = BoundSettings(), prior_fn=None):
  """(f [B, K] = ½ e^λ Brier at one uniform point in each pilot stratum, CE [B, C] at each candidate,
  prior term [B])."""
  batch, candidates, points_per_call = num_rows(tokens), settings.candidates, settings.points_per_call
  edges, _ = pilot_edges(settings.lambda_min, candidates, settings.width)
  rng_lam, rng_points, rng_recon = jax.random.split(rng, 3)
  lam, _ = proposal_points(rng_lam, batch, len(edges) - 1, edges, np.diff(edges))
  brier, _ = point_terms(terms_fn, tokens, rng_points, lam, points_per_call)
  lam_c = jnp.broadcast_to(jnp.asarray(candidates, jnp.float32), (batch, len(candidates)))
  _, ce = point_terms(terms_fn, tokens, rng_recon, lam_c, points_per_call)
  return 0.5 * jnp.exp(lam) * brier, ce, _prior(prior_fn, tokens, settings.lambda_min)


def batched(fn, params, rows, batch_size: int, seed: int, progress=None):
  """Runs `fn(params, rows [batch_size, ...], rng) -> tuple of [batch_size, ...]` over `rows` (tokens,
  or a tuple of arrays with the rows on their first axis, e.g. (tokens, scored): `split_rows`),
  padding the last batch with copies of its first row; returns the outputs for the real rows,
  concatenated."""
  rows = tuple(np.asarray(a) for a in rows) if isinstance(rows, (tuple, list)) else np.asarray(rows, np.int32)
  total = num_rows(rows)
  outs = []
  for c, start in enumerate(range(0, total, batch_size)):
    chunk = jax.tree.map(lambda a: a[start:start + batch_size], rows)
    n = num_rows(chunk)
    if n < batch_size:
      chunk = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[:1], batch_size - n, axis=0)]), chunk)
    out = fn(params, chunk, jax.random.fold_in(jax.random.key(seed), c))
    outs.append(tuple(np.asarray(o, np.float64)[:n] for o in out))
    if progress is not None:
      progress(n)
  return tuple(np.concatenate(parts) for parts in zip(*outs))


def select_endpoint(run_pilot: Callable, params, selection_rows, *, settings: BoundSettings = BoundSettings(),
                    seed: int = 0, progress=None) -> dict:
  """λ1 and the proposal from the selection rows alone (see the module docstring).

  `run_pilot(params, tokens [settings.batch_size, L], rng)` returns `pilot_terms`' (f, CE[, prior]). Only
  `selection_rows` are given to it. Returns lambda_max, the candidates with their mean per-token bound and standard
  error on the selection rows, and proposal = (edges, masses) on [λ0, λ1].
  """
  selection_rows, candidates = np.asarray(selection_rows), settings.candidates
  n, length = selection_rows.shape
  edges, index = pilot_edges(settings.lambda_min, candidates, settings.width)
  out = batched(run_pilot, params, selection_rows, settings.batch_size, seed, progress)
  f, ce = out[:2]
  prior = out[2][:, None] if len(out) > 2 else prior_term(length, settings.lambda_min)
  partial = np.concatenate([np.zeros((n, 1)), np.cumsum(f * np.diff(edges), axis=1)], axis=1)  # ∫ up to edge
  per_row = prior + partial[:, index] + ce  # [n, C]
  values = per_row.mean(axis=0) / length
  stderr = per_row.std(axis=0, ddof=1) / np.sqrt(n) / length if n > 1 else np.full(len(candidates), np.nan)
  finite = np.where(np.isfinite(values), values, np.inf)
  best = int(np.argmin(finite))
  top = index[best]
  rms = np.sqrt(np.mean(np.square(f[:, :top]), axis=0))
  proposal = fitted_proposal(edges[:top + 1], rms, settings.defensive)
  return {"lambda_max": float(candidates[best]), "candidates": [float(c) for c in candidates],
          "candidate_values": [float(v) for v in values], "candidate_stderr": [float(s) for s in stderr],
          "proposal": proposal}


def bound_with_selection(compile_fn: Callable, terms: Terms, params, report_rows, selection_rows, *,
                         settings: BoundSettings = BoundSettings(), seed: int = 0, progress=None) -> dict:
  """The §5 bound with λ1 and the λ proposal chosen on `selection_rows`, reported on `report_rows`.

  `terms` (traceable; `Terms`): the network's Brier and CE at (params, tokens, gamma, rng), and its
  prior norms; `compile_fn(f)` turns a traceable `f(params, tokens, rng)` into a callable on (params,
  numpy tokens [settings.batch_size, L], rng) (jax.jit, or a sharded jit). The selection pass sees the
  selection rows only; the report pass uses the fixed λ1 and proposal. `progress(done, total)` counts
  selection then report rows. Returns `summarize`'s record of the report rows plus the selection's record.
  """
  total_rows, done = len(selection_rows) + len(report_rows), [0]

  def tick(n):
    done[0] += n
    if progress is not None:
      progress(done[0], total_rows)

  selection = select_endpoint(compile_fn(pilot_fn(terms, settings)), params, selection_rows, settings=settings,
                              seed=seed + 1, progress=tick)
  proposal = selection.pop("proposal")
  lambda_max = selection["lambda_max"]

  run_report = compile_fn(report_fn(terms, settings, lambda_max=lambda_max, proposal=proposal))
  total, diffusion, reconstruction = batched(run_report, params, report_rows, settings.batch_size, seed, tick)
  length = np.asarray(report_rows).shape[1]
  record = summarize(total, length)
  record.update(lambda_min=settings.lambda_min, lambda_max=lambda_max, num_points=settings.num_points,
                diffusion_per_token=float(diffusion.mean() / length),
                reconstruction_per_token=float(reconstruction.mean() / length),
                selection=dict(selection, num_rows=int(len(selection_rows)), pilot_width=settings.width,
                               defensive=settings.defensive,
                               proposal_edges=[float(e) for e in proposal[0]],
                               proposal_masses=[float(m) for m in proposal[1]]))
  return record


def pilot_fn(terms: Terms, settings: BoundSettings):
  """f(params, rows, rng) -> `pilot_terms`' (f, CE, prior) per row: what `select_endpoint` runs."""
  return lambda params, rows, rng: pilot_terms(functools.partial(terms.terms_fn, params), rows, rng,
                                               settings=settings, prior_fn=_bind(terms.prior_fn, params))


def report_fn(terms: Terms, settings: BoundSettings, *, lambda_max: float, proposal):
  """f(params, rows, rng) -> (bound, diffusion, reconstruction) per row [B], at a fixed λ1 and proposal
  (`select_endpoint`'s): what a report split, or any rows scored after the selection, is run through."""

  def report(params, rows, rng):
    total, parts = bound_terms(functools.partial(terms.terms_fn, params), rows, rng, lambda_max=lambda_max,
                               proposal=proposal, settings=settings, prior_fn=_bind(terms.prior_fn, params))
    return total, parts["diffusion"], parts["reconstruction"]

  return report


def _bind(prior_fn, params):
  return None if prior_fn is None else functools.partial(prior_fn, params)


def summarize(per_sequence_nll: np.ndarray, length: int) -> dict:
  """Pools per-sequence bounds into a per-token bound with its Monte Carlo standard error."""
  per_sequence_nll = np.asarray(per_sequence_nll, np.float64)
  n = len(per_sequence_nll)
  per_token = per_sequence_nll.mean() / length
  stderr = per_sequence_nll.std(ddof=1) / np.sqrt(n) / length if n > 1 else float("nan")
  return {"metric": "nll_bound_per_token", "value": float(per_token), "stderr": float(stderr),
          # None rather than JSON's non-standard Infinity when an untrained model's bound overflows.
          "ppl_bound": float(np.exp(per_token)) if per_token < 700 else None, "num_tokens": int(n * length), "num_sequences": n}
