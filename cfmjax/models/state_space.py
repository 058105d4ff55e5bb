"""Where the flow's state lives: the V-dimensional simplex, or embedding space h = xW (SPEC §4).

The network's first layer is linear without bias, h = xW (W: V × D), and every update of a sampler
or teacher is affine in (x, ψ), so the state can be carried as h and never exist in R^V:

  noise     εW ~ N(0, WᵀW)  drawn as ξCᵀ, ξ ~ N(0, I_D), CCᵀ = WᵀW (f32 Cholesky, tiny jitter)
  data      onehot(x1)W = W[x1]                (a row gather)
  updates   h' = a h + b ψW                    (ψW: softmax-weighted embedding, see `vocab_stats`)
  JVPs      (μ − x)/(1 − s) ↦ (μW − h)/(1 − s)

Only the output softmax is V-dimensional, and `vocab_stats` reduces it one vocabulary chunk at a
time (head matmul + online log-sum-exp fused per chunk), so full [B, L, V] logits are never live
when `model.vocab_chunk` > 0. The V-space path stays as the reference (`model.state_space="vocab"`).

Gradient of W through the noise. In V-space W gets εᵀg from the noise part (g = ∂loss/∂h). With
h drawn as ξCᵀ the pathwise derivative is a different (but also unbiased) estimator; we instead use
the Rao-Blackwellised one: ε enters only through εW = n, and E[ε | εW = n] = n A⁻¹Wᵀ (A = WᵀW), so
E[εᵀg] = E[W A⁻¹ nᵀ g]: the same expected gradient as the V path, with less variance, computed
from a [D, D] contraction and one [V, D]·[D, D] product (`_with_noise_gradient`, a custom VJP). No
gradient goes through the Cholesky factor.

Distillation with an EMA teacher needs the teacher's view εW_t of the SAME ε: it is drawn jointly,
n_t = n A⁻¹(WᵀW_t) + ξ₂ Λ^½ Qᵀ, where QΛQᵀ = ΔᵀΔ and Δ = (I − P_W)W_t is the part of W_t outside W's
column space; the student's W-gradient then conditions on both (n, n_t), which is again exact in
expectation (tests/test_state_space.py checks all of this against the V-space computation).

`noise="project"` draws ε in V-space and projects it (always used when V < D, where it is cheaper):
it is exactly the V path, gradient included, and lets tests feed both paths the same ε.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from cfmjax.flow import corruption, prompting
from cfmjax.models import model as model_lib

STATE_SPACES = ("vocab", "embedding", "auto")
NOISE_MODES = ("cholesky", "project")
HIGHEST = jax.lax.Precision.HIGHEST
_MASKED = -1e30  # logit of a padding column in the last vocabulary chunk: exp(−1e30 − m) = 0


def resolve(state_space: str, vocab_size: int, d_model: int) -> str:
  """'vocab' or 'embedding' ('auto' = embedding when V > D, where it saves work)."""
  if state_space not in STATE_SPACES:
    raise ValueError(f"unknown model.state_space={state_space!r}; choose one of {STATE_SPACES}")
  if state_space == "auto":
    return "embedding" if vocab_size > d_model else "vocab"
  return state_space


# ----------------------------------------------------------------------------------------------
# Embedding-space noise and data.


def gram_factor(w, jitter: float = 1e-6):
  """Lower-triangular C with CCᵀ = WᵀW + jitter·(mean diagonal)·I, in float32."""
  w = w.astype(jnp.float32)
  gram = jnp.matmul(w.T, w, precision=HIGHEST)
  d = gram.shape[0]
  scale = jnp.trace(gram) / d
  return jnp.linalg.cholesky(gram + jitter * scale * jnp.eye(d, dtype=jnp.float32))


@jax.custom_vjp
def _with_noise_gradient(value, w, directions):
  """`value` unchanged; W's cotangent gets Σᵢ Bᵢ (cᵢᵀ g) for `directions` = [(cᵢ [..., k], Bᵢ [V, k])].

  Σᵢ cᵢBᵢᵀ is E[ε | observed noise] (V-dim, never formed), so this is the V path's εᵀg in
  expectation. A custom VJP rather than a zero-valued surrogate term: the forward pass costs nothing.
  """
  del w, directions
  return value


def _with_noise_gradient_fwd(value, w, directions):
  return value, directions


def _with_noise_gradient_bwd(directions, g):
  d = g.shape[-1]
  g2 = g.reshape(-1, d).astype(jnp.float32)
  dw = sum(jnp.matmul(basis, jnp.matmul(coef.reshape(-1, coef.shape[-1]).T, g2, precision=HIGHEST),
                      precision=HIGHEST) for coef, basis in directions)
  return g, dw, jax.tree_util.tree_map(jnp.zeros_like, directions)


_with_noise_gradient.defvjp(_with_noise_gradient_fwd, _with_noise_gradient_bwd)


def draw_noise(rng, shape, w, w_teacher=None, mode: str = "cholesky", jitter: float = 1e-6):
  """(εW, εW_t) for ε ~ N(0, I_V) of shape [*shape, V], without forming ε in mode 'cholesky'.

  `w_teacher` (optional, no gradient) gets the same ε's projection; returns None in its place when
  absent. The first output carries W's gradient as the V path would give it, in expectation (see
  the module docstring); mode 'project' (or V < D) draws ε and gives exactly the V path's.
  """
  if mode not in NOISE_MODES:
    raise ValueError(f"unknown model.embedded_noise={mode!r}; choose one of {NOISE_MODES}")
  vocab, d = w.shape
  shape = tuple(shape)
  if mode == "project" or vocab < d:
    eps = jax.random.normal(rng, shape + (vocab,), jnp.float32)
    n = jnp.matmul(eps, w.astype(jnp.float32), precision=HIGHEST)
    n_t = None if w_teacher is None else jnp.matmul(
        eps, jax.lax.stop_gradient(w_teacher).astype(jnp.float32), precision=HIGHEST)
    return n, n_t
  rng_s, rng_t = jax.random.split(rng)
  w_sg = jax.lax.stop_gradient(w).astype(jnp.float32)
  chol = gram_factor(w_sg, jitter)
  xi = jax.random.normal(rng_s, shape + (d,), jnp.float32)
  n = jnp.matmul(xi, chol.T, precision=HIGHEST)
  # E[ε | n] = n A⁻¹ Wᵀ: the coefficients n A⁻¹ by a triangular solve with the same factor.
  coef = jax.scipy.linalg.cho_solve((chol, True), n.reshape(-1, d).T).T.reshape(n.shape)
  directions = [(coef, w_sg)]
  n_t = None
  if w_teacher is not None:
    w_t = jax.lax.stop_gradient(w_teacher).astype(jnp.float32)
    regress = jax.scipy.linalg.cho_solve((chol, True), jnp.matmul(w_sg.T, w_t, precision=HIGHEST))
    outside = w_t - jnp.matmul(w_sg, regress, precision=HIGHEST)  # Δ = (I − P_W) W_t, [V, D]
    lam, q = jnp.linalg.eigh(jnp.matmul(outside.T, outside, precision=HIGHEST))
    lam = jnp.maximum(lam, 0.0)
    xi_t = jax.random.normal(rng_t, shape + (d,), jnp.float32)
    n_t = jnp.matmul(n, regress, precision=HIGHEST) + jnp.matmul(xi_t * jnp.sqrt(lam), q.T, precision=HIGHEST)
    # E[ε_⊥ | ε_⊥Δ] = ξ₂ Uᵀ with U = ΔQΛ^(−½) (orthonormal columns); directions with negligible
    # variance are dropped from the gradient (their U columns would be rounding noise).
    keep = lam > 1e-6 * jnp.max(lam) + jnp.finfo(jnp.float32).tiny
    u = jnp.matmul(outside, q, precision=HIGHEST) * jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, lam, 1.0)), 0.0)
    directions.append((xi_t, u))
  return _with_noise_gradient(n, w, directions), n_t


def interpolate_embedded(noise, w, tokens, gamma):
  """h_γ = (1 − γ) n + γ W[x1]: the data part is a row gather (its W-gradient a scatter-add)."""
  data = model_lib.gather_rows(w.astype(jnp.float32), tokens)
  return corruption.interpolate(noise, data, gamma)


def embed_probs(probs, w):
  """ψW: a distribution per position [..., V] → its expected embedding [..., D] (float32)."""
  w = model_lib.whole_table(w.astype(jnp.float32))
  return jnp.einsum("...v,vd->...d", probs.astype(jnp.float32), w, precision=HIGHEST)


# ----------------------------------------------------------------------------------------------
# The output softmax, reduced one vocabulary chunk at a time.

STAT_NAMES = ("lse", "target", "off_target", "off_target_sq", "argmax", "sum_sq", "teacher_dot", "teacher_prob",
              "mean_embedding")


def stats_from_logits(logits, tokens=None, teacher=None, embedding=None):
  """The reference reduction of full logits [..., V]: the same dict `vocab_stats` returns.

  lse = log Σ e^z; argmax; sum_sq = Σ p²; with tokens: target = z[token], off_target = Σ_{v≠token} p_v
  and off_target_sq = Σ_{v≠token} p_v²; with a teacher T: teacher_dot = Σ T z, teacher_prob = Σ T p;
  with an embedding W: mean_embedding = pW.

  Why the off-target sums: near the clean end the logits reach 10⁵ (the skip term γx/(1−γ)²), where
  one float32 ulp is 0.016, and XLA may round z[token] and lse in different fusions, so
  1 − exp(z[token] − lse) can come out negative. e^λ times that wrecked the likelihood bound; the
  Brier score and the CE of a near-certain prediction are read off the off-target mass instead.
  """
  z = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  lse = jax.nn.logsumexp(z, axis=-1)
  probs = jnp.exp(z - lse[..., None])
  out = {"lse": lse, "argmax": jnp.argmax(z, axis=-1).astype(jnp.int32),
         "sum_sq": jnp.sum(jnp.square(probs), axis=-1)}
  if tokens is not None:
    out["target"] = jnp.take_along_axis(z, tokens[..., None], axis=-1)[..., 0]
    off = jnp.arange(z.shape[-1]) != tokens[..., None]
    out["off_target"] = jnp.sum(jnp.where(off, probs, 0.0), axis=-1)
    out["off_target_sq"] = jnp.sum(jnp.where(off, jnp.square(probs), 0.0), axis=-1)
  if teacher is not None:
    t = jax.lax.stop_gradient(teacher).astype(z.dtype)
    out["teacher_dot"] = jnp.sum(t * z, axis=-1)
    out["teacher_prob"] = jnp.sum(t * probs, axis=-1)
  if embedding is not None:
    out["mean_embedding"] = embed_probs(probs, embedding)
  return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MixtureTeacher:
  """A teacher distribution T = Σ_k w_k softmax(z_k) held as the K teacher calls' hidden states, never
  as [..., V] probabilities: z_k = h_k · kernel + bias (+ the skip term skip_k), lse_k its log-normaliser
  (from a first chunked pass). `vocab_stats` rebuilds T one vocabulary chunk at a time. PSD's teacher
  a ψ(x, s, u) + (1 − a) ψ(X_{s,u}(x), u, t) is the case K = 2 (distill_losses.psd_teacher_chunked)."""

  weights: tuple  # K arrays [...] (broadcastable to the batch shape)
  hiddens: tuple  # K arrays [..., D]
  skips: tuple  # K skip terms (model.skip_terms) or None
  lses: tuple  # K arrays [...]
  kernel: jax.Array  # the teacher's head [D, V]
  bias: jax.Array  # [V]

  def padded(self, pad: int):
    return dataclasses.replace(self, kernel=jnp.pad(self.kernel, ((0, 0), (0, pad))), bias=jnp.pad(self.bias, (0, pad)),
                               skips=tuple(_pad_skip(k, pad) for k in self.skips))

  def chunk_probs(self, offset, chunk: int, vocab: int, dtype):
    """T on vocabulary columns [offset, offset + chunk), float32 (0 on padding columns)."""
    return sum(jnp.asarray(w, jnp.float32)[..., None]
               * jnp.exp(_chunk_logits(h, self.kernel, self.bias, k, offset, chunk, vocab, dtype) - lse[..., None])
               for w, h, k, lse in zip(self.weights, self.hiddens, self.skips, self.lses))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RatioTeacher:
  """T = softmax(y), y = z_d − log max(c₀ + c₁ δ, floor), δ = ∂z − ⟨ψ, ∂z⟩: the LSD and ESD teachers
  (distill_losses) held as hidden states. z_d = the diagonal call's logits; ∂z = the JVP tangent of the
  flow-map call's logits, which is linear in the tangent of its hidden state and skip features (the
  head and the skip kernel do not move), so each chunk of ∂z is that tangent through the head, without
  its bias. `mean_tangent` = ⟨ψ, ∂z⟩ and `lse` = log Σ e^y come from earlier chunked passes
  (`ratio_teacher`). c₀, c₁, floor broadcast over positions."""

  diag_hidden: jax.Array
  diag_skip: object
  tangent_hidden: jax.Array
  tangent_skip: object
  mean_tangent: jax.Array  # [...]
  c0: jax.Array
  c1: jax.Array
  floor: jax.Array
  lse: jax.Array  # [...] (zeros until `ratio_teacher` fills it)
  kernel: jax.Array
  bias: jax.Array

  def padded(self, pad: int):
    return dataclasses.replace(self, kernel=jnp.pad(self.kernel, ((0, 0), (0, pad))), bias=jnp.pad(self.bias, (0, pad)),
                               diag_skip=_pad_skip(self.diag_skip, pad), tangent_skip=_pad_skip(self.tangent_skip, pad))

  def chunk_logits(self, offset, chunk: int, vocab: int, dtype):
    z_diag = _chunk_logits(self.diag_hidden, self.kernel, self.bias, self.diag_skip, offset, chunk, vocab, dtype)
    dz = _chunk_logits(self.tangent_hidden, self.kernel, jnp.zeros_like(self.bias), self.tangent_skip, offset, chunk,
                       vocab, dtype)
    ratio = jnp.maximum(self.c0 + self.c1 * (dz - self.mean_tangent[..., None]), self.floor)
    y = z_diag - jnp.log(ratio)
    return jnp.where(offset + jnp.arange(chunk) < vocab, y, _MASKED)

  def chunk_probs(self, offset, chunk: int, vocab: int, dtype):
    return jnp.exp(self.chunk_logits(offset, chunk, vocab, dtype) - self.lse[..., None])


CHUNKED_TEACHERS = (MixtureTeacher, RatioTeacher)


def _chunks(kernel, chunk: int):
  """(chunk size, number of chunks, padding) of a head [D, V] (one chunk when chunk ≤ 0 or ≥ V)."""
  vocab = kernel.shape[1]
  chunk = vocab if chunk <= 0 or chunk >= vocab else chunk
  num = -(-vocab // chunk)
  return chunk, num, num * chunk - vocab


def ratio_teacher(teacher: RatioTeacher, chunk: int, dtype=jnp.float32) -> RatioTeacher:
  """`teacher` with its log-normaliser filled in: one chunked pass (online log-sum-exp) over y."""
  teacher = jax.tree_util.tree_map(jax.lax.stop_gradient, teacher)
  vocab = teacher.kernel.shape[1]
  chunk, num, pad = _chunks(teacher.kernel, chunk)
  padded = teacher.padded(pad) if pad else teacher

  def step(carry, index):
    m, total = carry
    y = padded.chunk_logits(index * chunk, chunk, vocab, dtype)
    m_new = jnp.maximum(m, jnp.max(y, axis=-1))
    return (m_new, total * jnp.exp(m - m_new) + jnp.sum(jnp.exp(y - m_new[..., None]), axis=-1)), None

  shape = teacher.mean_tangent.shape
  (m, total), _ = jax.lax.scan(step, (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32)),
                               jnp.arange(num))
  return dataclasses.replace(teacher, lse=m + jnp.log(total))


def _chunk_logits(h, kernel, bias, skip, offset, chunk: int, vocab: int, dtype):
  """Logits of vocabulary columns [offset, offset + chunk) in float32 (padding columns at −1e30); the
  kernel, bias and skip kernel are already padded to a whole number of chunks."""
  k = jax.lax.dynamic_slice_in_dim(kernel, offset, chunk, axis=1).astype(dtype)
  b = jax.lax.dynamic_slice_in_dim(bias, offset, chunk, axis=0).astype(dtype)
  z = (jnp.matmul(h.astype(dtype), k) + b).astype(jnp.float32)
  if skip is not None:
    features, skip_kernel = skip
    if skip_kernel is not None:
      z = z + jnp.matmul(features, jax.lax.dynamic_slice_in_dim(skip_kernel, offset, chunk, axis=1),
                         precision=HIGHEST)
    else:  # the V-space form: the term itself, [..., V]
      z = z + jax.lax.dynamic_slice_in_dim(features, offset, chunk, axis=-1)
  return jnp.where(offset + jnp.arange(chunk) < vocab, z, _MASKED)


def _pad_skip(skip, pad: int):
  if skip is None or not pad:
    return skip
  features, kernel = skip
  if kernel is not None:
    return features, jnp.pad(kernel, ((0, 0), (0, pad)))
  return jnp.pad(features, [(0, 0)] * (features.ndim - 1) + [(0, pad)]), None


def vocab_stats(features, head, *, chunk: int, dtype=jnp.float32, tokens=None, teacher=None, embedding=None,
                tangent=None):
  """`stats_from_logits(hidden·kernel + bias (+ skip), ...)` without ever holding the [..., V] logits, for
  `features` = (hidden [..., D], skip or None) (what `StateSpace.hidden` returns) and `head` = (kernel
  [D, V], bias [V]).

  A `lax.scan` over vocabulary chunks of `chunk` columns: each step computes that chunk's logits
  (the head matmul in the model's `dtype`, then float32) and folds them into running statistics
  with an online log-sum-exp (running max m under stop_gradient, sums rescaled by e^(m − m')).
  The step is rematerialised in the backward pass, so reverse mode stores only the small carries,
  not the chunk logits. chunk ≤ 0 or ≥ V computes the full logits directly.

  `skip`: the model's skip term (`model.skip_terms`), added to each chunk's logits in float32 (its
  coefficients reach 10⁶, far beyond what a bfloat16 head matmul carries). `teacher`: probabilities
  [..., V], or a chunked teacher (`MixtureTeacher`, `RatioTeacher`) rebuilt per chunk. `tangent`:
  (∂hidden, ∂skip) of a JVP: adds mean_tangent = ⟨ψ, ∂z⟩ (the head is linear, so ∂z is the tangent
  through it without the bias).
  """
  (hidden, skip), (kernel, bias) = features, head
  vocab = kernel.shape[1]
  if isinstance(teacher, CHUNKED_TEACHERS):
    teacher = jax.tree_util.tree_map(jax.lax.stop_gradient, teacher)
  if chunk <= 0 or chunk >= vocab:
    logits = (jnp.matmul(hidden.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)).astype(jnp.float32)
    if skip is not None:
      logits = model_lib.add_skip(logits, skip)
    extra = {}
    if tangent is not None:
      dz = _chunk_logits(tangent[0], kernel, jnp.zeros_like(bias), tangent[1], 0, vocab, vocab, dtype)
      extra["mean_tangent"] = jnp.sum(jax.nn.softmax(logits, axis=-1) * dz, axis=-1)
    return dict(_full_stats(logits, tokens, teacher, embedding, dtype), **extra)
  chunked_teacher = teacher if isinstance(teacher, CHUNKED_TEACHERS) else None
  num_chunks = -(-vocab // chunk)
  pad = num_chunks * chunk - vocab
  if pad:  # zero columns, masked to −1e30 below; a copy of the head, not of anything [B, L, V]
    kernel = jnp.pad(kernel, ((0, 0), (0, pad)))
    bias = jnp.pad(bias, (0, pad))
    if chunked_teacher is None and teacher is not None:
      teacher = jnp.pad(teacher, [(0, 0)] * (teacher.ndim - 1) + [(0, pad)])
    embedding = None if embedding is None else jnp.pad(embedding, ((0, pad), (0, 0)))
    skip = _pad_skip(skip, pad)
    if tangent is not None:
      tangent = (tangent[0], _pad_skip(tangent[1], pad))
    if chunked_teacher is not None:
      chunked_teacher = chunked_teacher.padded(pad)
  if chunked_teacher is None and teacher is not None:
    teacher = jax.lax.stop_gradient(teacher).astype(jnp.float32)
  h = hidden.astype(dtype)
  batch_shape = hidden.shape[:-1]

  @jax.checkpoint
  def step(carry, index):
    offset = index * chunk
    z = _chunk_logits(h, kernel, bias, skip, offset, chunk, vocab, dtype)
    column = offset + jnp.arange(chunk)
    m_chunk = jax.lax.stop_gradient(jnp.max(z, axis=-1))
    m_new = jnp.maximum(carry["m"], m_chunk)
    rescale = jnp.exp(carry["m"] - m_new)
    e = jnp.exp(z - m_new[..., None])
    out = {"m": m_new, "s": carry["s"] * rescale + jnp.sum(e, axis=-1),
           "sum_sq": carry["sum_sq"] * jnp.square(rescale) + jnp.sum(jnp.square(e), axis=-1),
           # strict >: ties keep the earlier chunk, as jnp.argmax keeps the first index
           "argmax": jnp.where(m_chunk > carry["m"], offset + jnp.argmax(z, axis=-1).astype(jnp.int32),
                               carry["argmax"])}
    if tokens is not None:
      local = tokens - offset
      inside = (local >= 0) & (local < chunk)
      picked = jnp.take_along_axis(z, jnp.clip(local, 0, chunk - 1)[..., None], axis=-1)[..., 0]
      out["target"] = carry["target"] + jnp.where(inside, picked, 0.0)
      off = column != tokens[..., None]
      out["off_target"] = carry["off_target"] * rescale + jnp.sum(jnp.where(off, e, 0.0), axis=-1)
      out["off_target_sq"] = (carry["off_target_sq"] * jnp.square(rescale)
                              + jnp.sum(jnp.where(off, jnp.square(e), 0.0), axis=-1))
    if teacher is not None:
      if chunked_teacher is not None:  # this chunk of the teacher, rebuilt from its hidden states
        t = chunked_teacher.chunk_probs(offset, chunk, vocab, dtype)
        out.update({f"teacher_{k}": carry[f"teacher_{k}"] + v for k, v in teacher_sums(t).items()})
      else:
        t = jax.lax.dynamic_slice_in_dim(teacher, offset, chunk, axis=-1)
      out["teacher_dot"] = carry["teacher_dot"] + jnp.sum(t * z, axis=-1)
      out["teacher_prob"] = carry["teacher_prob"] * rescale + jnp.sum(t * e, axis=-1)
    if tangent is not None:
      dz = _chunk_logits(tangent[0], kernel, jnp.zeros_like(bias), tangent[1], offset, chunk, vocab, dtype)
      out["tangent"] = carry["tangent"] * rescale + jnp.sum(e * jnp.where(column < vocab, dz, 0.0), axis=-1)
    if embedding is not None:
      rows = jax.lax.dynamic_slice_in_dim(embedding, offset, chunk, axis=0).astype(jnp.float32)
      out["emb"] = (carry["emb"] * rescale[..., None]
                    + jnp.matmul(e, rows, precision=HIGHEST))
    return out, None

  zeros = jnp.zeros(batch_shape, jnp.float32)
  init = {"m": jnp.full(batch_shape, -jnp.inf, jnp.float32), "s": zeros, "sum_sq": zeros,
          "argmax": jnp.zeros(batch_shape, jnp.int32)}
  if tokens is not None:
    init["target"], init["off_target"], init["off_target_sq"] = zeros, zeros, zeros
  if teacher is not None:
    init["teacher_dot"], init["teacher_prob"] = zeros, zeros
    if chunked_teacher is not None:
      init.update({f"teacher_{k}": zeros for k in TEACHER_SUMS})
  if embedding is not None:
    init["emb"] = jnp.zeros(batch_shape + (embedding.shape[1],), jnp.float32)
  if tangent is not None:
    init["tangent"] = zeros
  acc, _ = jax.lax.scan(step, init, jnp.arange(num_chunks))
  out = {"lse": acc["m"] + jnp.log(acc["s"]), "argmax": acc["argmax"],
         "sum_sq": acc["sum_sq"] / jnp.square(acc["s"])}
  if tokens is not None:
    out["target"] = acc["target"]
    out["off_target"] = acc["off_target"] / acc["s"]
    out["off_target_sq"] = acc["off_target_sq"] / jnp.square(acc["s"])
  if teacher is not None:
    out["teacher_dot"], out["teacher_prob"] = acc["teacher_dot"], acc["teacher_prob"] / acc["s"]
    if chunked_teacher is not None:
      out.update({f"teacher_{k}": acc[f"teacher_{k}"] for k in TEACHER_SUMS})
  if embedding is not None:
    out["mean_embedding"] = acc["emb"] / acc["s"][..., None]
  if tangent is not None:
    out["mean_tangent"] = acc["tangent"] / acc["s"]
  return out


# Losses read off the statistics (each equals its textbook form on full logits).

def cross_entropy(stats):
  """−log p[token] = lse − z[token]; −log(1 − off-target mass) where that mass is below ½ (the same
  value, but free of the rounding of huge logits, see `stats_from_logits`)."""
  direct = stats["lse"] - stats["target"]
  if "off_target" not in stats:
    return direct
  off = stats["off_target"]
  return jnp.where(off < 0.5, -jnp.log1p(-jnp.minimum(off, 0.5)), direct)


def brier_score(stats):
  """‖p − e_x1‖² = (1 − p[token])² + Σ_{v≠token} p_v², from the off-target sums (nonnegative by
  construction; see `stats_from_logits`)."""
  return jnp.square(stats["off_target"]) + stats["off_target_sq"]


TEACHER_SUMS = ("xlogx", "mass", "sq")


def teacher_sums(t):
  """Σ T log T, Σ T and Σ T² over the last axis: what the KL and ‖p − T‖² need of the teacher alone
  (summed per chunk by `vocab_stats` for a `MixtureTeacher`)."""
  t = jax.lax.stop_gradient(t).astype(jnp.float32)
  return {"xlogx": jnp.sum(jax.scipy.special.xlogy(t, t), axis=-1), "mass": jnp.sum(t, axis=-1),
          "sq": jnp.sum(jnp.square(t), axis=-1)}


def teacher_probs(teacher, dtype=jnp.float32):
  """The full [..., V] probabilities of a chunked teacher (small V): its one chunk of width V."""
  vocab = teacher.kernel.shape[1]
  return jax.lax.stop_gradient(teacher.chunk_probs(0, vocab, vocab, dtype))


def _full_stats(logits, tokens, teacher, embedding, dtype):
  """`stats_from_logits` where the teacher may also be a chunked one, built here in full (small V, or
  the unchunked reference) with its sums alongside, as `vocab_stats` gives them chunk by chunk."""
  if not isinstance(teacher, CHUNKED_TEACHERS):
    return stats_from_logits(logits, tokens, teacher, embedding)
  probs = teacher_probs(teacher, dtype)
  out = stats_from_logits(logits, tokens, probs, embedding)
  return dict(out, **{f"teacher_{k}": v for k, v in teacher_sums(probs).items()})


def _teacher_sums_of(stats, teacher):
  return ({k: stats[f"teacher_{k}"] for k in TEACHER_SUMS} if isinstance(teacher, CHUNKED_TEACHERS)
          else teacher_sums(teacher))


def kl_to_teacher(stats, teacher):
  """KL(T ‖ p) = Σ T log T − Σ T z + lse Σ T (the teacher under stop_gradient; for a chunked teacher
  its sums come chunk by chunk from `vocab_stats`)."""
  sums = _teacher_sums_of(stats, teacher)
  return sums["xlogx"] - stats["teacher_dot"] + stats["lse"] * sums["mass"]


def squared_distance_to_teacher(stats, teacher):
  """‖p − T‖² = Σp² − 2⟨p, T⟩ + ΣT²."""
  return stats["sum_sq"] - 2.0 * stats["teacher_prob"] + _teacher_sums_of(stats, teacher)["sq"]


# ----------------------------------------------------------------------------------------------
# The state space as one object: what losses, teachers and samplers call.


@dataclasses.dataclass(frozen=True)
class StateSpace:
  """Noising, network calls and output reductions for one choice of state space.

  `apply_fn(params, state, τ_s, τ_t[, embedded=True][, hidden=True])` is the model's entry point
  (model.py). With embedded=False and vocab_chunk=0 only the plain 4-argument call is made, so any
  logits function (the exact oracles in tests) can stand in for the network.
  """

  apply_fn: Callable
  vocab_size: int
  embedded: bool = False
  vocab_chunk: int = 0
  noise: str = "cholesky"
  dtype: str = "float32"  # the model's activation dtype (the chunked head matmul runs in it)
  prompt_flag: bool = False  # the model was trained with prompts (ModelConfig.prompt_flag): see `readout`

  def _call(self, params, state, tau_s, tau_t, hidden=False, **conditioning):
    # conditioning: the model's prompt_mask= / self_cond= (prompting.py), passed only when given
    kwargs = dict(conditioning, embedded=True) if self.embedded else dict(conditioning)
    if hidden:
      kwargs["hidden"] = True
    return self.apply_fn(params, state, tau_s, tau_t, **kwargs)

  def logits(self, params, state, tau_s, tau_t, **conditioning):
    """Full logits [B, L, V] (teachers need them: ψ, z and δ = ∂z − ⟨ψ, ∂z⟩ per entry)."""
    return self._call(params, state, tau_s, tau_t, **conditioning)

  def embed_probs(self, params, probs):
    """A distribution [.., V] in this state space: ψW when embedded, ψ itself otherwise."""
    return embed_probs(probs, model_lib.embedding_matrix(params)) if self.embedded else probs

  def noisy_state(self, params, rng, tokens, gamma):
    """x_γ (vocab) or h_γ = x_γW (embedding) for clean tokens [B, L] at flow times γ [B]."""
    return self.noisy_states(params, None, rng, tokens, gamma)[0]

  def noisy_states(self, params, teacher_params, rng, tokens, gamma):
    """(student state, teacher state) of one draw of x_γ, each seen through its own network's W.

    teacher_params None: the teacher state is None. In V-space both are the same x_γ.
    """
    if not self.embedded:
      x = corruption.noisy_state(rng, tokens, gamma, self.vocab_size)
      return x, (None if teacher_params is None else x)
    w = model_lib.embedding_matrix(params)
    w_t = None if teacher_params is None else model_lib.embedding_matrix(teacher_params)
    n, n_t = draw_noise(rng, tokens.shape, w, w_t, self.noise)
    h = interpolate_embedded(n, w, tokens, gamma)
    h_t = None if w_t is None else interpolate_embedded(n_t, jax.lax.stop_gradient(w_t), tokens, gamma)
    return h, h_t

  def prior(self, params, rng, shape):
    """The sampler's start x_0 = ε (or εW), float32 [*shape, V or D]."""
    if not self.embedded:
      return corruption.prior_sample(rng, shape, self.vocab_size)
    w = jax.lax.stop_gradient(model_lib.embedding_matrix(params))
    return draw_noise(rng, shape, w, mode=self.noise)[0]

  def output_stats(self, params, state, tau_s, tau_t, *, tokens=None, teacher=None, embedding=None,
                   **conditioning):
    """`stats_from_logits` of the network's output, chunked over V when `vocab_chunk` > 0.

    mean_embedding = ψE for `embedding` E [V, D'] (e.g. W = model.embedding_matrix(params), the state's
    projection)."""
    if self.chunked:
      features = self.hidden(params, state, tau_s, tau_t, **conditioning)  # (hidden, model.skip term: SPEC §9)
      return vocab_stats(features, model_lib.head_params(params), chunk=self.vocab_chunk,
                         dtype=jnp.dtype(self.dtype), tokens=tokens, teacher=teacher, embedding=embedding)
    return _full_stats(self.logits(params, state, tau_s, tau_t, **conditioning), tokens, teacher, embedding,
                       jnp.dtype(self.dtype))

  @property
  def chunked(self) -> bool:
    """The output softmax is reduced one vocabulary chunk at a time (model.vocab_chunk < V)."""
    return 0 < self.vocab_chunk < self.vocab_size

  def hidden(self, params, state, tau_s, tau_t, **conditioning):
    """(hidden [.., D], skip term or None): the network's output before its head, what a chunked
    teacher (`MixtureTeacher`, `RatioTeacher`) is built from."""
    hidden = self._call(params, state, tau_s, tau_t, hidden=True, **conditioning)
    return hidden if isinstance(hidden, tuple) else (hidden, None)

  def hidden_stats(self, params, hidden, skip, *, with_embedding=False, tangent=None):
    """`vocab_stats` of a `hidden` call's output, chunked over V. with_embedding: stats["mean_embedding"]
    = ψ in this state space (ψW, or ψ itself in V-space); tangent: stats["mean_tangent"] = ⟨ψ, ∂z⟩."""
    embedding = None
    if with_embedding:
      embedding = (model_lib.embedding_matrix(params) if self.embedded
                   else jnp.eye(self.vocab_size, dtype=jnp.float32))
    return vocab_stats((hidden, skip), model_lib.head_params(params), chunk=self.vocab_chunk,
                       dtype=jnp.dtype(self.dtype), embedding=embedding, tangent=tangent)

  def clean_state(self, params, tokens):
    """The state of clean tokens (γ = 1): the one-hot e_x, or its embedding W[x] (float32)."""
    if self.embedded:
      return model_lib.gather_rows(model_lib.embedding_matrix(params).astype(jnp.float32), tokens)
    return corruption.one_hot(tokens, self.vocab_size, jnp.float32)

  def clean_self_cond(self, params, tokens):
    """The self-conditioning input of clean tokens: e_x in V-space, W_sc[x] in embedding space."""
    if self.embedded:
      return model_lib.gather_rows(model_lib.self_cond_matrix(params).astype(jnp.float32), tokens)
    return corruption.one_hot(tokens, self.vocab_size, jnp.float32)

  def _reduce(self, params, state, tau_s, tau_t, feed: bool, **conditioning):
    """(ψ in this space, argmax tokens, ψ as the next self-conditioning input or None)."""
    if not self.embedded:
      z = self.logits(params, state, tau_s, tau_t, **conditioning)
      psi = jax.nn.softmax(z.astype(jnp.promote_types(z.dtype, jnp.float32)), axis=-1)
      return psi, jnp.argmax(psi, axis=-1).astype(jnp.int32), (psi if feed else None)
    w = model_lib.embedding_matrix(params)
    d = w.shape[1]
    if feed:  # one pass over the vocabulary gives both ψW and ψW_sc
      w = jnp.concatenate([w, model_lib.self_cond_matrix(params)], axis=1)
    stats = self.output_stats(params, state, tau_s, tau_t, embedding=w, **conditioning)
    mean = stats["mean_embedding"]
    return mean[..., :d], stats["argmax"], (mean[..., d:] if feed else None)

  def self_cond_feed(self, params, state, tau_s, tau_t, **conditioning):
    """The self-conditioning input made from one pass of the network (μ̂ = 0): ψ, or ψW_sc."""
    return self._reduce(params, state, tau_s, tau_t, True, **conditioning)[2]

  def readout(self, params, state, tau_s, tau_t, *, prompt=None, guidance=None, self_cond=None):
    """(ψ in this state space, argmax tokens, self-conditioning feed): what a sampler step needs.

    Conditioning (SPEC §8) is the same in either space, as data:
      `prompt` = (tokens, mask [B, L]): ψ is clamped to the clean state at the prompt positions,
        so every affine update keeps them (or, for a model without the prompt flag, moves them
        along x_γ = (1 − γ) ε + γ x1: inpainting). A prompt-trained model also sees the clean
        prompt and its flag there (`conditional_input`).
      `guidance` = ω: an unconditional pass (prompt positions zeroed, no flag) is mixed in,
        ψ_ω = (1 − ω) ψ_u + ω ψ_c; ψ is affine in ψW, so the mix is the same in embedding space.
        The tokens are the argmax of ψ_ω in V-space, of the conditional pass in embedding space
        (ψ_ω is never formed in R^V there).
      `self_cond`: the previous feed (None: not self-conditioned); the third output is then the
        new one (ψ, or ψW_sc in embedding space), else None.
    """
    feed = self_cond is not None
    kwargs = {} if self_cond is None else {"self_cond": self_cond}
    passes = self._passes(params, state, prompt, guidance)
    if prompt is None:
      return self._reduce(params, state, tau_s, tau_t, feed, **kwargs)
    tokens, mask = prompt
    keep = mask[..., None]
    clean = self.clean_state(params, tokens)
    clean_feed = self.clean_self_cond(params, tokens) if feed else None

    def clamped(psi, argmax, fed):
      fed = None if fed is None else jnp.where(keep, clean_feed, fed)
      return jnp.where(keep, clean, psi), jnp.where(mask, tokens, argmax), fed

    (psi_c, tok_c, fed_c), *unconditional = [
        clamped(*self._reduce(params, x, tau_s, tau_t, feed, **kw, **kwargs)) for x, kw in passes]
    if not unconditional:
      return psi_c, tok_c, fed_c
    psi_u, _, fed_u = unconditional[0]
    mix = lambda u, c: (1.0 - guidance) * u + guidance * c  # ω = 0 and ω = 1 exact
    psi = mix(psi_u, psi_c)
    tok = tok_c if self.embedded else jnp.argmax(psi, axis=-1).astype(jnp.int32)
    return psi, tok, (None if fed_c is None else mix(fed_u, fed_c))

  def probs(self, params, state, tau_s, tau_t, *, prompt=None, guidance=None, self_cond=None):
    """μ (ψ when τ_s < τ_t) in R^V, float32 or wider, from full logits: the guided distillation
    target (distill.guided_diagonal_loss). Conditioning as in `readout`, with ψ
    the prompt's one-hot at prompt positions and ω mixing the two passes' distributions in R^V;
    `self_cond` is the feed in this space (`self_cond_input`)."""
    kwargs = {} if self_cond is None else {"self_cond": self_cond}

    def softmax(z):
      return jax.nn.softmax(z.astype(jnp.promote_types(z.dtype, jnp.float32)), axis=-1)

    passes = self._passes(params, state, prompt, guidance)
    mus = [softmax(self.logits(params, x, tau_s, tau_t, **kw, **kwargs)) for x, kw in passes]
    if prompt is not None:
      onehot = corruption.one_hot(prompt[0], self.vocab_size, mus[0].dtype)
      mus = [jnp.where(prompt[1][..., None], onehot, mu) for mu in mus]
    if guidance is None:
      return mus[0]
    return (1.0 - guidance) * mus[1] + guidance * mus[0]

  def self_cond_input(self, params, probs):
    """The self-conditioning input of a distribution μ̂ [.., V]: μ̂ in V-space, μ̂W_sc in embedding space."""
    return embed_probs(probs, model_lib.self_cond_matrix(params)) if self.embedded else probs

  def conditional_input(self, params, state, prompt):
    """(network input, call kwargs) of the conditional pass for a prompt (tokens, mask): a
    prompt-trained model sees the clean prompt state (one-hot, or the row W[x]) and its flag there;
    a model without the flag sees the state itself (inpainting: `readout`)."""
    if not self.prompt_flag:
      return state, {}
    return self.clamp(params, state, prompt), {"prompt_mask": prompt[1]}

  def _passes(self, params, state, prompt, guidance):
    """[(input, kwargs)] of the network passes a conditioned call makes: the conditional one, then,
    when guided, the unconditional one (prompt positions zeroed, read as 'unknown', no flag)."""
    if prompt is None:
      if guidance is not None:
        raise ValueError("guidance needs a prompt (the condition to guide towards)")
      return [(state, {})]
    if guidance is None:
      return [self.conditional_input(params, state, prompt)]
    if not self.prompt_flag:
      raise ValueError("guidance needs a model trained with prompts (flow.prompt.max_len > 0): this one "
                       "was trained without (no prompt flag), so it can be prompted (inpainting) but not guided")
    return [self.conditional_input(params, state, prompt), (prompting.unconditional_input(state, prompt[1]), {})]

  def clamp(self, params, state, prompt):
    """The state with a prompt-trained model's prompt positions at their clean state (the state
    itself for inpainting, `readout`): samplers re-impose it after each update against rounding."""
    if prompt is None or not self.prompt_flag:
      return state
    tokens, mask = prompt
    return jnp.where(mask[..., None], self.clean_state(params, tokens).astype(state.dtype), state)

  def bind(self, params) -> "BoundStateSpace":
    return BoundStateSpace(functools.partial(self.prior, params), functools.partial(self.readout, params),
                           functools.partial(self.clamp, params))


@dataclasses.dataclass(frozen=True)
class BoundStateSpace:
  """A state space with the parameters fixed: what the samplers take."""

  prior: Callable  # (rng, shape) -> state
  readout: Callable  # (state, τ_s, τ_t, *, prompt, guidance, self_cond) -> (ψ, tokens, feed)
  clamp: Callable  # (state, prompt) -> state


def logits_readout(logits_fn, vocab_size: int, prompt_flag: bool = True) -> BoundStateSpace:
  """The V-space samplers' view of a plain `logits_fn(x, τ_s, τ_t, **conditioning)` (exact oracles
  included; with a prompt it is given prompt_mask= unless prompt_flag is False)."""
  space = StateSpace(lambda _, x, ts, tt, **kw: logits_fn(x, ts, tt, **kw), vocab_size, prompt_flag=prompt_flag)
  return space.bind(None)


def from_config(apply_fn, vocab_size: int, config) -> StateSpace:
  """The state space an experiment config asks for (`model.state_space`, `model.vocab_chunk`, ...)."""
  m = config.model  # checked once, by experiment.validate (validate_config below)
  kind = resolve(m.state_space, vocab_size, m.d_model)
  return StateSpace(apply_fn, vocab_size, embedded=kind == "embedding", vocab_chunk=int(m.vocab_chunk),
                    noise=m.embedded_noise, dtype=m.dtype, prompt_flag=prompting.enabled(config))


def validate_config(model_config) -> None:
  """The state-space keys of a config's `model` section (experiment.validate calls this first)."""
  if model_config.state_space not in STATE_SPACES:
    raise ValueError(f"unknown model.state_space={model_config.state_space!r}; choose one of {STATE_SPACES}")
  if model_config.vocab_chunk < 0:
    raise ValueError(f"model.vocab_chunk must be >= 0 (0 = no chunking), got {model_config.vocab_chunk}")
  if model_config.embedded_noise not in NOISE_MODES:
    raise ValueError(f"unknown model.embedded_noise={model_config.embedded_noise!r}; choose one of "
                     f"{NOISE_MODES}")
