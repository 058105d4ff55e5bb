"""Scoring generated text (SPEC §7): judges, unigram entropy, and the results file.

A record in `eval/results.json` describes one (sampler, steps, judge) evaluation:
  sampler, steps, judge, num_samples, gen_nll_per_token, gen_ppl, entropy, data_entropy,
  and for the Markov source entropy_rate (nats/token) and data_nll_per_token (the exact expected
  per-token NLL of real sequences of this length, the floor gen_nll_per_token is judged against).
A likelihood-bound record (`cfmjax eval --likelihood`) carries metric = "nll_bound_per_token", value,
stderr, ppl_bound and num_tokens (SPEC §5).
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np

from cfmjax import likelihood, sharding


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


def score(data, tokens, held_out, prompt_len: int = 0) -> dict:
  """Judges `tokens` with the best judge the data source offers.

  With `prompt_len` > 0 the first prompt_len positions were given, not generated: the NLL is of the
  rest given them, and both entropies are of positions prompt_len onwards.
  """
  record = {"num_samples": int(len(tokens)), "entropy": unigram_entropy(tokens[:, prompt_len:]),
            "data_entropy": unigram_entropy(held_out[:, prompt_len:])}
  if data.markov is not None:
    nll = exact_markov_conditional_nll(data.markov, tokens, prompt_len)
    record.update(judge="exact", gen_nll_per_token=nll, gen_ppl=math.exp(nll),
                  entropy_rate=data.markov.entropy_rate(),
                  data_nll_per_token=data.markov.expected_nll_per_token(tokens.shape[1]))
    if prompt_len >= data.markov.order:  # a stationary chain given a full context: the entropy rate
      record["data_nll_per_token"] = data.markov.entropy_rate()
  else:
    # Model judges for text (an autoregressive cfmjax model, GPT-2) arrive with the evaluation suite.
    record.update(judge="none", gen_nll_per_token=None, gen_ppl=None)
  return record


def likelihood_bound(exp, params, rows, num_points: int, batch_size: int, seed: int, progress=None) -> dict:
  """The SPEC §5 bound on held-out `rows` [N, L] under the model's denoiser (EMA parameters)."""
  dp = sharding.data_parallel_size(exp.mesh, exp.rules)
  batch_size = max(dp, batch_size // dp * dp)
  num_rows = len(rows) // batch_size * batch_size
  if num_rows == 0:
    raise ValueError(f"need at least {batch_size} held-out rows for the likelihood bound, got {len(rows)}")

  def bounds(params, tokens, rng):
    denoise = lambda x, gamma: exp.apply_fn(params, x, exp.schedule.tau(gamma), exp.schedule.tau(gamma))
    return likelihood.sequence_bounds(denoise, tokens, rng, exp.vocab_size, num_points=num_points,
                                      points_per_call=min(16, num_points))[0]

  fn = jax.jit(bounds, in_shardings=(exp.state_shardings["ema_params"], exp.batch_sharding, None))
  per_sequence = []
  with jax.set_mesh(exp.mesh):
    for i in range(0, num_rows, batch_size):
      chunk = np.asarray(rows[i:i + batch_size])
      # Every process holds the same held-out rows; each device takes its slice of them.
      tokens = jax.make_array_from_callback(chunk.shape, exp.batch_sharding, lambda idx: chunk[idx])
      per_sequence.append(np.asarray(fn(params, tokens, jax.random.key(seed + i))))
      if progress is not None:
        progress(i + batch_size, num_rows)
  record = likelihood.summarize(np.concatenate(per_sequence), rows.shape[1])
  record["num_points"] = num_points
  return record


def write_results(path: str, new_records: list[dict]) -> list[dict]:
  """Merges records into `path`, replacing earlier ones with the same (sampler, steps, judge, metric)."""
  key = lambda r: (r.get("sampler"), r.get("steps"), r.get("judge"), r.get("metric"), r.get("prompt_len"),
                   r.get("guidance"), r.get("renoise"))
  records = []
  if os.path.exists(path):
    with open(path) as f:
      records = json.load(f)
  replaced = {key(r) for r in new_records}
  records = [r for r in records if key(r) not in replaced] + list(new_records)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(records, f, indent=2)
  os.replace(tmp, path)
  return records


def format_table(records: list[dict]) -> str:
  records = [r for r in records if "sampler" in r]
  cols = ["sampler", "steps", "prompt_len", "guidance", "renoise", "judge", "num_samples", "gen_nll_per_token", "gen_ppl", "entropy",
          "data_entropy", "entropy_rate", "data_nll_per_token"]
  cols = [c for c in cols if any(c in r for r in records)]
  fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in records]
  return "\n".join(lines)
