"""Multi-process start-up: `jax.distributed.initialize` when (and only when) a job spans processes.

Recognised environments, in order:
  1. explicit:  CFMJAX_COORDINATOR_ADDRESS=host:port, CFMJAX_NUM_PROCESSES=N, CFMJAX_PROCESS_ID=i
     (what `launch/slurm_gpu.sbatch` and hand-rolled launchers set);
  2. SLURM with more than one task (SLURM_NTASKS > 1): JAX reads the SLURM variables itself;
  3. a Cloud TPU VM slice with several workers (TPU_WORKER_HOSTNAMES lists more than one host):
     JAX reads the TPU metadata itself;
  4. CFMJAX_DISTRIBUTED=auto (what `launch/tpu_pod.sh` sets): `jax.distributed.initialize()` with no
     arguments, i.e. JAX's own cluster detection (TPU metadata, SLURM, ...), whatever else is set.
A single-process run (a laptop, one GPU box, one TPU VM host) calls nothing.
"""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint  # noqa: F401 (defines the flag set below)
from absl import flags

log = logging.getLogger(__name__)


def detect() -> dict | None:
  """Returns the `jax.distributed.initialize` kwargs for this environment, or None."""
  env = os.environ
  if env.get("CFMJAX_DISTRIBUTED") == "auto":
    return {}
  if env.get("CFMJAX_COORDINATOR_ADDRESS"):
    missing = [k for k in ("CFMJAX_NUM_PROCESSES", "CFMJAX_PROCESS_ID") if k not in env]
    if missing:
      raise ValueError(f"CFMJAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not: set all three")
    return {"coordinator_address": env["CFMJAX_COORDINATOR_ADDRESS"],
            "num_processes": int(env["CFMJAX_NUM_PROCESSES"]),
            "process_id": int(env["CFMJAX_PROCESS_ID"])}
  if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env:
    return {}
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return {}
  return None


def maybe_initialize():
  kwargs = detect()
  if kwargs is None:
    return
  jax.distributed.initialize(**kwargs)
  # Orbax's barriers through the coordination service (with timeouts) rather than device
  # collectives, which on CPU (gloo) fail after 30 s when one process is still busy (compiling).

  flags.FLAGS["experimental_orbax_use_distributed_barrier"].value = True
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())
