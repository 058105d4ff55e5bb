"""End to end through the real command line: train -> (resume) -> sample -> eval on the Markov source."""

import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.d_model=32", "--config.model.num_layers=2", "--config.model.num_heads=2",
        "--config.model.mlp_dim=64", "--config.model.time_features=16", "--config.data.seq_len=16",
        "--config.train.batch_size=16", "--config.train.log_every=1", "--config.train.eval_every=2",
        "--config.train.eval_batch_size=16", "--config.train.checkpoint_every=2"]


def cfmjax(*args, env_extra=None):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  env.update(env_extra or {})
  proc = subprocess.run([sys.executable, "-m", "cfmjax", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f"cfmjax {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
  return proc


def test_train_sample_eval_on_markov(tmp_path, cache_dir):
  workdir = tmp_path / "w"
  base = ["--config=experiments/base_flow/markov_tiny.py", f"--workdir={workdir}",
          "--config.data.markov.vocab_size=12", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", *TINY]
  cfmjax("train", *base, "--config.train.num_steps=2", env_extra={"CFMJAX_CACHE": str(cache_dir)})
  proc = cfmjax("train", *base, "--config.train.num_steps=4", env_extra={"CFMJAX_CACHE": str(cache_dir)})
  assert "resumed from step 2" in proc.stderr

  for name in ("config.json", "metrics.jsonl", "checkpoints", "tensorboard"):
    assert (workdir / name).exists(), name
  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["vocab_size"] == 12  # the vocabulary followed the overridden data source
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
  assert any("eval_loss" in r for r in records)

  cfmjax("sample", f"--workdir={workdir}", "--steps=8", "--num_samples=5", "--sample_precision=float64")
  (sample_file,) = (workdir / "samples").glob("*.jsonl")
  samples = [json.loads(line) for line in sample_file.read_text().splitlines()]
  assert len(samples) == 5 and all(len(s["tokens"]) == 16 for s in samples)
  assert all(0 <= t < 12 for s in samples for t in s["tokens"])

  cfmjax("eval", f"--workdir={workdir}", "--sampler=euler", "--steps=8,2", "--num_samples=16",
         "--likelihood", "--likelihood_points=32", "--likelihood_rows=32", "--likelihood_selection_rows=16",
         "--likelihood_endpoints=2,4,6", "--batch_size=16")
  records = json.loads((workdir / "eval" / "results.json").read_text())
  results = [r for r in records if r.get("sampler") == "euler"]
  assert [r["steps"] for r in results] == [8, 2]
  # Each model record is followed by the same sampler with the exact denoiser (--exact_reference, on by default).
  assert [(r["sampler"], r["steps"]) for r in records if "sampler" in r] == [
      ("euler", 8), ("euler_exact", 8), ("euler", 2), ("euler_exact", 2)]
  (bound,) = [r for r in records if r.get("metric") == "nll_bound_per_token"]
  assert bound["num_tokens"] == 32 * 16 and bound["stderr"] > 0
  # λ1 chosen on held-out rows [32, 48), reported on [0, 32) (SPEC §9)
  assert bound["report_rows"] == [0, 32] and bound["selection_rows"] == [32, 48]
  assert bound["lambda_max"] in (2.0, 4.0, 6.0) and bound["selection"]["candidates"] == [2.0, 4.0, 6.0]
  assert bound["value"] > results[0]["data_nll_per_token"]  # a 4-step model is far from the data
  if bound["value"] < 700:
    assert abs(bound["ppl_bound"] - math.exp(bound["value"])) < 1e-6 * bound["ppl_bound"]
  else:  # an untrained model's bound can overflow exp: recorded as null, not as Infinity
    assert bound["ppl_bound"] is None
  for r in results:
    for key in ("sampler", "steps", "judge", "num_samples", "gen_nll_per_token", "gen_ppl", "entropy",
                "data_entropy", "entropy_rate"):
      assert key in r, key
    assert r["judge"] == "exact" and r["sampler"] == "euler" and r["num_samples"] == 16
    assert r["gen_ppl"] > 1 and 0 < r["entropy"] <= r["data_entropy"] * 2


def test_usage_errors_are_reported():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "cfmjax", "fly"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "usage: cfmjax" in proc.stderr

