"""The command-line flags the README shows, each used at least once (in process: conftest.run_cli).

Covered elsewhere: --config/--workdir/--steps/--sampler/--num_samples/--batch_size/--likelihood/
--likelihood_rows/--checkpoint (test_cli), --out/--dtype (test_export), --names/--out (test_report),
--mesh/--stage/--num_devices and owt_1p7b (test_aot, slow), --renoise and --judge=ar:W (the slow
tier: test_distill's handoff, test_pipeline). Here: prompts, blocks, guidance, --prompt_len,
--checkpoint_step and --judge=exact, on a prompt-trained Markov flow.
"""

import json
import os

import numpy as np
import pytest

from cfmjax.data.markov import MarkovSource
from tests.conftest import TINY_FLAGS, _in_repo, built_once, run_cli

# Command-line runs of a prompt-trained model: the slow tier (each trains through `cfmjax train`).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prompt_base(tmp_path_factory, session_cache):
  """experiments/conditional/markov_tiny_prompt.py at test size: prompts of 0-8 tokens, 4 steps
  (checkpoints at 2 and 4), through `cfmjax train`."""
  def build(folder):
    with _in_repo():
      run_cli("train", "--config=experiments/conditional/markov_tiny_prompt.py", f"--workdir={folder / 'w'}",
              *TINY_FLAGS, "--config.data.markov.vocab_size=8", "--config.flow.prompt.max_len=8",
              "--config.train.num_steps=4", "--config.train.eval_every=0")

  return built_once(tmp_path_factory, "prompt_base", build) / "w"


def _samples(directory):
  (path,) = (directory / "samples").glob("*.jsonl")
  return path.name, [json.loads(line) for line in path.read_text().splitlines()]


def test_prompt_blocks_guidance_and_checkpoint_step(prompt_base, tmp_path):
  out = tmp_path / "one"
  printed, _ = run_cli("sample", f"--checkpoint={prompt_base}", f"--workdir={out}", "--prompt=3 1 4",
                       "--block_size=4", "--num_blocks=2", "--guidance=1.5", "--steps=2", "--num_samples=2",
                       "--checkpoint_step=2")
  name, rows = _samples(out)
  assert name == "euler_2steps_prompted_cfg1.5_ckpt2.jsonl"
  assert os.readlink(out / "samples" / "latest") == name
  # --format=text (default): every sample, its prompt marked off from what was generated.
  assert printed.count("--- sample ") == 2 and f"[3 1 4] {rows[1]['continuation']}" in printed
  assert len(rows) == 2
  for r in rows:
    assert r["checkpoint_step"] == 2 and r["guidance"] == 1.5 and r["prompt"] == "3 1 4"
    assert r["tokens"][:3] == [3, 1, 4] and len(r["tokens"]) == 3 + 2 * 4  # two blocks of 4
    assert all(0 <= t < 8 for t in r["tokens"])

  prompts = tmp_path / "prompts.txt"
  prompts.write_text("1 2\n\n5 6 7 0\n")  # blank lines are skipped
  out = tmp_path / "file"
  printed, _ = run_cli("sample", f"--checkpoint={prompt_base}", f"--workdir={out}", f"--prompts_file={prompts}",
                       "--steps=2", "--format=jsonl")
  name, rows = _samples(out)
  assert [json.loads(line) for line in printed.splitlines()] == rows  # --format=jsonl: the file's records
  assert name == "euler_2steps_prompted_ckpt4.jsonl"  # the latest checkpoint by default
  assert [r["tokens"][:len(p)] for r, p in zip(rows, ([1, 2], [5, 6, 7, 0]))] == [[1, 2], [5, 6, 7, 0]]
  # Default block: what the window leaves after the longest prompt (16 - 4), for every prompt.
  assert [len(r["continuation"].split()) for r in rows] == [12, 12]
  assert [len(r["tokens"]) for r in rows] == [2 + 12, 4 + 12]


def test_eval_conditions_on_held_out_prefixes_and_judges_the_rest_exactly(prompt_base, tmp_path):
  out = tmp_path / "eval"
  run_cli("eval", f"--checkpoint={prompt_base}", f"--workdir={out}", "--prompt_len=4", "--guidance=2",
          "--steps=2", "--num_samples=16", "--batch_size=16", "--judge=exact")
  (r,) = json.loads((out / "eval" / "results.json").read_text())
  assert r["prompt_len"] == 4 and r["guidance"] == 2 and r["judge"] == "exact" and r["steps"] == 2
  assert r["num_scored_tokens"] == 16 * 12
  # Given a full context (order 1 <= 4 prompt tokens) the floor is the chain's entropy rate.
  config = json.loads((prompt_base / "config.json").read_text())["data"]["markov"]
  chain = MarkovSource(config["vocab_size"], config["order"], config["concentration"], config["seed"])
  assert r["data_nll_per_token"] == pytest.approx(chain.entropy_rate(), rel=1e-12)
  assert np.isfinite(r["gen_nll_per_token"]) and r["gen_nll_per_token"] > 0


def test_prompts_guidance_and_self_conditioning_in_embedding_space(tmp_path, session_cache):
  """The prompt-trained, self-conditioned config with its state in embedding space (SPEC §4, §8):
  trained through `cfmjax train`, then prompted, guided and block-continued through `cfmjax sample`."""
  workdir, out = tmp_path / "w", tmp_path / "out"
  with _in_repo():
    run_cli("train", "--config=experiments/conditional/markov_tiny_prompt.py", f"--workdir={workdir}",
            *TINY_FLAGS, "--config.data.markov.vocab_size=8", "--config.flow.prompt.max_len=8",
            "--config.model.state_space=embedding", "--config.model.self_condition=True",
            "--config.train.num_steps=2", "--config.train.eval_every=0")
  saved = json.loads((workdir / "config.json").read_text())["model"]
  start = json.loads((workdir / "run.json").read_text())["starts"][-1]
  assert saved["state_space"] == "embedding" and saved["self_condition"] and start["prompt_flag"]
  run_cli("sample", f"--checkpoint={workdir}", f"--workdir={out}", "--prompt=3 1 4", "--block_size=4",
          "--num_blocks=2", "--guidance=1.5", "--steps=2", "--num_samples=2")
  name, rows = _samples(out)
  assert name == "euler_2steps_prompted_cfg1.5_ckpt2.jsonl"
  assert all(r["tokens"][:3] == [3, 1, 4] and len(r["tokens"]) == 3 + 2 * 4 for r in rows)
