"""The likelihood bound (SPEC §5) against the exact NLL of a finite-support toy (SPEC §6)."""

import jax
import jax.numpy as jnp
import numpy as np

from cfmjax import likelihood, oracles


def _estimate(denoise_fn, toy, tokens, seed):
  fn = jax.jit(lambda t, r: likelihood.sequence_bounds(denoise_fn, t, r, toy.vocab_size, num_points=256,
                                                       points_per_call=32)[0])
  return np.asarray(fn(jnp.asarray(tokens), jax.random.key(seed)), np.float64)


def test_bound_is_tight_at_the_exact_denoiser_and_loose_when_perturbed():
  toy = oracles.random_finite_support(seed=1, num_sequences=6, length=3, vocab_size=4, concentration=2.0)
  rng = np.random.default_rng(0)
  tokens = toy.sequences[rng.choice(len(toy.probs), size=1024, p=toy.probs)]
  true_nll = toy.nll(tokens)

  exact = lambda x, gamma: toy.denoiser_logits(x, gamma)
  bound = _estimate(exact, toy, tokens, seed=0)
  diff = bound - true_nll  # paired: same sequences
  mean, stderr = diff.mean(), diff.std(ddof=1) / np.sqrt(len(diff))
  print(f"exact denoiser: bound {bound.mean():.4f} vs true NLL {true_nll.mean():.4f} "
        f"(diff {mean:.4f} +- {stderr:.4f})")
  assert abs(mean) < 4 * stderr + 1e-3
  assert abs(bound.mean() / true_nll.mean() - 1) < 0.02

  # A too-flat denoiser (logits cooled by 0.6) is not the posterior: its bound is clearly looser.
  flat = lambda x, gamma: 0.6 * jnp.maximum(toy.denoiser_logits(x, gamma), -30.0)
  loose = _estimate(flat, toy, tokens, seed=0)
  gap = loose - true_nll
  print(f"perturbed denoiser: bound {loose.mean():.4f} (gap {gap.mean():.4f} +- "
        f"{gap.std(ddof=1) / np.sqrt(len(gap)):.4f})")
  assert gap.mean() > 5 * gap.std(ddof=1) / np.sqrt(len(gap))
  assert loose.mean() > 1.05 * true_nll.mean()


def test_summary_reports_per_token_bound_and_stderr():
  s = likelihood.summarize(np.array([10.0, 12.0, 14.0]), length=4)
  assert s["metric"] == "nll_bound_per_token" and s["num_tokens"] == 12
  assert np.isclose(s["value"], 3.0) and np.isclose(s["ppl_bound"], np.exp(3.0))
  assert np.isclose(s["stderr"], 2.0 / np.sqrt(3) / 4)
