"""Numbers of a batch of sampled token ids that need no model: unigram entropy and the exact NLL under a
Markov chain (SPEC §6, §7). Shared by `evaluate` (the results file) and `diagnostics` (training logs)."""

from __future__ import annotations

import numpy as np


def unigram_entropy(tokens) -> float:
  """Mean over sequences of −Σ_v (c_v/L) ln(c_v/L) over each sequence's own token counts."""
  tokens = np.asarray(tokens)
  values = []
  for row in tokens:
    counts = np.bincount(row)
    p = counts[counts > 0] / row.size
    values.append(float(-np.sum(p * np.log(p))))
  return float(np.mean(values))


def exact_markov_nll(markov, tokens) -> float:
  """Σ NLL / Σ tokens under the true chain (pooled, as generative perplexity is defined)."""
  tokens = np.asarray(tokens)
  return float(-np.sum(markov.log_likelihood(tokens)) / tokens.size)


def exact_markov_conditional_nll(markov, tokens, prompt_len: int) -> float:
  """Σ −log p(x_{P:} | x_{:P}) / Σ generated tokens under the true chain: the prompt is not judged.

  log p(rest | prefix) = log p(whole row) − log p(prefix), both exact.
  """
  tokens = np.asarray(tokens)
  full = markov.log_likelihood(tokens)
  prefix = markov.log_likelihood(tokens[:, :prompt_len]) if prompt_len else np.zeros(len(tokens))
  return float(-np.sum(full - prefix) / (tokens.shape[0] * (tokens.shape[1] - prompt_len)))
