"""The measuring instruments (diagnostics.py): the exact reference sampler through the judge, and the
denoiser gap (SPEC §5, §9), in-process and through `cfmjax train` / `cfmjax eval`."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import tiny_config
from tests.conftest import TINY_FLAGS as TINY
from tests.conftest import run_cli

from cfmjax.data import pipeline
from cfmjax.data.markov import MarkovSource
from cfmjax.evaluation import diagnostics, evaluate, judges
from cfmjax.flow import oracles, schedules, scores
from cfmjax.models import state_space
from cfmjax.run import experiment


def test_exact_euler_sampler_reaches_the_floor_through_the_judge(cache_dir):
  """Euler with the exact posterior samples the chain: gen NLL = H(X_1..L)/L within 3 standard errors.

  Checks sampler -> judge -> metric numerically. V = 4, order 1, L = 8: at 128 steps the sampler's
  bias (< 0.002 nats/token, measured with 4096 samples at 32 / 128 / 512 steps) is well below the
  standard error of 1024 samples (~0.007).
  """
  config = tiny_config(**{"data.seq_len": 8, "data.markov.vocab_size": 4, "data.markov.order": 1,
                          "data.markov.concentration": 0.5, "data.markov.seed": 1})
  data = pipeline.build_data(config.data, None)
  posterior = oracles.MarkovPosterior.from_source(data.markov)
  schedule = schedules.get_schedule("mixed", 4)
  tokens = diagnostics.exact_euler_sample(posterior, schedule, 128, 1024, 8, 1024, seed=0)
  record = evaluate.score(data, tokens, data.eval_rows(64), judges.ExactMarkovJudge(data.markov))
  per_sequence = -data.markov.log_likelihood(tokens)
  stderr = per_sequence.std(ddof=1) / math.sqrt(len(per_sequence)) / 8
  assert record["judge"] == "exact" and record["num_samples"] == 1024
  assert abs(record["gen_nll_per_token"] - per_sequence.mean() / 8) < 1e-9
  assert abs(record["gen_nll_per_token"] - record["data_nll_per_token"]) < 3 * stderr, (record, stderr)
  # One step collapses onto the mode (SPEC §9): far below the floor, a check that the test can fail.
  one = diagnostics.exact_euler_sample(posterior, schedule, 1, 256, 8, 256, seed=0)
  assert scores.exact_markov_nll(data.markov, one) < record["data_nll_per_token"] - 10 * stderr


def test_denoiser_gap_of_the_exact_posterior_is_zero_and_the_bounds_hold():
  source = MarkovSource(5, 2, 0.3, seed=4)
  posterior = oracles.MarkovPosterior.from_source(source)
  rows = source.rows(range(48), 10, "validation")
  logits = diagnostics.exact_logits_fn(posterior)
  settings = diagnostics.GapSettings(num_bins=10, seed=3, batch_size=32)
  # The exact posterior as a "model", through the same StateSpace path as the network (linear: τ = γ).
  space = state_space.StateSpace(lambda _, x, tau_s, tau_t: logits(x, tau_t), 5)
  with jax.enable_x64(True):
    ce = jax.jit(diagnostics.space_ce(space, schedules.get_schedule("linear", 5)))
    model_ce = lambda tokens, gamma, x, rng: ce(None, jnp.asarray(tokens), jnp.asarray(gamma), rng, jnp.asarray(x))
    record = diagnostics.gap_per_bin(model_ce, rows, 5, settings=settings, posterior=posterior)
  assert len(record["bins"]) == 10 and record["lambda_range"] == [-9.0, 9.0]
  assert abs(record["gap"]) < 1e-5
  for e in record["bins"]:
    assert abs(e["gap"]) < 1e-5
    assert e["exact_ce"] <= e["context_free_ce"] + 1e-3 <= math.log(5) + 2e-3, e
  # The context carries information at mid noise, and none is left to gain at the clean end.
  assert max(e["context_free_ce"] - e["exact_ce"] for e in record["bins"]) > 0.05
  assert record["bins"][-1]["exact_ce"] < 0.05
  # Deterministic in the seed.
  with jax.enable_x64(True):
    again = diagnostics.gap_per_bin(model_ce, rows, 5, settings=settings, posterior=posterior)
  assert again == record


@pytest.mark.parametrize("space", ["vocab", "embedding"])
def test_denoiser_gap_of_a_network(space, tmp_path):
  config = tiny_config(**{"model.state_space": space, "data.seq_len": 8})
  exp = experiment.build(config, None, devices=jax.devices()[:1])
  state = experiment.init_state(exp, 0)
  gap = diagnostics.denoiser_gap(exp, state["ema_params"], exp.data.eval_rows(20), num_bins=10, seed=0,
                                 batch_size=16)
  assert gap["state_space"] == space and gap["num_rows"] == 20 and len(gap["bins"]) == 10
  for e in gap["bins"]:
    # >= 0: with the skip term an untrained network is exact (CE 0 for every row) in the cleanest bins
    assert np.isfinite(e["denoiser_ce"]) and e["denoiser_ce_stderr"] >= 0
    assert np.isfinite(e["exact_ce"]) and np.isfinite(e["context_free_ce"])
    assert e["lambda_lo"] < e["lambda_mid"] < e["lambda_hi"] and 0 <= e["tau_mid"] <= 1
  # (Per bin the ordering holds in expectation; 20 rows of 8 tokens are too few to assert it per bin.)
  assert gap["exact_ce"] < gap["context_free_ce"] < math.log(8)
  assert gap["denoiser_ce"] > gap["exact_ce"] and gap["gap"] == gap["denoiser_ce"] - gap["exact_ce"]
  path = diagnostics.plot_gap(gap, str(tmp_path / "gap.png"))
  assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  assert "denoiser_ce" in diagnostics.gap_table(gap)


@pytest.mark.slow
def test_training_diagnostics_and_eval_flags_end_to_end(tmp_path, cache_dir):
  workdir = tmp_path / "w"
  run_cli("train", "--config=experiments/base_flow/markov_tiny.py", f"--workdir={workdir}", *TINY,
         "--config.data.markov.vocab_size=8", "--config.train.num_steps=2", "--config.train.eval_every=0",
         "--config.train.diagnostics_every=2", "--config.train.diagnostics_rows=16",
         "--config.train.diagnostics_bins=10", "--config.train.diagnostics_samples=16",
         "--config.train.diagnostics_steps=4")
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  (diag,) = [r for r in logged if "denoiser_ce" in r]
  assert diag["step"] == 2
  for key in ("denoiser_ce", "exact_ce", "context_free_ce", "denoiser_gap", "gen_nll_per_token", "gen_entropy",
              "data_nll_per_token"):
    assert np.isfinite(diag[key]), key
  assert diag["exact_ce"] < diag["context_free_ce"]

  # Sampling with the exact reference beside it, and the gap, in one call.
  out, _ = run_cli("eval", f"--workdir={workdir}", "--steps=4,2", "--num_samples=16", "--batch_size=16",
                "--denoiser_gap", "--denoiser_gap_rows=16", "--denoiser_gap_bins=10")
  records = json.loads((workdir / "eval" / "results.json").read_text())
  assert [(r["sampler"], r["steps"]) for r in records] == [
      ("euler", 4), ("euler_exact", 4), ("euler", 2), ("euler_exact", 2)]
  for r in records[1::2]:
    assert r["judge"] == "exact" and r["num_samples"] == 16 and np.isfinite(r["gen_nll_per_token"])
  gap = json.loads((workdir / "eval" / "denoiser_gap.json").read_text())
  assert len(gap["bins"]) == 10 and gap["checkpoint_step"] == 2 and "exact_ce" in gap
  assert (workdir / "eval" / "denoiser_gap.png").exists()
  assert "euler_exact" in (workdir / "eval" / "results.md").read_text()
  assert "denoiser gap:" in out

  # The gap alone (no sampling), and the reference switched off: results.json is left as it was.
  (workdir / "eval" / "denoiser_gap.json").unlink()
  run_cli("eval", f"--workdir={workdir}", "--steps=0", "--denoiser_gap", "--denoiser_gap_rows=16",
         "--denoiser_gap_bins=10", "--exact_reference=false")
  assert (workdir / "eval" / "denoiser_gap.json").exists()
  assert json.loads((workdir / "eval" / "results.json").read_text()) == records
  run_cli("eval", f"--workdir={workdir}", "--steps=2", "--num_samples=16", "--batch_size=16",
         "--exact_reference=false", "--seed=1")
  records = json.loads((workdir / "eval" / "results.json").read_text())
  assert sum(r["sampler"] == "euler_exact" for r in records) == 2  # only the earlier ones


@pytest.mark.slow
def test_training_diagnostics_of_the_autoregressive_baseline(tmp_path):
  """The AR baseline logs its samples' exact gen NLL (no denoiser gap), so learning curves compare."""
  from cfmjax.training import train  # noqa: PLC0415

  config = tiny_config(**{"objective": "ar", "data.seq_len": 8, "train.num_steps": 2,
                          "train.diagnostics_every": 2, "train.diagnostics_samples": 16})
  train.train(config, str(tmp_path / "ar"))
  logged = [json.loads(line) for line in (tmp_path / "ar" / "metrics.jsonl").read_text().splitlines()]
  (diag,) = [r for r in logged if "gen_nll_per_token" in r]
  assert diag["step"] == 2 and "denoiser_ce" not in diag
  assert np.isfinite(diag["gen_nll_per_token"]) and diag["gen_nll_per_token"] > diag["data_nll_per_token"]


@pytest.mark.slow
def test_best_checkpoint_is_the_lowest_diagnostic_and_loads_as_best(tmp_path):
  """train.best_metric keeps the state at the step whose diagnostic was lowest; --checkpoint_step=best
  loads exactly that state (compared with the regular checkpoint of the same step)."""
  from cfmjax.run import checkpointing, loading  # noqa: PLC0415
  from cfmjax.training import train  # noqa: PLC0415

  config = tiny_config(**{"train.num_steps": 6, "train.checkpoint_every": 1, "train.keep_checkpoints": 10,
                          "train.diagnostics_every": 1, "train.diagnostics_rows": 16, "train.diagnostics_bins": 4,
                          "train.diagnostics_samples": 0, "train.best_metric": "denoiser_ce", "optim.lr": 3e-2})
  workdir = tmp_path / "w"
  train.train(config, str(workdir))
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  values = {r["step"]: r["denoiser_ce"] for r in logged if "denoiser_ce" in r}
  assert sorted(values) == [1, 2, 3, 4, 5, 6]
  best = checkpointing.read_best(str(workdir))
  assert best["metric"] == "denoiser_ce" and best["step"] == min(values, key=values.get)
  assert best["value"] == pytest.approx(min(values.values()), rel=1e-6)
  _, best_params, step = loading.load(str(workdir), "best")
  _, same_step, _ = loading.load(str(workdir), best["step"])
  assert step == best["step"]
  for a, b in zip(jax.tree_util.tree_leaves(best_params), jax.tree_util.tree_leaves(same_step)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  out, _ = run_cli("sample", f"--workdir={workdir}", "--checkpoint_step=best", "--steps=2", "--num_samples=2",
                   "--batch_size=2")
  (path,) = (workdir / "samples").glob("euler_2steps_ckpt*.jsonl")
  samples = [json.loads(line) for line in path.read_text().splitlines()]
  assert {s["checkpoint_step"] for s in samples} == {best["step"]}

  # best.json naming a step that is no longer on disk (a crash between the two writes) is ignored.
  (workdir / "best" / "best.json").write_text(json.dumps(dict(best, step=best["step"] + 100)))
  assert checkpointing.read_best(str(workdir)) is None
  with pytest.raises(FileNotFoundError, match="best_metric"):
    loading.load(str(workdir), "best")


@pytest.mark.parametrize("overrides, match", [
    ({"train.best_metric": "loss", "train.diagnostics_every": 1}, "unknown train.best_metric"),
    ({"train.best_metric": "denoiser_ce"}, "diagnostics_every"),
    ({"train.best_metric": "gen_nll_per_token", "train.diagnostics_every": 1, "train.diagnostics_samples": 0},
     "diagnostics_samples"),
    ({"train.best_metric": "denoiser_gap", "train.diagnostics_every": 1, "objective": "ar"}, "no denoiser"),
])
def test_best_metric_is_refused_where_it_cannot_be_measured(overrides, match):
  from cfmjax.run import experiment  # noqa: PLC0415

  with pytest.raises(ValueError, match=match):
    experiment.build(tiny_config(**overrides), None, devices=jax.devices()[:1])
