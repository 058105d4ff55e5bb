"""The lm-eval-harness adapter (cfmjax/evaluation/lm_eval_adapter.py), offline, on the repository's tiny
multiple-choice task: the harness's accuracy for the AR baseline and for a flow equals a direct
computation."""

import json
import os

import numpy as np
import pytest

from cfmjax.evaluation import evaluate, lm_eval_adapter
from cfmjax.objectives import ar
from cfmjax.run import loading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(REPO, "cfmjax", "lm_eval_tasks")


@pytest.mark.slow
def test_ar_accuracy_through_the_harness_equals_a_direct_computation(markov_ar, monkeypatch):
  monkeypatch.chdir(REPO)  # the task's data path is relative to the repository root
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  results = lm_eval_adapter.evaluate(str(markov_ar), ["cfmjax_tiny_mc"], include_path=TASKS, batch_size=8)
  acc = results["results"]["cfmjax_tiny_mc"]["acc,none"]

  exp, params, _ = loading.load(str(markov_ar))
  docs = [json.loads(line) for line in open(os.path.join(TASKS, "cfmjax_tiny_mc.json"))]
  correct = []
  for d in docs:
    ctx = [int(t) for t in d["context"].split()]
    rows = np.zeros((len(d["choices"]), exp.config.data.seq_len), np.int32)
    mask = np.zeros(rows.shape, np.float32)
    for i, choice in enumerate(d["choices"]):
      rows[i, :len(ctx) + 1] = ctx + [int(choice)]
      mask[i, len(ctx)] = 1.0
    nll = ar.score_rows(exp, params, rows, mask, 8)
    correct.append(int(np.argmin(nll)) == d["label"])
  assert acc == pytest.approx(np.mean(correct), abs=1e-12)


class Request:
  def __init__(self, *args):
    self.args = args


@pytest.mark.slow
def test_flow_accuracy_through_the_harness_equals_a_direct_computation_with_the_conditional_bound(
    markov_base, monkeypatch):
  """A flow's loglikelihood is minus the conditional bound (evaluate.conditional_bounds; its math is
  checked against a Markov chain's exact conditional NLL in test_likelihood.py): the harness's
  accuracy equals the argmin of bounds computed here on rows built here, whatever order and batches
  the harness scores the requests in."""
  monkeypatch.chdir(REPO)
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  kwargs = dict(batch_size=8, bound_points=16, bound_selection_rows=16)
  results = lm_eval_adapter.evaluate(str(markov_base[0]), ["cfmjax_tiny_mc"], include_path=TASKS, **kwargs)
  acc = results["results"]["cfmjax_tiny_mc"]["acc,none"]

  exp, params, _ = loading.load(str(markov_base[0]))
  endpoint = evaluate.bound_endpoint(exp, params, 16, batch_size=8, seed=0)
  docs = [json.loads(line) for line in open(os.path.join(TASKS, "cfmjax_tiny_mc.json"))]
  length = exp.config.data.seq_len
  rows, scored, first = [], [], []
  for d in docs:
    first.append(len(rows))
    ctx = [int(t) for t in d["context"].split()]
    for choice in d["choices"]:
      row = np.zeros(length, np.int32)  # Markov rows have no end-of-document token: left padding is 0
      row[length - len(ctx) - 1:] = ctx + [int(choice)]
      mask = np.zeros(length, np.float32)
      mask[-1] = 1.0
      rows.append(row)
      scored.append(mask)
  bounds = evaluate.conditional_bounds(exp, params, np.stack(rows), np.stack(scored), endpoint, num_points=16,
                                       batch_size=8, seed=0)
  assert np.all(np.isfinite(bounds)) and np.all(bounds > 0)
  correct = [int(np.argmin(bounds[i:i + len(d["choices"])])) == d["label"] for i, d in zip(first, docs)]
  assert acc == pytest.approx(np.mean(correct), abs=1e-12)

  # A request's score does not depend on its batch: one request alone gets the same number.
  model = lm_eval_adapter.CfmjaxLM(str(markov_base[0]), **kwargs)
  d = docs[0]
  ((logp, greedy),) = model.loglikelihood([Request(d["context"], " " + d["choices"][1])])
  assert logp == pytest.approx(-bounds[1], rel=1e-5) and greedy is False


def test_generation_works_for_both_and_the_ar_scores_exactly(markov_base, markov_ar):
  with pytest.raises(ValueError, match="unknown cfmjax model_args.*bound_point"):  # a typo is not ignored
    lm_eval_adapter.CfmjaxLM(str(markov_ar), bound_point=16)
  for workdir in (markov_ar, markov_base[0]):
    model = lm_eval_adapter.CfmjaxLM(str(workdir), batch_size=8, steps=2)
    (text,) = model.generate_until([Request("1 2 3", {"until": ["\n"], "max_gen_toks": 4})])
    assert len(text.split()) == 4 and all(0 <= int(t) < 12 for t in text.split())
  ar_model = lm_eval_adapter.CfmjaxLM(str(markov_ar), batch_size=8)
  # AR decoding keeps a prompt's prefix and samples the rest (ar.decode's prompt).
  from cfmjax.run import inference  # noqa: PLC0415

  prompts = tuple(np.asarray(a) for a in inference.prefix_prompts([[1, 2, 3], [4]], 16))
  tokens = inference.generate(ar_model.exp, ar_model.params, inference.Sampling("ar", 16, 8), 2, 0, prompts=prompts)
  assert tokens[0, :3].tolist() == [1, 2, 3] and tokens[1, 0] == 4
  (rolling,) = ar_model.loglikelihood_rolling([Request(" ".join(["3"] * 20))])  # two windows of 16 and 4
  exp, params = ar_model.exp, ar_model.params
  rows = np.zeros((2, 16), np.int32) + 3
  mask = np.zeros((2, 16), np.float32)
  mask[0] = 1.0
  mask[1, :4] = 1.0
  assert rolling == pytest.approx(-float(np.sum(ar.score_rows(exp, params, rows, mask, 8))), rel=1e-6)


@pytest.mark.slow
def test_the_readme_command_runs_the_harness_cli(markov_ar):
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415

  proc = subprocess.run([sys.executable, "-c", "import cfmjax.evaluation.lm_eval_adapter, lm_eval.__main__ as m; m.cli_evaluate()",
                         "--model", "cfmjax", "--model_args", f"workdir={markov_ar}", "--batch_size", "16",
                         "--tasks", "cfmjax_tiny_mc", "--include_path", "cfmjax/lm_eval_tasks"],
                        cwd=REPO, env=dict(os.environ, HF_DATASETS_OFFLINE="1"), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "|cfmjax_tiny_mc|" in proc.stdout and "|acc" in proc.stdout
