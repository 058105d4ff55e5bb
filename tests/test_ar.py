"""The autoregressive baseline and the judges: cached decoding, exact scoring, re-tokenisation."""

import math
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from cfmjax.data import markov as markov_lib
from cfmjax.data.tokenizer import train_sentencepiece
from cfmjax.evaluation import evaluate, judges
from cfmjax.flow import scores
from cfmjax.models import model
from cfmjax.objectives import ar
from cfmjax.run import inference
from cfmjax.training import train
from tests.conftest import tiny_config


def _random_params(config, seed=0):
  """Initial parameters plus noise, so that the zero-initialised adaLN gates are switched on."""
  init_fn, _ = ar.build(config)
  params = nn.meta.unbox(init_fn(jax.random.key(seed), 1, 8))
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return treedef.unflatten([p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def _numpy_nll(logits, tokens):
  """Σ −log softmax(logits)[token] in float64 numpy: the reference for every scorer."""
  logits = np.asarray(logits, np.float64)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  return -np.take_along_axis(log_probs, np.asarray(tokens)[..., None], axis=-1)[..., 0].sum(-1)


@pytest.mark.parametrize("scan_layers", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_cached_decoding_matches_the_full_causal_forward_pass(scan_layers):
  config = model.ModelConfig(vocab_size=13, d_model=32, num_layers=2, num_heads=2, mlp_dim=64,
                             scan_layers=scan_layers, causal=True)
  params = _random_params(config)
  _, apply_fn = ar.build(config)
  tokens = jax.random.randint(jax.random.key(2), (3, 10), 0, 13)
  full = np.asarray(apply_fn(params, tokens))
  _, cached = jax.jit(lambda p, t: ar.decode(p, config, None, 3, 10, tokens=t))(params, tokens)
  np.testing.assert_allclose(np.asarray(cached), full, atol=1e-5, rtol=1e-5)
  assert np.abs(full).max() > 1.0  # logits are far from trivial
  # Causal: changing token 5 changes no prediction at positions ≤ 5 (they see tokens < 5... < 6).
  changed = np.asarray(apply_fn(params, tokens.at[:, 5].set((tokens[:, 5] + 1) % 13)))
  np.testing.assert_allclose(changed[:, :6], full[:, :6], atol=1e-6)
  assert np.abs(changed[:, 6:] - full[:, 6:]).max() > 1e-3


def test_sampling_is_reproducible_and_follows_the_model():
  config = model.ModelConfig(vocab_size=5, d_model=32, num_layers=2, num_heads=2, mlp_dim=64, causal=True)
  params = _random_params(config, seed=3)
  _, apply_fn = ar.build(config)
  draw = jax.jit(lambda p, r: ar.sample(p, config, r, 512, 6))
  a, b = np.asarray(draw(params, jax.random.key(7))), np.asarray(draw(params, jax.random.key(7)))
  np.testing.assert_array_equal(a, b)
  assert (a != np.asarray(draw(params, jax.random.key(8)))).any()
  # The first token's empirical distribution matches softmax(start logits) (within ~4 sigma).
  p0 = np.asarray(jax.nn.softmax(apply_fn(params, a[:1])[0, 0]))
  freq = np.bincount(a[:, 0], minlength=5) / len(a)
  assert np.all(np.abs(freq - p0) < 4 * np.sqrt(p0 * (1 - p0) / len(a)) + 1e-3), (freq, p0)


def _write_corpus(path, num_docs=60, seed=0):
  words = "in the beginning god created heavens and earth was without form void darkness".split()
  rng = np.random.default_rng(seed)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "corpus.txt"), "w") as f:
    f.write("\n\n".join(" ".join(rng.choice(words, size=rng.integers(8, 30))) for _ in range(num_docs)))


@pytest.mark.slow
def test_ar_trains_and_judges_text_exactly_also_across_tokenizers(tmp_path, cache_dir):
  _write_corpus(tmp_path / "corpus")
  config = tiny_config(**{"data.source": "text", "data.text.paths": str(tmp_path / "corpus" / "*.txt"),
                          "data.heldout_fraction": 0.2, "data.tokenizer.vocab_size": 48,
                          "objective": "ar", "train.num_steps": 2})
  workdir = str(tmp_path / "ar")
  last = train.train(config, workdir)
  assert np.isfinite(last["loss"]) and 0 < last["loss"] < 2 * math.log(48)

  judge = judges.make_judge(f"ar:{workdir}", None)
  assert judge.name == "ar:ar"
  exp, params = judge.exp, judge.params
  tokenizer = exp.data.tokenizer
  rows = exp.data.eval_rows(5)
  # Token ids straight through (same tokenizer file): equals a numpy log-softmax of the full forward.
  reference = _numpy_nll(exp.apply_fn(params, rows), rows).sum()
  total, count = judges.judge_samples(judge, rows, tokenizer)
  assert count == rows.size and total == pytest.approx(reference, rel=1e-5)
  # Exact held-out NLL record.
  record = ar.heldout_nll(exp, params, rows, batch_size=8)
  assert record["metric"] == "nll_per_token" and record["num_tokens"] == rows.size
  assert record["value"] == pytest.approx(reference / rows.size, rel=1e-5)
  assert record["ppl"] == pytest.approx(math.exp(record["value"]))

  # Samples written in a different tokenizer are decoded and re-tokenised by the judge.
  other = train_sentencepiece([open(tmp_path / "corpus" / "corpus.txt").read()],
                              str(tmp_path / "other.model"), vocab_size=30)
  texts = ["god created the heavens and the earth", "darkness was without form"]
  samples = np.array([other.encode(texts[0])[:6], other.encode(texts[1])[:6]])
  assert judges.tokenizer_fingerprint(other) != judge.tokenizer_fingerprint
  # The same tokenizer trained twice (into different directories) is recognised as the same.
  twin = train_sentencepiece([open(tmp_path / "corpus" / "corpus.txt").read()],
                             str(tmp_path / "twin" / "other.model"), vocab_size=30)
  assert open(twin.path, "rb").read() != open(other.path, "rb").read()
  assert judges.tokenizer_fingerprint(twin) == judges.tokenizer_fingerprint(other)
  total, count = judges.judge_samples(judge, samples, other)
  expected_ids = [np.array(tokenizer.encode(other.decode(row.tolist()))) for row in samples]
  assert count == sum(len(ids) for ids in expected_ids)
  reference = sum(_numpy_nll(exp.apply_fn(params, ids[None]), ids[None])[0] for ids in expected_ids)
  assert total == pytest.approx(reference, rel=1e-5)

  # Sampling through inference.generate: in the vocabulary, reproducible, and judged in a record.
  a = inference.generate(exp, params, inference.Sampling("ar", 0, 8), 8, seed=1)
  np.testing.assert_array_equal(a, inference.generate(exp, params, inference.Sampling("ar", 0, 8), 8, seed=1))
  assert a.shape == (8, config.data.seq_len) and 0 <= a.min() and a.max() < exp.vocab_size
  record = evaluate.score(exp.data, a, rows, judge)
  assert record["judge"] == "ar:ar" and record["gen_ppl"] == pytest.approx(math.exp(record["gen_nll_per_token"]))
  with pytest.raises(ValueError, match="sampler"):
    inference.generate(exp, params, inference.Sampling("euler", 4, 8), 8, seed=1)


def test_exact_judge_is_the_chains_likelihood_and_reads_text():
  chain = markov_lib.MarkovSource(6, 1, 0.3, 0)

  class Data:  # what make_judge reads from a pipeline.Data
    markov = chain

  judge = judges.make_judge("", Data)
  assert judge.name == "exact" and judges.make_judge("exact", Data).name == "exact"
  tokens = chain.rows(range(8), 12, "validation")
  total, count = judge.nll(tokens=tokens)
  assert count == tokens.size
  assert total / count == pytest.approx(scores.exact_markov_nll(chain, tokens), rel=1e-12)
  texts = [" ".join(map(str, row)) for row in tokens]
  assert judge.nll(texts=texts) == pytest.approx((total, count), rel=1e-12)
  with pytest.raises(ValueError, match="exactly one"):
    judge.nll()


def test_bad_judge_specs_are_refused():
  class Text:
    markov = None

  assert judges.make_judge("", Text) is None and judges.make_judge("none", Text) is None
  with pytest.raises(ValueError, match="Markov"):
    judges.make_judge("exact", Text)
  with pytest.raises(ValueError, match="unknown judge"):
    judges.make_judge("bert:/x", Text)


def test_the_ar_objective_is_trained_by_cfmjax_train_only(tmp_path):
  from cfmjax import objectives  # noqa: PLC0415
  from tests.conftest import _in_repo, run_cli  # noqa: PLC0415

  config = tiny_config(**{"objective": "ar"})
  assert objectives.stage(config) == "base" and objectives.get(config).sampler == "ar"
  assert tiny_config().model.get("causal") is None  # the objective, not a model key, says it
  with _in_repo(), pytest.raises(Exception, match="trained by `cfmjax train`"):
    run_cli("distill", "--config=experiments/ar/markov_tiny.py", f"--workdir={tmp_path}")
