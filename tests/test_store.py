"""The packed token store (data/store.py), its never-materialised permutation (data/permutation.py) and
the `prepared` data source: bijection, per-process slices, O(1) resume, byte-identical resumed and
multi-host preparation, damage reported by path, tokenizer and length mismatches refused."""

import json
import os

import numpy as np
import pytest

from tests.conftest import TINY_FLAGS, run_cli, tiny_config

from cfmjax.data import permutation, pipeline, store
from cfmjax.data.tokenizer import IdentityTokenizer, SentencePieceTokenizer, train_sentencepiece


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 100, 1000, 4097])
def test_permutation_is_a_bijection_for_every_small_n(n):
  images = [permutation.permute(np.arange(n), n, permutation.epoch_key(seed, epoch))
            for seed, epoch in ((0, 0), (0, 1), (5, 0))]
  for y in images:
    assert sorted(y.tolist()) == list(range(n))
  if n >= 100:  # a shuffle, and a different one per epoch and per seed
    assert not np.array_equal(images[0], np.arange(n))
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[0], images[2])


def test_permutation_at_ten_billion_rows_is_injective_and_uniform_on_a_sample():
  n = 10**10
  idx = np.random.default_rng(0).choice(n, 200_000, replace=False)
  y = permutation.permute(idx, n, permutation.epoch_key(3, 0))
  assert len(np.unique(y)) == len(idx) and y.min() >= 0 and y.max() < n
  # Uniform on [0, n): mean n/2 and every tenth of the range holds ~10% (binomial sd ~0.07%).
  assert abs(y.mean() / n - 0.5) < 0.005
  assert np.allclose(np.bincount(y * 10 // n, minlength=10) / len(y), 0.1, atol=0.004)


def _indexed_store(path, num_rows, seq_len=4, rows_per_shard=5):
  """A synthetic store whose row i starts with i (and continues i+1, ...), so a test sees which row it read."""
  store.write_synthetic(str(path), num_rows, seq_len, vocab_size=num_rows + seq_len, rows_per_shard=rows_per_shard,
                        row_fn=lambda idx: idx[:, None] + np.arange(seq_len)[None, :])
  s = store.TokenStore(str(path))
  return pipeline.Data("prepared", seq_len, num_rows + seq_len, IdentityTokenizer(num_rows + seq_len), None, {},
                       store=s)


def _first_column(batch):
  assert (batch - batch[:, :1] == np.arange(batch.shape[1])).all()  # each row is one stored row, whole
  return batch[:, 0].tolist()


def test_processes_read_disjoint_slices_whose_union_is_the_global_batch(tmp_path):
  data = _indexed_store(tmp_path / "s", 23)
  whole = data.train_iterator(8, 0, 1, seed=4)
  parts = [data.train_iterator(4, p, 2, seed=4) for p in range(2)]
  for k in range(6):  # 48 rows: two epochs of 23 and a bit
    global_rows = _first_column(next(whole))
    slices = [_first_column(next(it)) for it in parts]
    assert slices[0] + slices[1] == global_rows
    if k * 8 // 23 == (k * 8 + 7) // 23:  # within one epoch (one that straddles two may repeat a row)
      assert not set(slices[0]) & set(slices[1]) and len(set(global_rows)) == 8


def test_each_epoch_is_a_permutation_of_the_rows_and_epochs_differ(tmp_path):
  data = _indexed_store(tmp_path / "s", 12)
  it = data.train_iterator(4, seed=1)
  stream = sum((_first_column(next(it)) for _ in range(6)), [])
  epochs = [stream[:12], stream[12:]]
  assert all(sorted(e) == list(range(12)) for e in epochs) and epochs[0] != epochs[1]


def test_resume_with_another_process_count_continues_the_same_global_batches(tmp_path):
  data = _indexed_store(tmp_path / "s", 40)
  two = [data.train_iterator(3, p, 2, seed=2) for p in range(2)]
  for _ in range(5):
    for it in two:
      next(it)
  state = two[0].get_state()
  assert state == two[1].get_state() and len(json.dumps(state)) < 200  # one position, whatever the row count
  one = data.train_iterator(6, 0, 1, seed=2)
  one.set_state(state)
  reference = data.train_iterator(6, 0, 1, seed=2)
  for _ in range(5):
    next(reference)
  for _ in range(4):
    np.testing.assert_array_equal(next(one), next(reference))


def test_damaged_and_truncated_shards_are_reported_by_path(tmp_path):
  data = _indexed_store(tmp_path / "s", 10)
  shard = tmp_path / "s" / "train-00001.rows"
  raw = bytearray(shard.read_bytes())
  raw[store.row_bytes(4, data.store.dtype) + 6] ^= 0xFF  # a token byte of the shard's second row
  shard.write_bytes(bytes(raw))
  fresh = store.TokenStore(str(tmp_path / "s"))
  np.testing.assert_array_equal(fresh.read("train", [5])[0], [5, 6, 7, 8])  # its undamaged first row
  with pytest.raises(store.StoreError, match=r"row 1 of .*train-00001.rows fails its checksum"):
    fresh.read("train", [6])
  shard.write_bytes(bytes(raw[:-3]))
  with pytest.raises(store.StoreError, match=r"train-00001.rows has .* bytes where the manifest says 5 rows"):
    store.TokenStore(str(tmp_path / "s")).read("train", [5])


# --- Preparing from text --------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A folder of text files (one document per paragraph), its held-out split, and a tokenizer."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "night", "green", "quiet"]
  for f in range(3):
    paragraphs = [" ".join(rng.choice(words, rng.integers(5, 40))) for _ in range(60)]
    (root / f"part{f}.txt").write_text("\n\n".join(paragraphs))
  config = tiny_config(**{"data.source": "text", "data.text.paths": str(root / "*.txt"), "data.seq_len": 16,
                          "data.heldout_fraction": 0.2, "data.cache_dir": str(root / "cache")})
  train, evals, _, _ = pipeline._text_corpus(config.data)  # noqa: SLF001
  tokenizer = train_sentencepiece(iter(train), str(root / "tok.model"), vocab_size=64, model_type="bpe")
  return config, train, evals, tokenizer.path


def _prepare(corpus, out, **kwargs):
  _, train, evals, tokenizer = corpus
  return store.prepare(train, evals, tokenizer, str(out), 16, source="test",
                       work=store.Work(docs_per_shard=40, progress=lambda _: None, **kwargs))


def _shard_bytes(path):
  return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))
          if name.endswith((".rows", ".json", ".model"))}


def test_prepared_rows_are_the_documents_joined_by_the_end_token(corpus, tmp_path):
  manifest = _prepare(corpus, tmp_path / "s")
  _, train, evals, tok_path = corpus
  tokenizer = SentencePieceTokenizer(tok_path)
  assert manifest["splits"]["train"]["documents"] == len(train)
  assert manifest["splits"]["validation"]["documents"] + manifest["splits"]["test"]["documents"] == len(evals)
  assert manifest["splits"]["validation"]["rows"] > 0 and manifest["splits"]["test"]["rows"] > 0
  ids = [t for i in range(40) for t in tokenizer.encode(train[i]) + [tokenizer.eod_id]]  # the first shard's
  s = store.TokenStore(str(tmp_path / "s"))
  first = manifest["splits"]["train"]["shards"][0]["rows"]
  np.testing.assert_array_equal(s.read("train", np.arange(first)).ravel(), ids[:first * 16])
  assert len(ids) - first * 16 < 16  # only the partial last row is dropped


def test_interrupted_workers_and_hosts_all_give_byte_identical_stores(corpus, tmp_path, monkeypatch):
  _prepare(corpus, tmp_path / "ref")
  reference = _shard_bytes(tmp_path / "ref")
  assert sum(name.endswith(".rows") for name in reference) >= 5

  # Killed after two shards: no manifest, a clear error to readers, then a rerun completes it.
  calls, real = [0], store._pack_unit  # noqa: SLF001

  def dies_on_the_third(args):
    calls[0] += 1
    if calls[0] == 3:
      raise KeyboardInterrupt
    return real(args)

  monkeypatch.setattr(store, "_pack_unit", dies_on_the_third)
  with pytest.raises(KeyboardInterrupt):
    _prepare(corpus, tmp_path / "killed")
  monkeypatch.setattr(store, "_pack_unit", real)
  with pytest.raises(store.StoreError, match="did not finish; rerun it"):
    store.TokenStore(str(tmp_path / "killed"))
  _prepare(corpus, tmp_path / "killed")
  assert _shard_bytes(tmp_path / "killed") == reference

  # Two worker processes; and two hosts, the second of which writes the manifest.
  _prepare(corpus, tmp_path / "workers", num_workers=2)
  assert _shard_bytes(tmp_path / "workers") == reference
  assert _prepare(corpus, tmp_path / "hosts", host_index=0, host_count=2) is None
  assert _prepare(corpus, tmp_path / "hosts", host_index=1, host_count=2) is not None
  assert _shard_bytes(tmp_path / "hosts") == reference
  for name in ("killed", "workers", "hosts"):
    assert (tmp_path / name / "manifest.json").read_text() == (tmp_path / "ref" / "manifest.json").read_text()


@pytest.mark.slow
def test_prepare_then_train_through_the_cli_and_mismatches_are_refused(corpus, tmp_path):
  config = corpus[0]
  data_flags = [f"--config.data.text.paths={config.data.text.paths}", "--config.data.heldout_fraction=0.2",
                f"--config.data.cache_dir={config.data.cache_dir}", "--config.data.tokenizer.vocab_size=64"]
  out, _ = run_cli("prepare", "--config=experiments/base_flow/text_tiny.py", f"--out={tmp_path / 'store'}",
                   "--workers=2", "--docs_per_shard=40", "--host_index=0", "--host_count=1",
                   "--config.data.source=text", "--config.data.seq_len=16", *data_flags)
  assert "--config.data.source=prepared" in out
  train_flags = ["--config=experiments/base_flow/text_tiny.py", f"--workdir={tmp_path / 'w'}", *TINY_FLAGS,
                 "--config.data.source=prepared", f"--config.data.prepared.path={tmp_path / 'store'}",
                 "--config.train.num_steps=2", "--config.train.eval_every=0"]
  run_cli("train", *train_flags)
  assert (tmp_path / "w" / "tokenizer.model").read_bytes() == (tmp_path / "store" / "tokenizer.model").read_bytes()

  base = tiny_config(**{"data.source": "prepared", "data.prepared.path": str(tmp_path / "store"),
                        "data.seq_len": 16})
  _, train, _, _ = corpus
  other = train_sentencepiece(iter(train), str(tmp_path / "other.model"), vocab_size=40, model_type="bpe")
  other_tokenizer = tiny_config(**{"data.source": "prepared", "data.prepared.path": str(tmp_path / "store"),
                                   "data.seq_len": 16, "data.tokenizer.model_path": other.path})
  with pytest.raises(store.StoreError, match="is not the tokenizer the store"):
    pipeline.build_data(other_tokenizer.data, None)
  (tmp_path / "w2").mkdir()
  (tmp_path / "w2" / "tokenizer.model").write_bytes(b"another tokenizer")
  with pytest.raises(store.StoreError, match="this workdir's tokenizer"):
    pipeline.build_data(base.data, str(tmp_path / "w2"))
  base.data.seq_len = 32
  with pytest.raises(ValueError, match="set --config.data.seq_len=16"):
    pipeline.build_data(base.data, None)


# --- Mixtures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.5, 0.3, 0.2), (0.9, 0.05, 0.05)])
def test_mixture_batches_are_within_one_row_of_the_weights_and_resume_under_another_process_count(
    tmp_path, weights):
  paths = []
  for s, _ in enumerate(weights):  # store s holds ids s*1000 + row: a row says where it came from
    paths.append(str(tmp_path / f"s{s}"))
    store.write_synthetic(paths[-1], 17 + 5 * s, 2, vocab_size=4000, rows_per_shard=7,
                          row_fn=lambda idx, s=s: (s * 1000 + idx)[:, None] + np.zeros(2, np.int64))
  stores = [store.TokenStore(p) for p in paths]
  mix = lambda per_host, p, procs: pipeline.MixtureIterator(stores, weights, 3, per_host, p, procs)  # noqa: E731
  whole, parts = mix(10, 0, 1), [mix(5, p, 2) for p in range(2)]
  taken = np.zeros(len(weights))
  for k in range(30):
    batch = next(whole)[:, 0]
    assert np.concatenate([next(it)[:, 0] for it in parts]).tolist() == batch.tolist()
    counts = np.bincount(batch // 1000, minlength=len(weights))
    assert np.all(np.abs(counts - 10 * np.asarray(weights)) <= 1), counts
    taken += counts
    assert np.all(np.abs(taken - 10 * (k + 1) * np.asarray(weights)) < 1 + 1e-9)
    drawn0 = (drawn0 if k else []) + [int(v) for v in batch if v < 1000]
  # Store 0 is read through its own permutation: its first epoch covers its 17 rows once.
  assert sorted(drawn0[:17]) == list(range(17)) and drawn0[:17] != list(range(17))
  state = parts[0].get_state()
  assert state == parts[1].get_state() == whole.get_state()
  resumed = mix(10, 0, 1)
  resumed.set_state(json.loads(json.dumps(state)))
  for _ in range(5):
    np.testing.assert_array_equal(next(resumed), next(whole))
  tokens = pipeline.mixture_token_counts(state, 2)
  assert sum(tokens.values()) == 30 * 10 * 2 and tokens["data_tokens/s0"] == state["taken"][0] * 2


def test_mixture_config_is_parsed_and_checked(tmp_path):
  assert pipeline.parse_mixture("gs://b/web:0.7, /data/books:0.3") == [("gs://b/web", 0.7), ("/data/books", 0.3)]
  with pytest.raises(ValueError, match="PATH:WEIGHT"):
    pipeline.parse_mixture("/data/web")
  store.write_synthetic(str(tmp_path / "a"), 10, 16, vocab_size=64, heldout_rows=4)
  store.write_synthetic(str(tmp_path / "b"), 10, 8, vocab_size=64, heldout_rows=4)
  config = tiny_config(**{"data.source": "prepared", "data.seq_len": 16,
                          "data.prepared.mixture": f"{tmp_path / 'a'}:2,{tmp_path / 'b'}:1"})
  with pytest.raises(store.StoreError, match="must share seq_len and tokenizer"):
    pipeline.build_data(config.data, None)


@pytest.mark.slow
def test_training_on_a_mixture_logs_tokens_per_store(tmp_path):
  from cfmjax.training import train  # noqa: PLC0415

  for name in ("web", "books"):
    store.write_synthetic(str(tmp_path / name), 50, 16, vocab_size=64, heldout_rows=16, seed=len(name))
  config = tiny_config(**{"data.source": "prepared", "data.seq_len": 16, "train.num_steps": 2,
                          "data.prepared.mixture": f"{tmp_path / 'web'}:3,{tmp_path / 'books'}:1"})
  train.train(config, str(tmp_path / "w"))
  last = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()][-1]
  assert last["data_tokens/web"] == 2 * 12 * 16 and last["data_tokens/books"] == 2 * 4 * 16


def test_the_bound_reports_on_the_test_split_and_selects_on_validation(tmp_path):
  store.write_synthetic(str(tmp_path / "s"), 10, 4, vocab_size=64, rows_per_shard=5, heldout_rows=6,
                        row_fn=lambda idx: idx[:, None] + np.arange(4)[None, :])
  data = pipeline.Data("prepared", 4, 64, IdentityTokenizer(64), None, {}, store=store.TokenStore(str(tmp_path / "s")))
  report, selection, fields = data.bound_rows(4, 3)
  assert report[:, 0].tolist() == [16, 17, 18, 19] and selection[:, 0].tolist() == [10, 11, 12]  # test, validation
  assert fields["report_rows"] == ["test", 0, 4] and fields["selection_rows"] == ["validation", 0, 3]
