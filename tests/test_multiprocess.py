"""Real multi-process JAX on localhost: 2 processes x 4 CPU devices against 1 process x 8 devices.

The processes find each other through CFMJAX_COORDINATOR_ADDRESS / CFMJAX_NUM_PROCESSES /
CFMJAX_PROCESS_ID (what launch/slurm_gpu.sbatch sets) and talk over gloo, JAX's CPU collectives.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from cfmjax.data import pipeline
from cfmjax.run import checkpointing, experiment
from cfmjax.training import train
from tests.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(REPO, "tests", "train_driver.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _run_processes(workdir, overrides, num_processes=2, devices_per_process=4):
  port = _free_port()
  procs = []
  for p in range(num_processes):
    env = dict(os.environ, JAX_PLATFORMS="cpu", CFMJAX_TEST_DEVICES=str(devices_per_process),
               CFMJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", CFMJAX_NUM_PROCESSES=str(num_processes),
               CFMJAX_PROCESS_ID=str(p))
    procs.append(subprocess.Popen([sys.executable, DRIVER, str(workdir), json.dumps(overrides)], cwd=REPO,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outputs = []
  for proc in procs:
    try:
      out, _ = proc.communicate(timeout=480)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outputs.append(out)
  for p, (proc, out) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0, f"process {p} failed:\n{out[-4000:]}"
  return outputs


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume_in_one(tmp_path, cache_dir):
  """2x4 devices == 1x8 devices step by step; the 2-process checkpoint then resumes in 1 process."""
  overrides = {"train.num_steps": 3, "train.checkpoint_every": 3}
  two = tmp_path / "two_processes"
  outputs = _run_processes(two, overrides)
  assert "process 1 of 2, 4 local / 8 global devices" in outputs[1]

  one = tmp_path / "one_process"  # the same global batch of 16 rows, 8 devices in this process
  train.train(tiny_config(**dict(overrides, **{"train.num_steps": 5})), str(one))
  ref, got = _losses(one), _losses(two)
  assert sorted(got) == [1, 2, 3]
  np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [ref[s] for s in (1, 2, 3)], rtol=1e-5)

  # Written collectively: each process wrote its part of the array store.
  state_dir = two / "checkpoints" / "3" / "state"
  assert (state_dir / "ocdbt.process_0").is_dir() and (state_dir / "ocdbt.process_1").is_dir()
  data = json.loads(next((two / "checkpoints" / "3" / "data").glob("*")).read_text())
  assert data["process_count"] == 2 and data["global_batch"] == 16
  # The saved position, read by one process, continues with the rows an uninterrupted run reads next.
  source = pipeline.build_data(tiny_config().data, None)
  resumed, straight = source.train_iterator(16), source.train_iterator(16)
  resumed.set_state(data["iterator"])
  for _ in range(3):
    next(straight)
  np.testing.assert_array_equal(next(resumed), next(straight))

  # Elastic: the 2-process checkpoint (state and data position) resumes in this single process.
  train.train(tiny_config(**dict(overrides, **{"train.num_steps": 5})), str(two))
  got = _losses(two)
  assert sorted(got) == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([got[s] for s in (4, 5)], [ref[s] for s in (4, 5)], rtol=1e-5)


def _markov(tmp_path):
  return pipeline.build_data(tiny_config().data, None)


def _text(tmp_path):
  from tests.test_data import _text_data  # noqa: PLC0415 (a small corpus of unique paragraphs)

  return _text_data(tmp_path)


@pytest.mark.parametrize("make_data", [_markov, _text])
def test_processes_read_disjoint_slices_of_the_same_global_batches(tmp_path, make_data):
  """Process p of P holds rows [p*B/P, (p+1)*B/P) of the global batch a single process would read."""
  data = make_data(tmp_path)
  single = data.train_iterator(16)
  shards = [data.train_iterator(4, process_index=p, process_count=4) for p in range(4)]
  for _ in range(3):
    np.testing.assert_array_equal(np.concatenate([next(s) for s in shards]), next(single))
  states = {json.dumps(s.get_state()) for s in shards}
  assert states == {json.dumps(single.get_state())}  # one position, valid for any process count
  # ... so 4 processes' position resumes in 2 processes, continuing the same global stream.
  halves = [data.train_iterator(8, process_index=p, process_count=2) for p in range(2)]
  for h in halves:
    h.set_state(shards[0].get_state())
  np.testing.assert_array_equal(np.concatenate([next(h) for h in halves]), next(single))


@pytest.mark.slow
def test_checkpoint_from_8_devices_restores_onto_4(tmp_path, cache_dir):
  """Train 2 steps on 8 devices, resume on 4: the same trajectory as 4 straight steps on 8 devices."""
  straight, elastic = tmp_path / "straight", tmp_path / "elastic"
  train.train(tiny_config(), str(straight))
  train.train(tiny_config(**{"train.num_steps": 2}), str(elastic))
  train.train(tiny_config(), str(elastic), devices=jax.devices()[:4])
  a, b = _losses(straight), _losses(elastic)
  assert sorted(b) == [1, 2, 3, 4]
  np.testing.assert_allclose([b[s] for s in (3, 4)], [a[s] for s in (3, 4)], rtol=1e-5)
  # The restored state really lives on the 4-device mesh.
  exp = experiment.build(tiny_config(), None, devices=jax.devices()[:4])
  ckpt = checkpointing.Checkpointer(str(elastic / "checkpoints"))
  step, state, data_state = ckpt.restore_latest(exp.abstract_state, global_batch=16)
  ckpt.close()
  assert step == 4 and data_state == {"next_index": 4}
  assert all(len(x.sharding.device_set) == 4 for x in jax.tree_util.tree_leaves(state["params"]))


@pytest.mark.slow
def test_launch_local_two_processes_run_the_real_cfmjax_train_on_a_token_store(tmp_path):
  """`cfmjax prepare` on a folder of text files, then `NUM_PROCESSES=2 launch/local.sh` runs `cfmjax train`
  itself (no test driver): 2 processes x 2 CPU devices, each reading only its rows of the store, match
  1 process x 4 devices step by step."""
  from tests.conftest import TINY_FLAGS, run_cli  # noqa: PLC0415
  from tests.test_experiments import write_corpus  # noqa: PLC0415

  write_corpus(str(tmp_path / "corpus"), num_docs=200)
  run_cli("prepare", "--config=experiments/base_flow/text_tiny.py", f"--out={tmp_path / 'store'}",
          "--config.data.source=text", f"--config.data.text.paths={tmp_path / 'corpus' / '*.txt'}",
          "--config.data.seq_len=16", "--config.data.tokenizer.vocab_size=64", "--config.data.heldout_fraction=0.2",
          f"--config.data.cache_dir={tmp_path / 'cache'}")
  env = dict(os.environ, PYTHON=sys.executable, PORT=str(_free_port()), JAX_PLATFORMS="cpu",
             XLA_FLAGS=" ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count")))
  args = ["--config.data.source=prepared", f"--config.data.prepared.path={tmp_path / 'store'}", *TINY_FLAGS,
          "--config.train.num_steps=3", "--config.train.eval_every=0"]
  for name, processes, devices in (("two", "2", "2"), ("one", "1", "4")):
    proc = subprocess.run(["bash", "launch/local.sh", "experiments/base_flow/text_tiny.py", str(tmp_path / name),
                           *args], cwd=REPO, env=dict(env, NUM_PROCESSES=processes, FAKE_DEVICES=devices),
                          capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text() for p in (tmp_path / name).glob("process_*.log"))
    assert proc.returncode == 0, (proc.stderr + logs)[-4000:]
  assert "process 1 of 2, 2 local / 4 global devices" in (tmp_path / "two" / "process_1.log").read_text()
  two, one = _losses(tmp_path / "two"), _losses(tmp_path / "one")
  assert sorted(two) == [1, 2, 3]
  np.testing.assert_allclose([two[s] for s in (1, 2, 3)], [one[s] for s in (1, 2, 3)], rtol=1e-5)


@pytest.mark.slow
def test_two_process_eval_gives_the_one_process_numbers(tmp_path, markov_base):
  """`cfmjax eval` (samples + exact judge, the exact-denoiser reference, the denoiser gap and the
  likelihood bound) in 2 processes x 4 CPU devices writes the numbers 1 process x 8 devices writes:
  generation, held-out rows and bound calls are split over all 8 devices and gathered (sharding.to_host),
  and only process 0 writes the results."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=" ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count")))
  args = ["eval", f"--checkpoint={markov_base[0]}", "--steps=2,4", "--num_samples=24", "--batch_size=8",
          "--judge=exact", "--denoiser_gap", "--denoiser_gap_rows=16", "--denoiser_gap_bins=4", "--likelihood",
          "--likelihood_rows=8", "--likelihood_selection_rows=8", "--likelihood_points=8",
          "--likelihood_endpoints=2,4"]
  port = _free_port()
  runs = {"one": [dict(env, XLA_FLAGS=env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8")]}
  runs["two"] = [dict(env, XLA_FLAGS=env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=4",
                      CFMJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", CFMJAX_NUM_PROCESSES="2",
                      CFMJAX_PROCESS_ID=str(p)) for p in range(2)]
  results = {}
  for name, envs in runs.items():
    workdir = tmp_path / name
    procs = [subprocess.Popen([sys.executable, "-m", "cfmjax", *args, f"--workdir={workdir}"], cwd=REPO, env=e,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for e in envs]
    outs = [p.communicate(timeout=540)[0] for p in procs]
    for p, out in zip(procs, outs):
      assert p.returncode == 0, out[-4000:]
    results[name] = {(r.get("sampler"), r.get("steps"), r.get("metric")): r
                     for r in json.loads((workdir / "eval" / "results.json").read_text())}
    results[name + "_gap"] = json.loads((workdir / "eval" / "denoiser_gap.json").read_text())
  assert "process 1 of 2, 4 local / 8 global devices" in outs[1]
  one, two = results["one"], results["two"]
  assert sorted(one, key=str) == sorted(two, key=str) and len(one) >= 5  # euler 2/4, exact 2/4, bound
  for key, r in one.items():
    for field in ("gen_nll_per_token", "entropy", "value", "stderr"):
      if field in r:
        np.testing.assert_allclose(two[key][field], r[field], rtol=1e-5, err_msg=f"{key} {field}")
  np.testing.assert_allclose(results["two_gap"]["denoiser_ce"], results["one_gap"]["denoiser_ce"], rtol=1e-5)


@pytest.mark.slow
def test_two_process_lm_eval_scores_on_the_whole_mesh_like_one_process(markov_base):
  """The lm-eval adapter on a flow, 2 processes x 4 devices (process 0 runs the harness, process 1
  serves its network calls) against 1 process x 8: the same conditional-bound log-likelihoods, the
  same generated text and the same harness accuracy."""
  driver = os.path.join(REPO, "tests", "lm_eval_driver.py")
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_DATASETS_OFFLINE="1")
  port = _free_port()
  runs = {"one": [dict(env, CFMJAX_TEST_DEVICES="8")],
          "two": [dict(env, CFMJAX_TEST_DEVICES="4", CFMJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                       CFMJAX_NUM_PROCESSES="2", CFMJAX_PROCESS_ID=str(p)) for p in range(2)]}
  results = {}
  for name, envs in runs.items():
    procs = [subprocess.Popen([sys.executable, driver, str(markov_base[0])], cwd=REPO, env=e,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for e in envs]
    outs = [p.communicate(timeout=540)[0] for p in procs]
    for p, out in zip(procs, outs):
      assert p.returncode == 0, out[-4000:]
    (line,) = [x for x in outs[0].splitlines() if x.startswith("RESULT ")]
    results[name] = json.loads(line[len("RESULT "):])
  one, two = results["one"], results["two"]
  assert len(one["loglikelihoods"]) >= 6 and all(v < 0 for v in one["loglikelihoods"])
  np.testing.assert_allclose(two["loglikelihoods"], one["loglikelihoods"], rtol=1e-5)
  assert two["texts"] == one["texts"] and two["acc"] == one["acc"]
