"""Export round trip: a parameter-only checkpoint gives the workdir's logits and samples, seeds a
distillation, and works through the command line; directories that are neither kind are refused."""

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from cfmjax.run import experiment, export, handoff, inference, loading
from cfmjax.training import train
from tests.conftest import tiny_config
from tests.test_report import run_cli


@pytest.fixture(scope="module")
def base_workdir(tmp_path_factory, markov_base):
  """A copy of the shared tiny base run (conftest.markov_base: 4 steps, V = 12), with a tokenizer file."""
  workdir = tmp_path_factory.mktemp("export") / "base"
  shutil.copytree(markov_base[0], workdir)
  (workdir / "tokenizer.model").write_bytes(b"a stand-in tokenizer file")  # copied verbatim
  return workdir


def _logits(exp, params):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, exp.config.data.seq_len, exp.vocab_size)).astype(np.float32)
  tau = rng.uniform(size=(8,)).astype(np.float32)
  with exp.activate():
    return np.asarray(jax.jit(exp.apply_fn)(params, x, tau, tau))


@pytest.mark.slow
def test_exported_checkpoint_matches_the_workdir(base_workdir, tmp_path):
  exp_w, params_w, step_w = loading.load(str(base_workdir))
  out32, out16 = tmp_path / "f32", tmp_path / "bf16"
  info = export.write(exp_w, params_w, step_w, str(base_workdir), str(out32), "float32")
  export.write(exp_w, params_w, step_w, str(base_workdir), str(out16), "bfloat16")
  assert info["step"] == step_w == 4 and info["dtype"] == "float32"

  # The file itself: documented names ("/"-joined Flax paths) holding the EMA weights.
  tensors = load_file(str(out32 / export.PARAMS_FILE))
  flat = {"/".join(key.key for key in path): np.asarray(value)
          for path, value in jax.tree_util.tree_flatten_with_path(params_w)[0]}
  assert set(tensors) == set(flat) and info["num_params"] == sum(v.size for v in flat.values())
  assert all(np.array_equal(tensors[k], flat[k]) for k in flat)
  assert (out32 / "tokenizer.model").read_bytes() == b"a stand-in tokenizer file"
  assert json.loads((out32 / "config.json").read_text())["model"]["d_model"] == 32

  exp_e, params_e, step_e = loading.load(str(out32))
  assert step_e == step_w
  logits_w = _logits(exp_w, params_w)
  np.testing.assert_array_equal(_logits(exp_e, params_e), logits_w)  # float32: bit for bit
  exp_h, params_h, _ = loading.load(str(out16))
  logits_h = _logits(exp_h, params_h)
  assert not np.array_equal(logits_h, logits_w)  # the weights really were rounded...
  np.testing.assert_allclose(logits_h, logits_w, atol=0.05 * np.abs(logits_w).max())  # ...to bf16

  sample = lambda exp, params: inference.generate(exp, params, inference.Sampling("euler", 4, 8), 8, seed=3)
  np.testing.assert_array_equal(sample(exp_e, params_e), sample(exp_w, params_w))

  # A distillation seeded from the export starts from exactly the workdir's EMA weights.
  def base_params(init_from):
    config = tiny_config(**{"objective": "psd", "init_from": init_from})
    exp = experiment.build(handoff.inherit_base_config(config, str(tmp_path / "d"))[0], None)
    return handoff.load_base_params(exp)

  from_export, from_workdir = base_params(str(out32)), base_params(str(base_workdir))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                         from_export, from_workdir)
  config = tiny_config(**{"objective": "psd", "init_from": str(out16), "train.num_steps": 1})
  last = train.train(config, str(tmp_path / "distilled"))
  assert last["step"] == 1 and np.isfinite(last["loss"])


def test_export_and_eval_through_the_command_line(base_workdir, tmp_path):
  out = tmp_path / "exported"
  run_cli("export", f"--workdir={base_workdir}", f"--out={out}", "--dtype=bfloat16")
  info = json.loads((out / "export_info.json").read_text())
  assert info["dtype"] == "bfloat16" and info["step"] == 4 and info["source_workdir"] == str(base_workdir)
  run_cli("eval", f"--checkpoint={out}", "--steps=2", "--num_samples=16", "--batch_size=16")
  # results live next to the export; the exact-denoiser reference (Markov source) follows the model's record
  record, exact = json.loads((out / "eval" / "results.json").read_text())
  assert exact["sampler"] == "euler_exact" and exact["steps"] == 2
  assert record["steps"] == 2 and record["judge"] == "exact" and record["gen_ppl"] > 1
  assert (out / "eval" / "results.md").exists() and (out / "eval" / "results.png").exists()


def test_directories_that_are_neither_kind_are_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither an exported checkpoint"):
    loading.load(str(tmp_path))
  (tmp_path / "export_info.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="lacks params.safetensors, config.json"):
    loading.load(str(tmp_path))
  config = tiny_config(**{"objective": "psd", "init_from": str(tmp_path / "nowhere")})
  with pytest.raises(FileNotFoundError, match="neither an exported checkpoint"):
    handoff.inherit_base_config(config, str(tmp_path / "d"))
