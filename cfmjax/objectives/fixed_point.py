"""Fixed-point flows (FMLM*, SPEC §8): the self-conditioning iteration and its distillation.

A self-conditioned denoiser defines, at each (x, γ), the map T(μ̂) = μθ(x, γ, μ̂) on the simplex.
Sampling with self-conditioning runs one step of the iteration μ_{k+1} = T(μ_k) per flow step,
starting from μ_0 = 0; its limit μ* = T(μ*) is the bootstrapped denoiser.

Fixed-point distillation (`fixed_point_loss`) compresses the iteration into one plain pass: the
student S(x, γ) = μθ'(x, γ, μ̂ = 0) is trained with KL(target ‖ S), where the target is k more
teacher iterations started from the student's own (stop-gradient) estimate,
target = T^k(stopgrad S(x, γ)), T the frozen self-conditioned base. This is a consistency
objective over the iteration index: at the start S = T(0) = μ_1 and the target is μ_{1+k}; each
improvement of S moves the target further along the iteration, and the only fixed point of the
objective is S = T^k(S), i.e. S = μ* when T contracts. It needs k + 1 passes per step whatever the
depth of the iteration it distils (k = `distill.fixed_point_iters`, 1 by default), instead of
unrolling the whole iteration for every target; the student needs no iteration-index input,
since it only ever answers for the limit. The resulting single-pass flow is then distilled into a
flow map by the ordinary distillation stage (its μ̂ input stays 0, which is the plain pass).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cfmjax.flow import corruption
from cfmjax.models import state_space
from cfmjax.objectives import distill_losses


def iterate(denoise_fn, mu_init, num_iters: int):
  """Runs μ_{k+1} = softmax(denoise_fn(μ_k)) from μ_init (the zero estimate μ_0 = 0 at sampling).

  denoise_fn(μ̂ [B, L, V]) -> logits at one fixed state and time. Returns (μ_K [B, L, V], residuals
  [K]): residual k = mean over positions of ‖μ_{k+1} − μ_k‖₁, so residuals[0] is the distance of the
  first estimate from μ_init.
  """
  def step(mu, _):
    new = jax.nn.softmax(denoise_fn(mu).astype(jnp.float32), axis=-1)
    return new, jnp.mean(jnp.sum(jnp.abs(new - mu), axis=-1))

  return jax.lax.scan(step, mu_init.astype(jnp.float32), None, length=num_iters)


def fixed_point_loss(params, base, tokens, rng, *, space: state_space.StateSpace, schedule, num_iters: int = 1):
  """KL(T^k(stopgrad S) ‖ S) at τ ~ stratified U(0, 1) (see the module docstring). (loss, metrics).

  Either state space: student and frozen teacher see one draw of ε through their own W, and the
  teacher's μ̂ input is μ̂ or μ̂W_sc (`StateSpace.self_cond_input`)."""
  rng_time, rng_noise = jax.random.split(rng)
  tau = corruption.stratified_uniform(rng_time, tokens.shape[0])
  teacher = jax.lax.stop_gradient(base)  # the frozen base (frozen_teacher.py) never trains
  x, x_teacher = space.noisy_states(params, teacher, rng_noise, tokens, schedule.gamma(tau))
  student_logits = space.logits(params, x, tau, tau)  # μ̂ = 0: the single pass being trained
  student = jax.lax.stop_gradient(jax.nn.softmax(student_logits.astype(jnp.float32), axis=-1))
  denoise = lambda mu: space.logits(teacher, x_teacher, tau, tau, self_cond=space.self_cond_input(teacher, mu))
  target, _ = iterate(denoise, student, num_iters)
  target = jax.lax.stop_gradient(target)
  kl = distill_losses.kl_to_teacher(target, student_logits)
  loss = jnp.mean(kl)
  return loss, {"loss": loss, "fixed_point_kl": loss,
                "fixed_point_gap": jnp.mean(jnp.sum(jnp.abs(target - student), axis=-1)),
                "accuracy": jnp.mean(jnp.argmax(student_logits, axis=-1) == tokens)}


def make_grad_fn(space: state_space.StateSpace, schedule, config):
  """(params, tokens, rng, ema_params, step, frozen_base) -> (grads, metrics) for objective = 'fixed_point'."""
  grad = jax.value_and_grad(fixed_point_loss, has_aux=True)

  def grad_fn(params, tokens, rng, ema_params, step, frozen_base=None):
    del ema_params, step  # the teacher is the frozen base, and there is no curriculum
    (_, metrics), grads = grad(params, frozen_base, tokens, rng, space=space, schedule=schedule,
                               num_iters=config.distill.fixed_point_iters)
    return grads, metrics

  return grad_fn
