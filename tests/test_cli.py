"""End to end through the command line: train -> (resume) -> sample -> eval on the Markov source.

In process (conftest.run_cli) where the process boundary is not the point; `cfmjax()` starts the
real command for the tests where it is."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cfmjax.data.markov import MarkovSource
from cfmjax.run import schema
from tests.conftest import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfmjax(*args, env_extra=None):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  env.update(env_extra or {})
  proc = subprocess.run([sys.executable, "-m", "cfmjax", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f"cfmjax {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
  return proc


def _unigram_entropy(tokens):
  """Mean over rows of the entropy of each row's own token frequencies (numpy, written out here)."""
  out = []
  for row in np.asarray(tokens):
    _, counts = np.unique(row, return_counts=True)
    p = counts / row.size
    out.append(-(p * np.log(p)).sum())
  return float(np.mean(out))


def test_train_sample_eval_on_markov(markov_base, tmp_path):
  """`cfmjax train` (2 steps, then resumed to 4), `sample` and `eval` (in process: the CLI's own
  code path; `markov_base` in conftest.py), and the eval record against the exact judge computed here."""
  workdir, resumed_log = markov_base
  assert "resumed from step 2" in resumed_log
  for name in ("config.json", "metrics.jsonl", "checkpoints", "tensorboard"):
    assert (workdir / name).exists(), name
  config = json.loads((workdir / "config.json").read_text())
  # config.json is the request; the vocabulary it led to (the overridden data source's) is in run.json.
  assert config["data"]["markov"]["vocab_size"] == 12 and "vocab_size" not in config["model"]
  # run.json: one entry per start (trained to 2, resumed to 4), with what config.json does not say.
  starts = json.loads((workdir / "run.json").read_text())["starts"]
  assert [s["from_step"] for s in starts] == [0, 2]
  assert starts[1]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and starts[1]["devices"] == 8
  assert (starts[1]["objective"], starts[1]["vocab_size"], starts[1]["state_space"]) == ("flow", 12, "vocab")
  assert starts[1]["versions"]["jax"] == jax.__version__ and starts[1]["schema_version"] == schema.VERSION
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
  assert any("eval_loss" in r for r in records)

  # Outputs go to another directory (--checkpoint=the shared run --workdir=here).
  out = tmp_path / "out"
  run_cli("sample", f"--checkpoint={workdir}", f"--workdir={out}", "--steps=8", "--num_samples=16",
          "--batch_size=16", "--sample_precision=float64")
  (sample_file,) = (out / "samples").glob("*.jsonl")
  samples = [json.loads(line) for line in sample_file.read_text().splitlines()]
  assert len(samples) == 16 and all(len(s["tokens"]) == 16 for s in samples)
  assert all(0 <= t < 12 for s in samples for t in s["tokens"])
  assert all(s["checkpoint_step"] == 4 for s in samples)

  run_cli("eval", f"--checkpoint={workdir}", f"--workdir={out}", "--sampler=euler", "--steps=8,2",
          "--num_samples=16", "--likelihood", "--likelihood_points=32", "--likelihood_rows=32",
          "--likelihood_selection_rows=16", "--likelihood_endpoints=2,4,6", "--batch_size=16",
          "--sample_precision=float64")
  records = json.loads((out / "eval" / "results.json").read_text())
  # Each model record is followed by the same sampler with the exact denoiser (--exact_reference, on by default).
  assert [(r["sampler"], r["steps"]) for r in records if "sampler" in r] == [
      ("euler", 8), ("euler_exact", 8), ("euler", 2), ("euler_exact", 2)]
  results = [r for r in records if r.get("sampler") == "euler"]
  (bound,) = [r for r in records if r.get("metric") == "nll_bound_per_token"]
  assert bound["num_tokens"] == 32 * 16 and bound["stderr"] > 0
  # λ1 chosen on held-out rows [32, 48), reported on [0, 32) (SPEC §9)
  assert bound["report_rows"] == [0, 32] and bound["selection_rows"] == [32, 48]
  assert bound["lambda_max"] in (2.0, 4.0, 6.0) and bound["selection"]["candidates"] == [2.0, 4.0, 6.0]
  for r in results:
    for key in ("sampler", "steps", "judge", "num_samples", "gen_nll_per_token", "gen_ppl", "entropy",
                "data_entropy", "entropy_rate"):
      assert key in r, key
    assert r["judge"] == "exact" and r["sampler"] == "euler" and r["num_samples"] == 16

  # The exact judge, independently: eval's 8-step samples are `sample`'s (same seed, count, batch),
  # scored by the chain itself (rebuilt here from the saved config).
  m = config["data"]["markov"]
  chain = MarkovSource(m["vocab_size"], m["order"], m["concentration"], m["seed"])
  tokens = np.array([s["tokens"] for s in samples])
  r8 = results[0]
  nll = -chain.log_likelihood(tokens).sum() / tokens.size
  assert r8["gen_nll_per_token"] == pytest.approx(nll, rel=1e-9)
  assert r8["gen_ppl"] == pytest.approx(math.exp(nll), rel=1e-9)
  assert r8["entropy"] == pytest.approx(_unigram_entropy(tokens), rel=1e-9)
  assert r8["entropy_rate"] == pytest.approx(chain.entropy_rate(), rel=1e-12)
  assert r8["data_nll_per_token"] == pytest.approx(chain.expected_nll_per_token(16), rel=1e-12)

  (bound,) = [r for r in records if r.get("metric") == "nll_bound_per_token"]
  assert bound["num_tokens"] == 32 * 16 and bound["stderr"] > 0
  if bound["value"] < 700:
    assert abs(bound["ppl_bound"] - math.exp(bound["value"])) < 1e-6 * bound["ppl_bound"]
  else:  # an untrained model's bound can overflow exp: recorded as null, not as Infinity
    assert bound["ppl_bound"] is None


def _markov_posterior(x, gamma, transition, initial):
  """E[x1 | x_γ] for an order-1 chain by forward-backward (emission exp(γ x_v/(1 − γ)²), SPEC §9),
  written out here independently of oracles.MarkovPosterior; jnp, so it runs inside the jitted bound."""
  import jax.numpy as jnp  # noqa: PLC0415

  x = x.astype(jnp.float32)
  g = gamma.reshape(-1, 1, 1).astype(jnp.float32)
  log_e = g * x / jnp.square(1.0 - g)
  e = jnp.exp(log_e - log_e.max(-1, keepdims=True))
  norm = lambda a: a / a.sum(-1, keepdims=True)
  length = x.shape[1]
  alpha = [norm(initial[None] * e[:, 0])]
  for l in range(1, length):
    alpha.append(norm((alpha[-1] @ transition) * e[:, l]))
  beta = [jnp.ones_like(alpha[0])]
  for l in range(length - 2, -1, -1):
    beta.insert(0, norm((e[:, l + 1] * beta[0]) @ transition.T))
  return norm(jnp.stack(alpha, 1) * jnp.stack(beta, 1))


def test_likelihood_bound_of_the_cli_is_the_exact_nll_at_the_exact_denoiser(markov_base):
  """evaluate.likelihood_bound (what `cfmjax eval --likelihood` calls: held-out rows, batching over
  the run's 2x2x2 mesh, seeds, summary) with the chain's exact posterior in place of the network:
  the bound must equal the rows' exact NLL, within its standard error."""
  import jax.numpy as jnp  # noqa: PLC0415

  from cfmjax.evaluation import evaluate, likelihood  # noqa: PLC0415
  from cfmjax.run import loading  # noqa: PLC0415

  exp, params, _ = loading.load(str(markov_base[0]))
  chain = exp.data.markov
  assert chain.order == 1
  transition, initial = np.asarray(chain.transition, np.float64), np.asarray(chain.initial, np.float64)

  def exact_logits(params, x, tau_s, tau_t):
    del params, tau_t
    probs = _markov_posterior(x, exp.schedule.gamma(tau_s), jnp.asarray(transition, jnp.float32),
                              jnp.asarray(initial, jnp.float32))
    return jnp.log(jnp.maximum(probs, 1e-30))

  rows = exp.data.eval_rows(64)  # the report split: the first 64 held-out rows
  settings = likelihood.BoundSettings(num_points=64, batch_size=16)
  record = evaluate.likelihood_bound(dataclasses.replace(exp, apply_fn=exact_logits), params, len(rows), 0,
                                     selection_rows=16, settings=settings)
  exact = -chain.log_likelihood(rows).sum() / rows.size
  assert record["num_tokens"] == rows.size
  assert abs(record["value"] - exact) < 4 * record["stderr"] + 0.02 * exact, (record, exact)


def test_likelihood_bound_of_a_context_free_denoiser_is_looser(markov_base):
  import jax.numpy as jnp  # noqa: PLC0415

  from cfmjax.evaluation import evaluate, likelihood  # noqa: PLC0415
  from cfmjax.run import loading  # noqa: PLC0415

  exp, params, _ = loading.load(str(markov_base[0]))
  chain = exp.data.markov
  initial = np.asarray(chain.initial, np.float64)
  rows = exp.data.eval_rows(64)
  exact = -chain.log_likelihood(rows).sum() / rows.size
  # A denoiser that ignores the context (the stationary marginal only) is clearly looser.
  pi = initial / initial.sum()

  def context_free(params, x, tau_s, tau_t):
    gamma = exp.schedule.gamma(tau_s)[:, None, None]
    return jnp.log(jnp.asarray(pi, jnp.float32)) + gamma * x / jnp.square(1.0 - gamma)

  loose = evaluate.likelihood_bound(dataclasses.replace(exp, apply_fn=context_free), params, len(rows), 0,
                                    selection_rows=16, settings=likelihood.BoundSettings(num_points=64, batch_size=16))
  assert loose["value"] > exact + 4 * loose["stderr"], (loose, exact)
  # It is the exact posterior of the i.i.d. model with marginal π, for which the bound is tight: it
  # must match that model's NLL of the rows (a negative or e^λ-inflated bound fails here).
  iid = -np.log(pi[rows]).mean()
  assert abs(loose["value"] - iid) < 4 * loose["stderr"] + 0.02 * iid, (loose, iid)


def test_usage_errors_are_reported():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "cfmjax", "fly"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "usage: cfmjax" in proc.stderr



@pytest.mark.slow
@pytest.mark.timeout(900)  # nine command starts in subprocesses: 150-200 s on 2 idle cores, >300 s on busy ones
def test_the_main_job_runs_every_stage_and_ends_with_its_summary(tmp_path):
  """README command 1 (`cfmjax pipeline`) at toy budgets: every stage's command runs, the report has no
  empty panel, and the summary names the judge and holds both samplers' rows, the bound and samples."""
  workdir = tmp_path / "main"
  proc = subprocess.run([sys.executable, "-m", "cfmjax", "pipeline", f"--workdir={workdir}", "--base_steps=2",
                         "--judge_steps=2", "--distill_steps=2", "--num_samples=8",
                         "--stage_args=--config.model.d_model=32 --config.model.num_layers=1 "
                         "--config.model.num_heads=2 --config.model.mlp_dim=64 --config.train.batch_size=8"],
                        cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  assert proc.stdout.count("=== stage ") == 9 and "$ cfmjax distill --config=" in proc.stdout
  text = (workdir / "summary.md").read_text()
  assert "held-out perplexity" in text and "Likelihood bound of the base flow" in text
  rows = [line for line in text.splitlines() if line.startswith("| flow map |") or line.startswith("| Euler")]
  assert [r.split("|")[2].strip() for r in rows] == ["1", "2", "4", "4", "128"]
  assert text.count("\n  - ") == 4  # two samples from each sampler
  assert (workdir / "report" / "report.png").exists()
