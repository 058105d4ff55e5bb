"""Scoring generated text (SPEC §7): judges, unigram entropy, and the results file.

A record in `eval/results.json` describes one (sampler, steps, judge) evaluation:
  sampler, steps, judge, num_samples, gen_nll_per_token, gen_ppl, entropy, data_entropy,
  and for the Markov source entropy_rate (nats/token) and data_nll_per_token (the exact expected
  per-token NLL of real sequences of this length, the floor gen_nll_per_token is judged against).
The judge field is the judge's short name (judges.py): exact, ar:<workdir name>, gpt2:<directory name>,
or none. Samples of an autoregressive model have sampler "ar" and steps = L (one network evaluation
per position); its `cfmjax eval` also writes metric = "nll_per_token", value, ppl, num_tokens (the
exact held-out NLL). A likelihood-bound record (`cfmjax eval --likelihood`) carries metric = "nll_bound_per_token", value,
stderr, ppl_bound and num_tokens (SPEC §5), the chosen endpoint lambda_max, the report_rows /
selection_rows index ranges, the selection's candidates with their values and bound_space ("vocab" or
"embedding": which bound, `likelihood_bound`). On the Markov source `cfmjax eval --sampler=euler` also writes,
per step count, a record with sampler "euler_exact": the same Euler sampler (schedule, τ grid, number of
samples, seed) with the exact posterior (SPEC §9) in place of the network, judged exactly (`exact_reference_record`).
"""

from __future__ import annotations

import json
import math
import os
import zlib
from typing import Callable, NamedTuple

import jax
import numpy as np

from cfmjax.evaluation import diagnostics, judges, likelihood
from cfmjax.flow import oracles
from cfmjax.flow.scores import exact_markov_conditional_nll, unigram_entropy
from cfmjax.models import state_space
from cfmjax.parallel import sharding

EXACT_SAMPLER = "euler_exact"  # the Euler sampler run with the exact Markov posterior (SPEC §9)


def score(data, tokens, held_out, judge="default", prompt_len: int = 0) -> dict:
  """Judges `tokens` with `judge` (a judges.Judge; None: no judge; "default": the data's own, exact
  for the Markov source). gen_ppl = exp(Σ NLL / Σ scored tokens), pooled over all samples.

  With `prompt_len` > 0 the first prompt_len positions were given, not generated: the NLL is of the
  rest given them (the exact judge only, for now), and both entropies are of positions prompt_len on.
  """
  record = {"num_samples": int(len(tokens)), "entropy": unigram_entropy(np.asarray(tokens)[:, prompt_len:]),
            "data_entropy": unigram_entropy(np.asarray(held_out)[:, prompt_len:])}
  if judge == "default":
    judge = judges.default_judge(data)
  if prompt_len and judge is not None and not isinstance(judge, judges.ExactMarkovJudge):
    raise ValueError(f"--prompt_len scores a continuation given its prompt, which only the exact judge "
                     f"does for now; got judge {judge.name} (use --judge=none or the Markov source)")
  if judge is None:
    record.update(judge="none", gen_nll_per_token=None, gen_ppl=None)
  elif prompt_len:
    nll = exact_markov_conditional_nll(judge.markov, tokens, prompt_len)
    record.update(judge=judge.name, gen_nll_per_token=nll, gen_ppl=math.exp(nll),
                  num_scored_tokens=int(np.asarray(tokens)[:, prompt_len:].size))
  else:
    total, count = judges.judge_samples(judge, tokens, data.tokenizer)
    nll = total / count
    record.update(judge=judge.name, gen_nll_per_token=nll, gen_ppl=math.exp(nll) if nll < 700 else None,
                  num_scored_tokens=count)
  if data.markov is not None:
    record.update(entropy_rate=data.markov.entropy_rate(),
                  data_nll_per_token=data.markov.expected_nll_per_token(tokens.shape[1]))
    if prompt_len >= data.markov.order:  # a stationary chain given a full context: the entropy rate
      record["data_nll_per_token"] = data.markov.entropy_rate()
  return record


def exact_reference_record(exp, steps: int, num_samples: int, batch_size: int, seed: int, held_out,
                           progress=None) -> dict:
  """The "euler_exact" record: Euler at `steps` with the exact denoiser of the experiment's Markov source,
  on the experiment's schedule, judged by the exact judge (whatever judge scores the model)."""
  if exp.data.markov is None:
    raise ValueError("the exact reference sampler needs the Markov source (data.source='markov')")
  posterior = oracles.MarkovPosterior.from_source(exp.data.markov)
  tokens = diagnostics.exact_euler_sample(posterior, exp.schedule, steps, num_samples, exp.config.data.seq_len,
                                          batch_size, seed)
  if progress is not None:
    progress(num_samples, num_samples)
  record = {"sampler": EXACT_SAMPLER, "steps": steps, "schedule": exp.schedule.name}
  record.update(score(exp.data, tokens, held_out, judges.ExactMarkovJudge(exp.data.markov)))
  return record


LIKELIHOOD_ELEMENTS_PER_CALL = 2**25  # rows × L × V per network call of the bound (logits and V-space x)


def likelihood_bound(exp, params, report_rows: int, seed: int, progress=None, *, selection_rows: int = 64,
                     settings: likelihood.BoundSettings = likelihood.BoundSettings(), bound_space: str = "auto") -> dict:
  """The SPEC §5 bound under the model's denoiser (EMA parameters), λ1 chosen on held-out rows that
  are not reported (SPEC §9).

  Rows: `exp.data.eval_rows(report_rows + selection_rows)` (the first rows of the validation stream
  for Markov, of the single held-out split for text; a fixed prefix whatever N). The report split is
  rows [0, report_rows) (the same rows a plain `eval_rows(report_rows)` gives), the selection split
  rows [report_rows, report_rows + selection_rows); the record names both ranges. λ1 (among
  `settings.candidates`) and the λ proposal are fitted on the selection split only (`likelihood.bound_with_selection`).

  The network is called through the experiment's state space (`state_space.from_config`): V-space
  x_γ, or h_γ = x_γW for an embedding-space model, with the output reduced per vocabulary chunk when
  model.vocab_chunk > 0. Rows per network call (settings.batch_size) are capped so that rows × L × V stays
  under LIKELIHOOD_ELEMENTS_PER_CALL (points per call shrink first, then the batch).

  `bound_space` (recorded as the record's bound_space): "vocab" is the V-space bound (Brier ‖e_x1 − μ‖²);
  "embedding" the ELBO of the diffusion of h itself (whitened Brier ‖C⁻¹(W_x1 − μW)ᵀ‖², prior from the
  tokens' leverages; likelihood.py), the tight one when the network sees only h = xW with V > D;
  "auto" picks "embedding" exactly then (embedding state and V > D), "vocab" otherwise.
  """
  setup = _bound_setup(exp, settings, bound_space)
  if report_rows < 2 or selection_rows < 2:
    raise ValueError(f"the likelihood bound needs at least 2 report and 2 selection rows, got "
                     f"{report_rows} and {selection_rows}")
  report, selection, split = exp.data.bound_rows(report_rows, selection_rows)
  record = likelihood.bound_with_selection(setup.compile_fn, setup.terms, params, report, selection,
                                           settings=setup.settings, seed=seed, progress=progress)
  record.update(split, state_space="embedding" if setup.space.embedded else "vocab", bound_space=setup.bound_space)
  return record


class _BoundSetup(NamedTuple):
  space: state_space.StateSpace
  bound_space: str  # "vocab" | "embedding", resolved
  terms: likelihood.Terms  # likelihood.state_space_terms
  compile_fn: Callable  # f(params, rows, rng) -> a sharded jitted call on numpy rows
  settings: likelihood.BoundSettings  # batch_size (a multiple of the data-parallel size) and points per call capped


def _bound_setup(exp, settings: likelihood.BoundSettings, bound_space: str) -> _BoundSetup:
  """The network's bound terms and their sharded compilation (see `likelihood_bound`)."""
  space = state_space.from_config(exp.apply_fn, exp.vocab_size, exp.config)
  if bound_space not in ("auto", "vocab", "embedding"):
    raise ValueError(f"unknown likelihood bound space {bound_space!r}; choose auto, vocab or embedding")
  if bound_space == "auto":
    bound_space = "embedding" if space.embedded and exp.vocab_size > exp.config.model.d_model else "vocab"
  if bound_space == "embedding" and not space.embedded:
    raise ValueError("the embedding-space bound needs an embedding-space model (model.state_space)")
  dp = sharding.data_parallel_size(exp.mesh, exp.rules)
  per_row = exp.config.data.seq_len * exp.vocab_size
  batch_size = max(1, min(settings.batch_size, LIKELIHOOD_ELEMENTS_PER_CALL // per_row))
  batch_size = max(dp, batch_size // dp * dp)
  points_per_call = int(np.clip(LIKELIHOOD_ELEMENTS_PER_CALL // (batch_size * per_row), 1, settings.points_per_call))
  settings = settings._replace(batch_size=batch_size, points_per_call=points_per_call)
  terms = likelihood.state_space_terms(space, exp.schedule, bound_space)

  def compile_fn(fn):
    jitted = jax.jit(fn, in_shardings=(exp.state_shardings["ema_params"], exp.batch_sharding, None))

    def call(params, chunk, rng):
      with exp.activate():
        # Every process holds the same rows; each device takes its slice of them.
        return sharding.to_host(jitted(params, sharding.global_rows(chunk, exp.batch_sharding), rng))

    return call

  return _BoundSetup(space, bound_space, terms, compile_fn, settings)


def bound_endpoint(exp, params, selection_rows: int = 64, *, batch_size: int = 64, seed: int = 0,
                   bound_space: str = "auto") -> dict:
  """λ1 and the λ proposal (`likelihood.select_endpoint`) fitted on the first `selection_rows` of the
  bound's selection split: what `conditional_bounds` scores any other rows with."""
  setup = _bound_setup(exp, likelihood.BoundSettings(batch_size=batch_size), bound_space)
  _, selection, _ = exp.data.bound_rows(2, selection_rows)
  run_pilot = setup.compile_fn(likelihood.pilot_fn(setup.terms, setup.settings))
  record = likelihood.select_endpoint(run_pilot, params, selection, settings=setup.settings, seed=seed + 1)
  return dict(record, bound_space=setup.bound_space)


def conditional_scorer(exp, endpoint: dict, *, num_points: int = 128, batch_size: int = 64):
  """score(params, tokens [N, L] int, scored [N, L], seed) -> per row, a bound in nats on
  −log p(tokens at scored positions | the rest, clean) (SPEC §5; the conditional form of
  `likelihood`'s module docstring), at `endpoint`'s λ1 and proposal; scored 1: bounded, 0: clean
  context. Compiled once: build it once and call it for every batch of requests.

  Each row draws its λ points and noise from a key made of `seed` and the row's own content, so a
  row's bound does not depend on which rows share its batch or in which order they come (lm-eval
  reorders requests)."""
  setup = _bound_setup(exp, likelihood.BoundSettings(num_points=num_points, batch_size=batch_size),
                       endpoint["bound_space"])
  report = likelihood.report_fn(setup.terms, setup.settings, lambda_max=endpoint["lambda_max"],
                                proposal=endpoint["proposal"])

  def per_row(params, rows, _):
    def one(tok, sc, key_data):
      total, _, _ = report(params, (tok[None], sc[None]), jax.random.wrap_key_data(key_data))
      return total[0]
    return (jax.vmap(one)(*rows),)

  run = setup.compile_fn(per_row)

  def score(params, tokens, scored, seed: int = 0) -> np.ndarray:
    tokens, scored = np.asarray(tokens, np.int32), np.asarray(scored, np.float32)
    hashes = np.asarray([zlib.crc32(t.tobytes() + s.tobytes()) & 0x7FFFFFFF for t, s in zip(tokens, scored)],
                        np.uint32)
    keys = np.asarray(jax.random.key_data(jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), hashes)))
    (total,) = likelihood.batched(run, params, (tokens, scored, keys), setup.settings.batch_size, seed)
    return total

  return score


def conditional_bounds(exp, params, tokens, scored, endpoint: dict, *, num_points: int = 128, batch_size: int = 64,
                       seed: int = 0) -> np.ndarray:
  """`conditional_scorer`'s bounds of these rows, compiled for this one call."""
  return conditional_scorer(exp, endpoint, num_points=num_points, batch_size=batch_size)(params, tokens, scored, seed)


def writes_files() -> bool:
  """Whether this process writes eval outputs: process 0 of a multi-process job (the others computed
  their share and hold the same gathered numbers)."""
  return jax.process_index() == 0


def write_results(path: str, new_records: list[dict]) -> list[dict]:
  """Merges records into `path`, replacing earlier ones with the same (sampler, steps, judge, metric)."""
  key = lambda r: (r.get("sampler"), r.get("steps"), r.get("judge"), r.get("metric"), r.get("prompt_len"),
                   r.get("guidance"), r.get("renoise"), r.get("precision"), r.get("bound_space"))
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
