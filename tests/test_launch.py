"""The launch scripts in dry-run mode (DRY_RUN=1): the exact commands they would run."""

import os
import re
import subprocess

import pytest

from cfmjax.parallel import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "experiments/base_flow/markov_tiny.py"


def dry_run(script, *args, **env_vars):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "CFMJAX_", "XLA_"))}
  env.update(DRY_RUN="1", **env_vars)
  proc = subprocess.run(["bash", os.path.join(REPO, "launch", script), *args], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  return [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")], proc.stdout


def test_local_single_process():
  (cmd,), _ = dry_run("local.sh", CONFIG, "/tmp/w", "--config.mesh.tensor=2", FAKE_DEVICES="8")
  assert cmd == (f"XLA_FLAGS='--xla_force_host_platform_device_count=8' python -m cfmjax train "
                 f"--config={CONFIG} --workdir=/tmp/w --config.mesh.tensor=2")


def test_local_multi_process_rehearsal():
  cmds, _ = dry_run("local.sh", CONFIG, "/tmp/w", NUM_PROCESSES="2", FAKE_DEVICES="4", PORT="4567")
  assert len(cmds) == 2
  for p, cmd in enumerate(cmds):
    assert cmd.startswith("XLA_FLAGS='--xla_force_host_platform_device_count=4' "
                          f"CFMJAX_COORDINATOR_ADDRESS=127.0.0.1:4567 CFMJAX_NUM_PROCESSES=2 CFMJAX_PROCESS_ID={p} "
                          f"python -m cfmjax train --config={CONFIG} --workdir=/tmp/w")
    assert cmd.endswith(f"> /tmp/w/process_{p}.log 2>&1 &")


@pytest.mark.parametrize("nodelist, first", [("gpu[3-4]", "gpu3"), ("a[07-9,12],b2", "a07"),
                                             ("n1,n2,n3", "n1")])
def test_slurm_coordinator_is_the_first_node(nodelist, first):
  (cmd,), out = dry_run("slurm_gpu.sbatch", CONFIG, "/shared/w", "--config.train.batch_size=64",
                        SLURM_JOB_NODELIST=nodelist, SLURM_NNODES="3", SLURM_JOB_ID="77")
  assert f"coordinator: {first}:12355, 3 processes" in out
  assert cmd.startswith("srun --nodes=3 --ntasks=3 --ntasks-per-node=1 --kill-on-bad-exit=1 "
                        "--output=logs/cfmjax-77/node_%n.log bash -c ")
  task = cmd.split("bash -c ", 1)[1].replace("\\ ", " ")
  # One task per node; each reads its own rank from SLURM at run time ($SLURM_PROCID, unexpanded).
  assert task == (f"CFMJAX_COORDINATOR_ADDRESS={first}:12355 CFMJAX_NUM_PROCESSES=3 "
                  f"CFMJAX_PROCESS_ID=\\$SLURM_PROCID .venv/bin/python -m cfmjax train --config={CONFIG} "
                  "--workdir=/shared/w --config.train.batch_size=64")


def test_slurm_outside_an_allocation_says_so():
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  proc = subprocess.run(["bash", "launch/slurm_gpu.sbatch", CONFIG, "/w"], env=dict(env, DRY_RUN="1"),
                        cwd=REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode != 0 and "not inside a SLURM allocation" in proc.stderr


def test_tpu_pod_creates_ships_installs_and_runs_on_every_worker():
  cmds, out = dry_run("tpu_pod.sh", CONFIG, "gs://b/runs/x", "--config.train.batch_size=256",
                      TPU_NAME="cfm-v4-16", ZONE="us-central2-b", ACCELERATOR="v4-16", NUM_WORKERS="2")
  create, tar, scp, untar, install, *workers = cmds
  assert create == ("gcloud compute tpus tpu-vm create cfm-v4-16 --zone us-central2-b "
                    "--accelerator-type v4-16 --version tpu-ubuntu2204-base")
  assert tar.startswith("tar -czf /tmp/cfmjax-cfm-v4-16.tar.gz -T ")
  assert scp.startswith("gcloud compute tpus tpu-vm scp --zone us-central2-b --worker=all ")
  assert "--worker=all" in untar and "tar\\ -xzf" in untar
  assert "--worker=all" in install and "jax\\[tpu\\]==0.10.2" in install
  train = (f"cd ~/cfmjax && CFMJAX_DISTRIBUTED=auto .venv/bin/python -m cfmjax train --config={CONFIG} "
           "--workdir=gs://b/runs/x --config.train.batch_size=256")
  assert workers == [f"gcloud compute tpus tpu-vm ssh cfm-v4-16 --zone us-central2-b --worker={w} "
                     f"--command '{train}' > logs/cfm-v4-16/worker_{w}.log 2>&1 &" for w in range(2)]


def test_tpu_pod_can_pull_code_from_git():
  cmds, _ = dry_run("tpu_pod.sh", CONFIG, "gs://b/w", TPU_NAME="t", ZONE="z", ACCELERATOR="v5p-8",
                    NUM_WORKERS="1", REPO_URL="https://example.com/cfmjax.git", REF="v1")
  assert not any(c.startswith("tar ") for c in cmds)
  (pull,) = [c for c in cmds if "git" in c and "clone" in c]
  assert "--worker=all" in pull and re.search(r"clone\\ -q\\ --branch\\ v1\\ https://example.com/cfmjax.git", pull)


def test_tpu_pod_requires_its_variables():
  proc = subprocess.run(["bash", "launch/tpu_pod.sh", CONFIG, "gs://b/w"], cwd=REPO, capture_output=True,
                        text=True, timeout=60, env=dict(os.environ, DRY_RUN="1", TPU_NAME="t", ZONE="z"))
  assert proc.returncode != 0 and "ACCELERATOR" in proc.stderr


def test_distributed_reads_explicit_and_auto_environments(monkeypatch):
  for k in list(os.environ):
    if k.startswith(("SLURM_", "TPU_", "CFMJAX_")):
      monkeypatch.delenv(k)
  assert distributed.detect() is None  # a single process calls nothing
  monkeypatch.setenv("CFMJAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  with pytest.raises(ValueError, match="CFMJAX_NUM_PROCESSES, CFMJAX_PROCESS_ID"):
    distributed.detect()
  monkeypatch.setenv("CFMJAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("CFMJAX_PROCESS_ID", "3")
  assert distributed.detect() == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
  monkeypatch.delenv("CFMJAX_COORDINATOR_ADDRESS")
  monkeypatch.setenv("SLURM_JOB_ID", "1")
  monkeypatch.setenv("SLURM_NTASKS", "2")
  assert distributed.detect() == {}  # JAX reads SLURM itself
  monkeypatch.delenv("SLURM_NTASKS")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
  assert distributed.detect() == {}
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
  monkeypatch.setenv("CFMJAX_DISTRIBUTED", "auto")
  assert distributed.detect() == {}
