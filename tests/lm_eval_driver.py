"""The lm-eval adapter in one process of a (possibly) multi-process job, for tests/test_multiprocess.py.

    python tests/lm_eval_driver.py WORKDIR

Every process loads the model; process 0 scores the tiny task's requests through the adapter's
methods (loglikelihood and generate_until) while the others serve its network calls (`serve`), then
runs the harness itself (`lm_eval_adapter.evaluate`, which every process calls), and prints one JSON
line: the log-likelihoods, the generated text and the harness's accuracy.
"""

import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")) + \
    f" --xla_force_host_platform_device_count={os.environ.get('CFMJAX_TEST_DEVICES', 8)}"

import jax  # noqa: E402

from cfmjax.evaluation import lm_eval_adapter  # noqa: E402
from cfmjax.parallel import distributed  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(REPO, "cfmjax", "lm_eval_tasks")


class Request:
  def __init__(self, *args):
    self.args = args


def main():
  workdir = sys.argv[1]
  distributed.maybe_initialize()
  kwargs = dict(batch_size=8, bound_points=16, bound_selection_rows=16, steps=2)
  model = lm_eval_adapter.CfmjaxLM(workdir, **kwargs)
  if jax.process_index() == 0:
    docs = [json.loads(line) for line in open(os.path.join(TASKS, "cfmjax_tiny_mc.json"))]
    requests = [Request(d["context"], " " + c) for d in docs for c in d["choices"]]
    scores = [logp for logp, _ in model.loglikelihood(requests)]
    texts = model.generate_until([Request("1 2 3", {"until": ["\n"], "max_gen_toks": 4})])
    model.stop_followers()
  else:
    model.serve()
  os.chdir(REPO)  # the task's data path is relative to the repository root
  results = lm_eval_adapter.evaluate(workdir, ["cfmjax_tiny_mc"], include_path=TASKS, **kwargs)
  if jax.process_index() == 0:
    print("RESULT " + json.dumps({"loglikelihoods": scores, "texts": texts,
                                  "acc": results["results"]["cfmjax_tiny_mc"]["acc,none"]}))


if __name__ == "__main__":
  main()
