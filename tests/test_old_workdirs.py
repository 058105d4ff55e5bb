"""Workdirs written by older cfmjax keep working (schema.py): tests/golden/workdir_v<k>/ holds a tiny
run as the code of schema version k wrote it, and each is sampled, evaluated and resumed by today's.

workdir_v0 (main at 62c2607, before the schema) and workdir_v1 (6d46e27, before `objective`
replaced stage / model.causal / distill.loss): each is the shared tiny base of conftest.markov_base
(experiments/base_flow/markov_tiny.py, V = 12, the TINY_FLAGS sizes, 2x2x2 mesh, 4 steps; its step-2
checkpoint dropped to keep the fixture small) and a PSD map distilled from it for 2 steps on an 8x1x1
mesh, as conftest.markov_psd does. The same shapes as those fixtures, so their compiled programs are
shared through the compile cache.
"""

import json
import pathlib
import shutil

import numpy as np
import pytest

from cfmjax.data.markov import MarkovSource
from cfmjax.run import loading, schema
from tests.conftest import TINY_FLAGS, run_cli

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden"
VERSIONS = sorted(int(p.name.removeprefix("workdir_v")) for p in GOLDEN.glob("workdir_v*"))


def _copy(version, tmp_path):
  """A writable copy of the fixture (sampling, evaluating and resuming write into a workdir)."""
  root = tmp_path / f"v{version}"
  shutil.copytree(GOLDEN / f"workdir_v{version}", root)
  return root / "base", root / "psd"


def test_there_is_a_fixture_for_every_version_before_this_one():
  assert VERSIONS == list(range(schema.VERSION))


@pytest.mark.parametrize("version", VERSIONS)
def test_an_old_workdir_samples_and_evaluates(version, tmp_path, session_cache):
  base, psd = _copy(version, tmp_path)
  saved = json.loads((base / "config.json").read_text())
  assert saved.get(schema.KEY, 0) == version  # the fixture is what that version wrote
  config = loading.load_config(str(base))
  assert schema.KEY not in config and config.model.skip == saved["model"].get("skip", False)
  assert (config.objective, loading.load_config(str(psd)).objective) == ("flow", "psd")  # migrated
  assert "stage" not in config and "causal" not in config.model and "loss" not in config.distill

  run_cli("sample", f"--workdir={base}", "--steps=2", "--num_samples=16", "--batch_size=16")
  run_cli("eval", f"--workdir={base}", "--steps=2", "--num_samples=16", "--batch_size=16")
  record, exact = json.loads((base / "eval" / "results.json").read_text())
  assert (record["sampler"], exact["sampler"], record["judge"]) == ("euler", "euler_exact", "exact")
  # The record's gen NLL is the chain's exact NLL of the same samples (`sample` and `eval` draw the
  # same rows for the same seed, count and batch), scored here by the chain rebuilt from config.json.
  m = saved["data"]["markov"]
  chain = MarkovSource(m["vocab_size"], m["order"], m["concentration"], m["seed"])
  (samples,) = (base / "samples").glob("*.jsonl")
  tokens = np.array([json.loads(line)["tokens"] for line in samples.read_text().splitlines()])
  assert tokens.shape == (16, 16)
  assert record["gen_nll_per_token"] == pytest.approx(-chain.log_likelihood(tokens).sum() / tokens.size, rel=1e-9)

  run_cli("sample", f"--workdir={psd}", "--sampler=flowmap", "--steps=2", "--num_samples=8")
  (samples,) = (psd / "samples").glob("*.jsonl")
  rows = [json.loads(line)["tokens"] for line in samples.read_text().splitlines()]
  assert len(rows) == 8 and all(len(r) == 16 and all(0 <= t < 12 for t in r) for r in rows)


def test_a_checkpoint_from_a_newer_cfmjax_is_refused_by_name(tmp_path):
  base, _ = _copy(VERSIONS[-1], tmp_path)
  metadata = base / "checkpoints" / "4" / "data" / "metadata"
  data = json.loads(metadata.read_text())
  metadata.write_text(json.dumps(dict(data, **{schema.KEY: schema.VERSION + 1})))
  with pytest.raises(ValueError, match=f"schema_version={schema.VERSION + 1}, written by a newer cfmjax"):
    loading.load(str(base))


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_an_old_workdir_resumes_training(version, tmp_path, session_cache):
  base, _ = _copy(version, tmp_path)
  args = ["train", "--config=experiments/base_flow/markov_tiny.py", f"--workdir={base}",
          "--config.data.markov.vocab_size=12", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", *TINY_FLAGS]
  from tests.conftest import _in_repo  # noqa: PLC0415
  with _in_repo():
    _, log = run_cli(*args, "--config.train.num_steps=6")
  assert "resumed from step 4" in log or "resuming from step 4" in log, log[-2000:]
  records = [json.loads(line) for line in (base / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in records if "loss" in r]
  assert steps == [1, 2, 3, 4, 5, 6] and all(np.isfinite(r["loss"]) for r in records if "loss" in r)
  assert json.loads((base / "config.json").read_text())[schema.KEY] == schema.VERSION  # rewritten as today's
