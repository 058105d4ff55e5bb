"""The README's main job at tiny size, end to end in embedding space (slow tier):
text_tiny train -> text_tiny_psd distill -> sample (flow map, renoised) -> eval judged by an AR
checkpoint (ar/text_tiny) with the likelihood bound -> report. In process (conftest.run_cli), on a
tiny corpus with a 64-token vocabulary and model.state_space=embedding set explicitly.
"""

import json
import math

import numpy as np
import pytest

from cfmjax.run import loading
from tests.conftest import _in_repo, run_cli
from tests.test_experiments import write_corpus

pytestmark = pytest.mark.slow


def _flags(corpus):
  return ["--config.data.source=text", f"--config.data.text.paths={corpus}/*.txt",
          "--config.data.tokenizer.vocab_size=64", "--config.data.heldout_fraction=0.2",
          "--config.data.seq_len=16", "--config.model.d_model=32", "--config.model.num_layers=2",
          "--config.model.num_heads=2", "--config.model.mlp_dim=64", "--config.model.time_features=16",
          "--config.train.batch_size=8", "--config.train.num_steps=2", "--config.train.log_every=1",
          "--config.train.eval_every=0", "--config.train.checkpoint_every=2"]


def test_text_tiny_train_distill_sample_eval_in_embedding_space(tmp_path, session_cache):
  corpus = tmp_path / "corpus"
  write_corpus(str(corpus), num_docs=80)
  base, psd, ar, out = tmp_path / "text_tiny", tmp_path / "text_psd", tmp_path / "ar_text", tmp_path / "report"
  with _in_repo():
    run_cli("train", "--config=experiments/base_flow/text_tiny.py", f"--workdir={base}", *_flags(corpus),
            "--config.model.state_space=embedding")
    run_cli("train", "--config=experiments/ar/text_tiny.py", f"--workdir={ar}", *_flags(corpus))
    run_cli("distill", "--config=experiments/flow_map/text_tiny_psd.py", f"--workdir={psd}",
            f"--config.init_from={base}", "--config.train.num_steps=2", "--config.train.batch_size=8",
            "--config.train.log_every=1")
  saved = loading.load_config(str(psd))  # config.json with the base run's sections from run.json
  assert saved.model.state_space == "embedding" and saved.data.source == "text"
  assert json.loads((psd / "run.json").read_text())["starts"][-1]["vocab_size"] == 64

  run_cli("sample", f"--workdir={psd}", "--sampler=flowmap", "--steps=2", "--renoise=0.5", "--num_samples=4",
          "--batch_size=8")
  (path,) = (psd / "samples").glob("*.jsonl")
  assert path.name == "flowmap_2steps_renoise0.5_ckpt2.jsonl"
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert len(rows) == 4 and all(r["renoise"] == 0.5 and isinstance(r["text"], str) for r in rows)

  # A model trained without prompts is prompted by inpainting, in embedding space, with either sampler.
  for workdir, sampler in ((base, "euler"), (psd, "flowmap")):
    out = tmp_path / f"prompted_{sampler}"
    run_cli("sample", f"--checkpoint={workdir}", f"--workdir={out}", f"--sampler={sampler}", "--steps=2",
            "--prompt=the", "--block_size=4", "--num_samples=2", "--batch_size=8")
    (path,) = (out / "samples").glob("*.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 2 and all(r["prompt"] and len(r["tokens"]) > 4 for r in rows)

  run_cli("eval", f"--workdir={psd}", "--sampler=flowmap", "--steps=1,2", f"--judge=ar:{ar}",
          "--num_samples=16", "--batch_size=8")
  run_cli("eval", f"--workdir={base}", "--steps=4", f"--judge=ar:{ar}", "--likelihood", "--likelihood_rows=16", "--likelihood_selection_rows=16",
          "--likelihood_points=16", "--num_samples=16", "--batch_size=8")
  run_cli("eval", f"--workdir={ar}", "--num_samples=16", "--batch_size=8", "--likelihood_rows=16")
  flow_map = json.loads((psd / "eval" / "results.json").read_text())
  assert [(r["sampler"], r["steps"], r["judge"]) for r in flow_map] == [("flowmap", 1, "ar:ar_text"),
                                                                       ("flowmap", 2, "ar:ar_text")]
  for r in flow_map:
    assert np.isfinite(r["gen_nll_per_token"]) and r["num_scored_tokens"] > 0
  records = json.loads((base / "eval" / "results.json").read_text())
  (gen,) = [r for r in records if "sampler" in r]
  (bound,) = [r for r in records if r.get("metric") == "nll_bound_per_token"]
  assert gen["judge"] == "ar:ar_text" and np.isfinite(gen["gen_nll_per_token"])
  # The bound is on a 64-token vocabulary: an untrained model sits near (or above) log 64 per token.
  assert bound["num_tokens"] == 16 * 16 and np.isfinite(bound["value"]) and bound["value"] > 0
  ar_records = json.loads((ar / "eval" / "results.json").read_text())
  (held_out,) = [r for r in ar_records if r.get("metric") == "nll_per_token"]
  assert 0 < held_out["value"] < 2 * math.log(64)
  assert [r["sampler"] for r in ar_records if "sampler" in r] == ["ar"]

  stdout, _ = run_cli("report", str(ar), str(base), str(psd), f"--out={out}", "--names=AR,base,PSD")
  assert (out / "report.md").read_text().splitlines()[0] == "| model | AR | base | PSD |"
  assert "| model | AR | base | PSD |" in stdout
