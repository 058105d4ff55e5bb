"""Self-distillation teachers for flow maps and the KL that pulls the student onto them (SPEC §3).

A `net(x, gamma_s, gamma_t) -> logits z` here is the flow-map network written in FLOW time γ (the
trainer wraps the model as `lambda x, gs, gt: apply_fn(params, x, g⁻¹(gs), g⁻¹(gt))`), so every
derivative below is a derivative in γ, the time the identities are written in. Times are
per-example arrays [B]; ψ = softmax(z) per position.

Each teacher is a distribution that equals ψ(x, s, t) exactly when the network is the true flow map
of its own diagonal μ(x, γ) = ψ(x, γ, γ), and differs from it otherwise:

- PSD: the semigroup X_{s,t} = X_{u,t} ∘ X_{s,u}, read off the ψ-coefficients.
- LSD: the Lagrangian identity μ(X_{s,t}(x), t) = ψ + g ∂_t ψ, g = (t − s)(1 − t)/(1 − s).
- ESD: the Eulerian identity ψ − κ⁻¹ D_s ψ = μ(x, s), κ = (1 − t)/((1 − s)(t − s)).

For LSD and ESD, ∂ψ = ψ ⊙ δ with δ = ∂z − ⟨ψ, ∂z⟩ (the softmax Jacobian), so each identity says
μ = ψ · r for a per-entry ratio r, and the teacher is softmax(log μ − log r): the network's own
diagonal, reweighted. r is clamped below so a teacher is always a finite distribution, even for a
badly wrong network.

State space (SPEC §4): x may be the V-dim state or its embedding h = xW. The teachers touch x only
through affine updates and the JVP direction, so `embed` (ψ ↦ ψW; identity by default) is all
they need to know: X_{s,u}(h) = a h + b ψW and b_s = (μW − h)/(1 − s). The teachers' outputs are
distributions over V, so they use full [B, L, V] logits: δ = ∂z − ⟨ψ, ∂z⟩ is needed per entry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cfmjax.models import state_space
from cfmjax.sampling.flow_map import broadcast_time, flow_map_update, safe_divide


def _logits(net, x, gamma_s, gamma_t):
  """net's logits, at least float32 (a bfloat16 network must not round the teacher algebra)."""
  z = net(x, gamma_s, gamma_t)
  return z.astype(jnp.promote_types(z.dtype, jnp.float32))


def midpoint(gamma_s, gamma_t):
  """The intermediate time u of the PSD teacher: halfway between s and t (in whichever time is given)."""
  return 0.5 * (gamma_s + gamma_t)


def centered(psi, dz):
  """δ = dz − ⟨ψ, dz⟩ per position, so that d softmax(z) = ψ ⊙ δ."""
  return dz - jnp.sum(psi * dz, axis=-1, keepdims=True)


def time_derivative(net, x, gamma_s, gamma_t):
  """(z, ∂_t z) of z = net(x, s, t): one forward-mode JVP in the end time t."""
  return jax.jvp(lambda t: _logits(net, x, gamma_s, t), (gamma_t,), (jnp.ones_like(gamma_t),))


def base_velocity(mu, x, gamma):
  """b = (μ(x, γ) − x)/(1 − γ), the velocity of the base flow at x (undefined at γ = 1: kept finite)."""
  g = broadcast_time(gamma, x).astype(mu.dtype)
  return safe_divide(mu - x.astype(mu.dtype), 1.0 - g)


def material_derivative(net, x, gamma_s, gamma_t, velocity):
  """(z, D_s z), D_s z = ∂_s z + (∇_x z)·b: one JVP of z = net(x, s, t) in (x, s) along (b, 1).

  D_s is the rate of change of z(x, s, t) seen by a point that rides the base flow from x at s.
  """
  return jax.jvp(lambda y, s: _logits(net, y, s, gamma_t), (x, gamma_s),
                 (velocity.astype(x.dtype), jnp.ones_like(gamma_s)))


def _identity(probs):
  return probs


def psd_teacher(net, x, gamma_s, gamma_u, gamma_t, embed=_identity):
  """a ψ(x, s, u) + b ψ(X_{s,u}(x), u, t), a = (1−t)(u−s)/((1−u)(t−s)), b = 1 − a.

  Expanding X_{u,t}(X_{s,u}(x)) in x and the two ψ's and matching it to X_{s,t}(x) gives exactly
  these weights, so the teacher is what ψ(x, s, t) must be if the short jumps are right. Needs no
  derivatives. b is written as 1 − a (the same number) so that a diagonal row s = u = t, where the
  ratio is 0/0, gets the finite teacher ψ(x, t, t).
  """
  psi_su = jax.nn.softmax(_logits(net, x, gamma_s, gamma_u), axis=-1)
  x_u = flow_map_update(x, embed(psi_su), gamma_s, gamma_u)
  psi_ut = jax.nn.softmax(_logits(net, x_u, gamma_u, gamma_t), axis=-1)
  s, u, t = (broadcast_time(g, psi_su).astype(psi_su.dtype) for g in (gamma_s, gamma_u, gamma_t))
  a = safe_divide((1.0 - t) * (u - s), (1.0 - u) * (t - s))
  return a * psi_su + (1.0 - a) * psi_ut


# ----------------------------------------------------------------------------------------------
# The same teachers without a [.., V] array (issue 16): each returns a chunked teacher of
# `state_space` built from the teacher network's hidden states, which the student's vocabulary-
# chunked output reduction (`state_space.vocab_stats`) rebuilds one chunk at a time. The network is
# given as `hidden_net(x, gamma_s, gamma_t) -> (hidden, skip)` in flow time and `stats(hidden, skip,
# with_embedding, tangent) -> vocab_stats` (StateSpace.hidden / hidden_stats); `head` = (kernel, bias);
# `normalise(RatioTeacher) -> RatioTeacher` fills in its log-normaliser (state_space.ratio_teacher).
# tests/test_state_space.py checks values and gradients against the full-logit teachers above.


def psd_teacher_chunked(hidden_net, stats, head, x, gamma_s, gamma_u, gamma_t):
  """`psd_teacher` as a MixtureTeacher: X_{s,u} needs only ψW, the first call's chunked mean embedding."""
  h_su, skip_su = hidden_net(x, gamma_s, gamma_u)
  stats_su = stats(h_su, skip_su, True, None)
  x_u = flow_map_update(x, stats_su["mean_embedding"], gamma_s, gamma_u)
  h_ut, skip_ut = hidden_net(x_u, gamma_u, gamma_t)
  stats_ut = stats(h_ut, skip_ut, False, None)
  s, u, t = (broadcast_time(g, stats_su["lse"]).astype(jnp.float32) for g in (gamma_s, gamma_u, gamma_t))
  a = safe_divide((1.0 - t) * (u - s), (1.0 - u) * (t - s))
  kernel, bias = head
  return state_space.MixtureTeacher(weights=(a, 1.0 - a), hiddens=(h_su, h_ut), skips=(skip_su, skip_ut),
                                    lses=(stats_su["lse"], stats_ut["lse"]), kernel=kernel, bias=bias)


def _tangent_skip(skip, tangent):
  """The skip term's tangent in the form `_chunk_logits` reads: its features move, its kernel does not."""
  return None if skip is None else (tangent[0], skip[1])


def lsd_teacher_chunked(hidden_net, stats, normalise, head, x, gamma_s, gamma_t, min_ratio: float):
  """`lsd_teacher` as a RatioTeacher: one JVP in t of the hidden state gives ∂z through the head."""
  (h, skip), (dh, dskip) = jax.jvp(lambda t: hidden_net(x, gamma_s, t), (gamma_t,), (jnp.ones_like(gamma_t),))
  tangent = (dh, _tangent_skip(skip, dskip))
  first = stats(h, skip, True, tangent)
  x_t = flow_map_update(x, first["mean_embedding"], gamma_s, gamma_t)
  h_diag, skip_diag = hidden_net(x_t, gamma_t, gamma_t)
  s, t = (broadcast_time(g, first["lse"][..., None]).astype(jnp.float32) for g in (gamma_s, gamma_t))
  g = safe_divide((t - s) * (1.0 - t), 1.0 - s)
  kernel, bias = head
  teacher = state_space.RatioTeacher(
      diag_hidden=h_diag, diag_skip=skip_diag, tangent_hidden=tangent[0], tangent_skip=tangent[1],
      mean_tangent=first["mean_tangent"], c0=jnp.ones_like(g), c1=g, floor=jnp.full_like(g, min_ratio),
      lse=jnp.zeros_like(first["lse"]), kernel=kernel, bias=bias)
  return normalise(teacher)


def esd_teacher_chunked(hidden_net, stats, normalise, head, x, gamma_s, gamma_t, min_ratio: float):
  """`esd_teacher` as a RatioTeacher: the base velocity from the diagonal's chunked ψW, then one JVP in
  (x, s) of the hidden state."""
  h_diag, skip_diag = hidden_net(x, gamma_s, gamma_s)
  diag = stats(h_diag, skip_diag, True, None)
  velocity = base_velocity(diag["mean_embedding"], x, gamma_s)
  (h, skip), (dh, dskip) = jax.jvp(lambda y, s: hidden_net(y, s, gamma_t), (x, gamma_s),
                                   (velocity.astype(x.dtype), jnp.ones_like(gamma_s)))
  tangent = (dh, _tangent_skip(skip, dskip))
  first = stats(h, skip, False, tangent)
  s, t = (broadcast_time(g, first["lse"][..., None]).astype(jnp.float32) for g in (gamma_s, gamma_t))
  floor = jnp.maximum(min_ratio * (1.0 - t), jnp.finfo(jnp.float32).tiny)
  kernel, bias = head
  teacher = state_space.RatioTeacher(
      diag_hidden=h_diag, diag_skip=skip_diag, tangent_hidden=tangent[0], tangent_skip=tangent[1],
      mean_tangent=first["mean_tangent"], c0=1.0 - t, c1=-(1.0 - s) * (t - s), floor=floor,
      lse=jnp.zeros_like(first["lse"]), kernel=kernel, bias=bias)
  return normalise(teacher)


def lsd_teacher(net, x, gamma_s, gamma_t, min_ratio: float = 1e-3, embed=_identity):
  """softmax(z(X_{s,t}(x), t, t) − log max(1 + g δ, min_ratio)), g = (t − s)(1 − t)/(1 − s).

  δ = ∂_t z − ⟨ψ, ∂_t z⟩ from one JVP in t. The identity μ(X_{s,t}(x), t) = ψ (1 + g δ) says that
  dividing the diagonal at the jump's landing point by (1 + g δ) recovers ψ when the map is
  consistent. 1 + g δ is nominally of order 1, hence the absolute floor `min_ratio`.
  """
  z, dz_dt = time_derivative(net, x, gamma_s, gamma_t)
  psi = jax.nn.softmax(z, axis=-1)
  delta = centered(psi, dz_dt)
  s, t = (broadcast_time(g, z).astype(z.dtype) for g in (gamma_s, gamma_t))
  g = safe_divide((t - s) * (1.0 - t), 1.0 - s)
  x_t = flow_map_update(x.astype(z.dtype), embed(psi), gamma_s, gamma_t).astype(x.dtype)
  z_diag = _logits(net, x_t, gamma_t, gamma_t)
  ratio = jnp.maximum(1.0 + g * delta, min_ratio)
  return jax.nn.softmax(z_diag - jnp.log(ratio), axis=-1)


def esd_teacher(net, x, gamma_s, gamma_t, min_ratio: float = 1e-3, embed=_identity):
  """softmax(z(x, s, s) − log max((1 − t) − (1 − s)(t − s) δ, min_ratio (1 − t))).

  δ = D_s z − ⟨ψ, D_s z⟩ from one JVP in (x, s) along the base velocity b_s = (μ(x, s) − x)/(1 − s).
  The identity (1 − t) μ(x, s) = ψ ((1 − t) − (1 − s)(t − s) δ) says that dividing the diagonal at
  the start point by that factor recovers ψ. The factor's nominal scale is 1 − t (its value at
  s = t), so the floor scales with it; a float `tiny` under it keeps t = 1 finite.
  """
  z_diag = _logits(net, x, gamma_s, gamma_s)
  velocity = base_velocity(embed(jax.nn.softmax(z_diag, axis=-1)), x, gamma_s)
  z, dz = material_derivative(net, x, gamma_s, gamma_t, velocity)
  psi = jax.nn.softmax(z, axis=-1)
  delta = centered(psi, dz)
  s, t = (broadcast_time(g, z).astype(z.dtype) for g in (gamma_s, gamma_t))
  factor = (1.0 - t) - (1.0 - s) * (t - s) * delta
  floor = jnp.maximum(min_ratio * (1.0 - t), jnp.finfo(z.dtype).tiny)
  return jax.nn.softmax(z_diag - jnp.log(jnp.maximum(factor, floor)), axis=-1)


def kl_to_teacher(teacher_probs, student_logits):
  """KL(teacher ‖ softmax(student)) per position [B, L], the teacher under stop_gradient.

  The forward KL's gradient in the student logits is softmax(student) − teacher: a plain
  cross-entropy pull, plus the teacher's entropy so that the value is 0 at the optimum. 0 log 0 = 0.
  """
  logits = student_logits.astype(jnp.promote_types(student_logits.dtype, jnp.float32))
  teacher = jax.lax.stop_gradient(teacher_probs).astype(logits.dtype)
  log_q = jax.nn.log_softmax(logits, axis=-1)
  neg_entropy = jnp.sum(jax.scipy.special.xlogy(teacher, teacher), axis=-1)
  return neg_entropy - jnp.sum(teacher * log_q, axis=-1)
