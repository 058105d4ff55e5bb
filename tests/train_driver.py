"""Runs one tiny training in its own process, for the tests that need real processes.

    python tests/train_driver.py WORKDIR '{"train.num_steps": 8}'

Environment:
  CFMJAX_TEST_DEVICES   fake CPU devices in this process (default 8, as in the test suite);
  CFMJAX_TEST_STEP_DELAY seconds to sleep before each step, so that a test can signal the process
                        mid-run (the tiny model otherwise finishes before a signal can arrive);
  CFMJAX_COORDINATOR_ADDRESS / CFMJAX_NUM_PROCESSES / CFMJAX_PROCESS_ID: a multi-process run
                        (cfmjax/distributed.py), exactly as the launch scripts set them.
The config is `tiny_config` from conftest.py with the JSON overrides applied.
"""

import json
import logging
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.conftest import tiny_config  # noqa: E402 (sets the compile cache like the suite does)

# conftest appended its own device count; this process may want another one (read at backend start).
# Only that flag changes: the others (conftest's compile flags) must match the test process's, whose
# runs are compared bit for bit with this one's.
os.environ["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+",
                                 f"--xla_force_host_platform_device_count={os.environ.get('CFMJAX_TEST_DEVICES', 8)}",
                                 os.environ["XLA_FLAGS"])

from cfmjax import distributed, train  # noqa: E402


def align_processes_on_cpu():
  """Keeps CPU processes within gloo's fixed 30 s collective timeout of each other.

  On a loaded machine one process can finish compiling the train step tens of seconds before its
  peer and then time out in the first collective. So: Orbax barriers go through the coordination
  service (no device collective), and the train step is compiled ahead of time, followed by a
  coordination-service barrier, before it first runs. Accelerator collectives do not need this.
  """
  from absl import flags  # noqa: PLC0415
  from jax._src import distributed as jax_distributed  # noqa: PLC0415 (the coordination client)

  flags.FLAGS(["train_driver", "--experimental_orbax_use_distributed_barrier"])
  client = jax_distributed.global_state.client
  real_make_train_step = train.make_train_step

  def make_train_step(exp, grad_fn=None):
    jitted = real_make_train_step(exp, grad_fn)
    compiled = []

    def step(state, batch):
      if not compiled:
        compiled.append(jitted.lower(state, batch).compile())
        client.wait_at_barrier("cfmjax_test_train_step_compiled", 600_000)
      return compiled[0](state, batch)

    return step

  train.make_train_step = make_train_step


def main():
  workdir, overrides = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
  log = logging.getLogger("cfmjax")  # what `cfmjax train` prints: resumes, signals, process counts
  log.addHandler(logging.StreamHandler(sys.stderr))
  log.setLevel(logging.INFO)
  distributed.maybe_initialize()  # before anything touches a device
  if distributed.detect() is not None:
    align_processes_on_cpu()
  delay = float(os.environ.get("CFMJAX_TEST_STEP_DELAY", 0))
  if delay:
    assemble = train.global_batch

    def slow_global_batch(exp, rows):
      time.sleep(delay)
      return assemble(exp, rows)

    train.global_batch = slow_global_batch
  train.train(tiny_config(**overrides), workdir)


if __name__ == "__main__":
  main()
