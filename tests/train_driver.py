"""Runs one tiny training in its own process, for the tests that need real processes.

    python tests/train_driver.py WORKDIR '{"train.num_steps": 8}'

Environment:
  CFMJAX_TEST_DEVICES   fake CPU devices in this process (default 8, as in the test suite);
  CFMJAX_TEST_STEP_DELAY seconds to sleep before each step, so that a test can signal the process
                        mid-run (the tiny model otherwise finishes before a signal can arrive);
  CFMJAX_COORDINATOR_ADDRESS / CFMJAX_NUM_PROCESSES / CFMJAX_PROCESS_ID: a multi-process run
                        (cfmjax/parallel/distributed.py), exactly as the launch scripts set them.
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

from cfmjax.parallel import distributed  # noqa: E402
from cfmjax.training import train  # noqa: E402


def main():
  workdir, overrides = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
  log = logging.getLogger("cfmjax")  # what `cfmjax train` prints: resumes, signals, process counts
  log.addHandler(logging.StreamHandler(sys.stderr))
  log.setLevel(logging.INFO)
  distributed.maybe_initialize()  # before anything touches a device (and what `cfmjax train` does)
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
