"""`cfmjax sweep`: the grid, its points' workdirs and commands, the SLURM / TPU emission, and (slow tier) a
two-point sweep of tiny Markov runs that `cfmjax report` then compares in one table."""

import json

import pytest

from tests.conftest import TINY_FLAGS, run_cli, tiny_config

from cfmjax import sweep


def test_grid_points_are_typed_from_the_config_and_named():
  grid = sweep.parse_grid("flow.schedule=linear,argmax; optim.lr=1e-3,3e-3;model.skip=false")
  pts = sweep.points(tiny_config(), grid)
  assert len(pts) == 4 and pts[1] == {"flow.schedule": "linear", "optim.lr": 3e-3, "model.skip": False}
  assert sweep.point_name(pts[1]) == "schedule-linear_lr-0.003_skip-False"
  with pytest.raises(KeyError, match="unknown config key 'flow.shedule'"):
    sweep.points(tiny_config(), sweep.parse_grid("flow.shedule=linear"))
  with pytest.raises(ValueError, match="key=v1,v2"):
    sweep.parse_grid("flow.schedule")


def test_slurm_and_tpu_launches_write_the_points_commands_and_run_nothing(tmp_path):
  root = tmp_path / "sweep"
  out, _ = run_cli("sweep", "--config=experiments/base_flow/markov_tiny.py", f"--workdir={root}",
                   "--sweep=flow.schedule=linear,argmax", "--sweep_launch=slurm", "--config.train.num_steps=7")
  plan = json.loads((root / "sweep.json").read_text())
  assert [p["name"] for p in plan["points"]] == ["schedule-linear", "schedule-argmax"]
  script = (root / "sweep.sbatch").read_text()
  assert "#SBATCH --array=0-1" in script and script.count("cfmjax train") == 2
  assert "--config.train.num_steps=7 --config.flow.schedule=argmax" in script and "sbatch" in out
  assert not (root / "schedule-linear").exists()
  run_cli("sweep", "--config=experiments/base_flow/markov_tiny.py", f"--workdir={root}",
          "--sweep=flow.schedule=linear,argmax", "--sweep_launch=tpu")
  lines = [l for l in (root / "tpu_jobs.sh").read_text().splitlines() if l.startswith("launch/tpu_pod.sh")]
  assert len(lines) == 2 and lines[1].endswith("--config.flow.schedule=argmax")


def test_a_point_whose_objective_is_a_distillation_is_trained_by_cfmjax_train(tmp_path):
  """`cfmjax train` trains every objective (test_distill checks it runs a distillation), so a sweep
  and the launchers need one command whatever the points' objectives."""
  root = tmp_path / "sweep"
  run_cli("sweep", "--config=experiments/flow_map/markov_tiny_psd.py", f"--workdir={root}",
          "--sweep=objective=psd,esd", "--sweep_launch=slurm", "--config.init_from=/runs/base")
  script = (root / "sweep.sbatch").read_text()
  assert script.count("cfmjax train --config=experiments/flow_map/markov_tiny_psd.py") == 2
  assert "--config.init_from=/runs/base --config.objective=esd" in script
  run_cli("sweep", "--config=experiments/flow_map/markov_tiny_psd.py", f"--workdir={root}",
          "--sweep=objective=psd,esd", "--sweep_launch=tpu", "--config.init_from=/runs/base")
  lines = [l for l in (root / "tpu_jobs.sh").read_text().splitlines() if l.startswith("launch/tpu_pod.sh")]
  assert len(lines) == 2 and lines[1].endswith("--config.init_from=/runs/base --config.objective=esd")


@pytest.mark.slow
def test_a_two_point_sweep_runs_and_reports_from_one_command_each(tmp_path):
  root = tmp_path / "sweep"
  flags = [*TINY_FLAGS, "--config.data.markov.vocab_size=8", "--config.train.num_steps=2",
           "--config.train.eval_every=0", "--config.eval.steps=2", "--config.eval.num_samples=16",
           "--config.eval.batch_size=16"]
  run_cli("sweep", "--config=experiments/base_flow/markov_tiny.py", f"--workdir={root}",
          "--sweep=flow.schedule=linear,argmax", *flags)
  for name, schedule in (("schedule-linear", "linear"), ("schedule-argmax", "argmax")):
    saved = json.loads((root / name / "config.json").read_text())
    assert saved["flow"]["schedule"] == schedule and saved["train"]["num_steps"] == 2
    assert (root / name / "eval" / "results.json").exists()
  out, _ = run_cli("report", str(root), f"--out={tmp_path / 'report'}")
  header = out.splitlines()[0]
  assert header.startswith("| model | schedule-linear [Euler] |") and "| schedule-argmax [Euler] |" in header
  assert (tmp_path / "report" / "report.png").exists()
  # A rerun finds both points evaluated and runs nothing.
  out, _ = run_cli("sweep", "--config=experiments/base_flow/markov_tiny.py", f"--workdir={root}",
                   "--sweep=flow.schedule=linear,argmax", *flags)
  assert out.count("evaluated already, skipped") == 2
