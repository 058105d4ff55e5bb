"""FLOP accounting (cfmjax/models/flops.py) against a hand count and against XLA's own count; MFU logging."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from tests.conftest import tiny_config

from cfmjax import objectives
from cfmjax.models import flops
from cfmjax.run import experiment
from cfmjax.training import train

# tiny_config(): V = 8, D = 32, 2 layers, MLP 64, 16 time features per time, L = 16, batch 16.
# One sequence's forward, matmul by matmul, in multiply-accumulates (MACs):
INPUT = 16 * 8 * 32            # state [16 positions, V] @ W [V, D]
TIME_IN = (2 * 16) * 32        # [sin/cos features of s and t] @ [2·16, D]
TIME_OUT = 32 * 32
ADALN = 2 * (32 * 6 * 32)      # per layer: cond [D] @ [D, 6D]
QKV = 2 * (16 * 32 * 3 * 32)   # per layer: [16, D] @ [D, 3D]
SCORES = 2 * (16 * 16 * 32)    # per layer: 2 heads × [16, 16] × head dim 16, full (bidirectional)
VALUES = 2 * (16 * 16 * 32)    # per layer: probabilities [16, 16] @ values, same size
ATTN_OUT = 2 * (16 * 32 * 32)
MLP = 2 * (16 * 32 * 64 + 16 * 64 * 32)
FINAL_ADALN = 32 * 2 * 32
HEAD = 16 * 32 * 8
POSTERIOR = 16 * 8 * 32        # model.posterior_input: softmax(evidence) [16, V] @ E [V, D]
FORWARD = POSTERIOR + INPUT + TIME_IN + TIME_OUT + ADALN + QKV + SCORES + VALUES + ATTN_OUT + MLP + FINAL_ADALN + HEAD
# Forward + backward: every matmul 3× (forward, input gradient, weight gradient), except the three whose
# inputs are not parameters-dependent (the noisy state, the time features, the state's own posterior):
# no input gradient.
TRAIN = 3 * FORWARD - INPUT - TIME_IN - POSTERIOR


def test_base_step_matches_the_hand_count():
  assert FORWARD == 323_584  # the sum above, written out once
  got = objectives.step_flops(tiny_config(), vocab=8)
  assert got["forward"] == 2 * 16 * FORWARD
  assert got["total"] == 2 * 16 * TRAIN


def test_distillation_steps_match_the_hand_count():
  # diag_fraction 0.25 of 16 rows: 4 diagonal rows (a base step), 12 consistency rows (student
  # forward + backward, and a teacher that is never differentiated).
  student = 2 * (4 * TRAIN + 12 * TRAIN)
  psd = objectives.step_flops(tiny_config(**{"objective": "psd"}), vocab=8)
  assert psd["total"] == student + 2 * 12 * (2 * FORWARD)  # two teacher forwards
  # LSD: a JVP in t (forward + tangent pass: every matmul downstream of t once more, the input
  # projection not at all, the two attention products twice) and one more forward.
  tangent_t = FORWARD - INPUT - POSTERIOR + SCORES + VALUES
  lsd = objectives.step_flops(tiny_config(**{"objective": "lsd"}), vocab=8)
  assert lsd["total"] == student + 2 * 12 * (FORWARD + tangent_t + FORWARD)
  # ESD: the tangent runs in (x, s), so the input projection carries it too.
  esd = objectives.step_flops(tiny_config(**{"objective": "esd"}), vocab=8)
  assert esd["total"] == student + 2 * 12 * (FORWARD + FORWARD + tangent_t + INPUT + POSTERIOR)


def test_fixed_point_and_guided_distillation_steps_match_the_hand_count():
  # Fixed point (fixed_point.py): no diagonal split; all 16 rows are student rows (forward +
  # backward), and each target is k passes of the frozen self-conditioned base.
  for k in (1, 3):
    fp = objectives.step_flops(tiny_config(**{"objective": "fixed_point",
                                         "distill.fixed_point_iters": k}), vocab=8)
    assert fp["diagonal_rows"] == 0 and fp["consistency_rows"] == 16
    assert fp["total"] == 2 * 16 * TRAIN + 2 * 16 * k * FORWARD
  # Guided PSD: the 4 diagonal rows' target is two frozen-base passes (conditional, unconditional).
  guided = objectives.step_flops(tiny_config(**{"objective": "psd", "distill.guidance": 1.5}),
                            vocab=8)
  assert guided["total"] == 2 * 16 * TRAIN + 2 * 12 * (2 * FORWARD) + 2 * 4 * (2 * FORWARD)


def test_conventions_embedding_state_causal_and_remat():
  # Embedding-space state: no V×D input matmul; the noise is z Lᵀ (D² per position, forward and the
  # gradient into L), and WᵀW plus its Cholesky factor once per step (×3 with their backward).
  c = tiny_config()
  c.model.state_space = "embedding"
  noise = 16 * 16 * 32 * 32
  factor = 2 * 8 * 32 * 32 + 32 ** 3 / 3
  expected = 2 * 16 * (TRAIN - 2 * INPUT) + 2 * 2 * noise + 3 * factor
  assert objectives.step_flops(c, vocab=8)["total"] == pytest.approx(expected, rel=1e-12)
  # 'auto' picks the embedding state only when V > D.
  assert flops.dims_from_config(c, vocab=8).embedding_state
  c.model.state_space = "auto"
  assert not flops.dims_from_config(c, vocab=8).embedding_state
  assert flops.dims_from_config(c, vocab=50257).embedding_state
  # Causal under XLA attention: the full L×L is executed (and counted); the fused kernel skips half.
  # The AR reads token ids: no noisy state, so no posterior input.
  causal = tiny_config(**{"objective": "ar"})
  assert objectives.step_flops(causal, vocab=8)["forward"] == 2 * 16 * (FORWARD - POSTERIOR)
  fused = tiny_config(**{"objective": "ar", "model.attention": "cudnn"})
  half = 2 * (16 * 17 / 2 * 32)
  assert objectives.step_flops(fused, vocab=8)["forward"] == 2 * 16 * (FORWARD - POSTERIOR - SCORES - VALUES + 2 * half)
  # Remat: model FLOPs ignore recomputation; hardware FLOPs add one forward of the blocks (full) or
  # the attention einsums (dots: only matmuls without batch dimensions are saved).
  full = tiny_config(**{"model.remat": "full"})
  assert objectives.step_flops(full, vocab=8)["total"] == 2 * 16 * TRAIN
  blocks = ADALN + QKV + SCORES + VALUES + ATTN_OUT + MLP
  assert objectives.step_flops(full, vocab=8, hardware=True)["total"] == 2 * 16 * (TRAIN + blocks)
  dots = tiny_config(**{"model.remat": "dots"})
  assert objectives.step_flops(dots, vocab=8, hardware=True)["total"] == 2 * 16 * (TRAIN + SCORES + VALUES)


@pytest.mark.parametrize("objective", ["flow", pytest.param("esd", marks=pytest.mark.slow)])
def test_step_count_agrees_with_xla_cost_analysis(objective, cache_dir):
  """XLA counts every floating-point op of the compiled gradient; flops.py counts matmuls only.

  So XLA's figure must be at least ours, and above it by no more than the element-wise work (layer
  norms, softmaxes, GELU, rotary, noise; ≈ 2-4% at D = 128, checked up to 6%). Layers are unrolled:
  XLA's cost analysis counts a while loop's body once, not once per iteration (a scanned model
  would read ~half). The optimizer update is left out: pure element-wise work on the parameters.
  """
  overrides = {"model.scan_layers": False, "model.d_model": 128, "model.num_heads": 4,
               "model.mlp_dim": 512, "data.markov.vocab_size": 64, "data.seq_len": 32,
               "train.batch_size": 8, "objective": objective, "distill.mode": "joint"}
  exp = experiment.build(tiny_config(**overrides), None, devices=jax.devices()[:1])
  grad_fn = train.grad_fn_for(exp)
  params = exp.abstract_state["params"]
  tokens = jax.ShapeDtypeStruct((8, 32), jnp.int32)
  step = lambda p, t: grad_fn(p, t, jax.random.key(0), p, jnp.int32(0))[0]
  xla = jax.jit(step).lower(params, tokens).compile().cost_analysis()["flops"]
  ours = objectives.step_flops(exp.config, vocab=exp.vocab_size)["total"]
  assert 1.0 <= xla / ours < 1.06, (xla, ours)


def test_peak_table_and_throughput():
  assert flops.table_peak_flops("TPU v5 lite") == 197e12  # v5e, not v5p
  assert flops.table_peak_flops("TPU v5") == 459e12
  assert flops.table_peak_flops("TPU v6 lite") == 918e12
  assert flops.table_peak_flops("TPU v4") == 275e12
  assert flops.table_peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
  assert flops.table_peak_flops("NVIDIA H200") == 989.4e12
  assert flops.table_peak_flops("NVIDIA A10G") is None
  t = flops.throughput(4e12, 2.0, 8, 1e12)
  assert t == {"model_tflops_per_sec_per_device": 1.0, "mfu": 1.0}
  assert flops.throughput(4e12, 2.0, 8, None)["mfu"] is None
  # Above the peak: the peak is wrong (a CPU peak measured under load), so no MFU at all.
  assert flops.throughput(4e12, 2.0, 8, 0.5e12)["mfu"] is None


def test_cpu_peak_is_used_only_on_the_machine_that_measured_it(tmp_path, cache_dir):
  cpu = jax.devices()[0]
  assert flops.device_peak(cpu, "float32").flops is None  # nothing measured here: MFU is null
  assert "bench/cpu_matmul_peak.py" in flops.device_peak(cpu, "float32").source
  path = flops.cpu_peak_path()
  assert path.startswith(str(cache_dir))
  os.makedirs(os.path.dirname(path))
  with open(path, "w") as f:
    json.dump({"peak_flops": {"float32": 8e10}, "machine_id": flops.machine_id(), "measured_at": "T"}, f)
  peak = flops.device_peak(cpu, "float32", num_devices=8)
  assert peak.flops == 1e10 and peak.source == "cpu float32 measured here T"
  assert flops.device_peak(cpu, "bfloat16", num_devices=8).flops is None
  # Another machine's file (same CPU model, or the old committed one without an id) is not used.
  for other in ({"peak_flops": {"float32": 8e10}, "machine_id": "another"},
                {"peak_flops": {"float32": 8e10}, "cpu_model": flops.cpu_model(), "cpu_count": os.cpu_count()}):
    with open(path, "w") as f:
      json.dump(other, f)
    assert flops.device_peak(cpu, "float32").flops is None


def test_cpu_peak_script_refuses_a_busy_machine_and_writes_this_machines_cache(tmp_path):
  env = dict(os.environ, CFMJAX_CACHE=str(tmp_path))
  script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "cpu_matmul_peak.py")
  busy = subprocess.run([sys.executable, script, "--max_load=-1", "--size=64", "--repeats=1"], env=env,
                        capture_output=True, text=True)
  assert busy.returncode != 0 and "load average" in busy.stderr and not (tmp_path / "cpu_peak").exists()
  ok = subprocess.run([sys.executable, script, "--max_load=inf", "--size=64", "--repeats=2"], env=env,
                      capture_output=True, text=True)
  assert ok.returncode == 0, ok.stderr[-2000:]
  (written,) = (tmp_path / "cpu_peak").glob("*.json")
  saved = json.loads(written.read_text())
  assert saved["peak_flops"]["float32"] > 0 and len(saved["load_average"]) == 2


@pytest.mark.slow
def test_trainer_logs_model_flops_per_device_and_mfu(tmp_path, cache_dir, capsys):
  """MFU against this machine's measured peak (here a planted one, far above anything reachable), and
  the peak's source in metrics.jsonl and on the progress line; null without a peak."""
  os.makedirs(os.path.dirname(flops.cpu_peak_path()))
  with open(flops.cpu_peak_path(), "w") as f:
    json.dump({"peak_flops": {"float32": 8e15}, "machine_id": flops.machine_id(), "measured_at": "T"}, f)
  config = tiny_config(**{"train.num_steps": 2, "train.checkpoint_every": 100})
  train.train(config, str(tmp_path / "a"))
  records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
  per_step = objectives.step_flops(tiny_config(), vocab=8)["total"]
  for r in records:
    expected = per_step * r["steps_per_sec"] / 8 / 1e12
    assert r["model_tflops_per_sec_per_device"] == pytest.approx(expected, rel=1e-9)
    assert r["mfu"] == pytest.approx(expected * 1e12 / 1e15, rel=1e-9) and r["mfu"] < 1
    assert r["mfu_peak"] == "cpu float32 measured here T"
  assert "of cpu float32 measured here T" in capsys.readouterr().out

  os.remove(flops.cpu_peak_path())
  train.train(tiny_config(**{"train.num_steps": 1, "train.checkpoint_every": 100}), str(tmp_path / "b"))
  (r,) = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
  assert r["mfu"] is None and r["mfu_peak"].startswith("none:") and " mfu " not in capsys.readouterr().out
