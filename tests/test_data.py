"""Tests for cfmjax.data: the Markov oracle, the sources, the pipeline."""

import itertools
import json
import os

import numpy as np
import pytest

from cfmjax.data import sources
from cfmjax.data.markov import MarkovSource
from cfmjax.data.pipeline import build_data, default_data_config
from cfmjax.data.tokenizer import IdentityTokenizer

# ----------------------------------------------------------------------------
# Markov source.


def _naive_probability(markov: MarkovSource, seq) -> float:
  """P(seq) written out directly from the definition, token by token."""
  k, v = markov.order, markov.vocab_size
  context = 0
  for token in seq[:k]:
    context = context * v + token
  prob = markov.initial[context]
  for token in seq[k:]:
    prob *= markov.transition[context, token]
    context = (context * v + token) % v**k
  return prob


def _dense_context_chain(markov: MarkovSource) -> np.ndarray:
  v, n = markov.vocab_size, markov.num_contexts
  chain = np.zeros((n, n))
  for context, token in itertools.product(range(n), range(v)):
    chain[context, (context * v + token) % n] += markov.transition[context,
                                                                    token]
  return chain


@pytest.mark.parametrize("vocab_size, order, length", [(3, 2, 5), (2, 1, 6),
                                                       (2, 3, 6)])
def test_markov_likelihood_matches_brute_force(vocab_size, order, length):
  markov = MarkovSource(vocab_size, order, concentration=0.5, seed=1)
  assert markov.transition.shape == (vocab_size**order, vocab_size)
  np.testing.assert_allclose(markov.transition.sum(1), 1.0)

  # The starting law is stationary for the context chain.
  chain = _dense_context_chain(markov)
  np.testing.assert_allclose(markov.initial @ chain, markov.initial, atol=1e-13)
  np.testing.assert_allclose(markov.initial.sum(), 1.0)

  seqs = np.array(list(itertools.product(range(vocab_size), repeat=length)))
  log_probs = markov.log_likelihood(seqs)
  probs = np.exp(log_probs)
  np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-12)
  naive = np.array([_naive_probability(markov, s) for s in seqs])
  np.testing.assert_allclose(probs, naive, rtol=1e-12)

  entropy = -(naive * np.log(naive)).sum()
  assert markov.expected_nll_per_token(length) == pytest.approx(
      entropy / length, rel=1e-12)
  # Long rows approach the entropy rate.
  assert markov.expected_nll_per_token(10_000) == pytest.approx(
      markov.entropy_rate(), rel=1e-3)


def test_markov_samples_follow_the_chain():
  markov = MarkovSource(3, 2, concentration=0.5, seed=1)
  length, num = 5, 40_000
  seqs = np.array(list(itertools.product(range(3), repeat=length)))
  probs = np.exp(markov.log_likelihood(seqs))

  for draws in (markov.sample(np.random.default_rng(0), num, length),
                markov.rows(range(num), length, "train")):
    assert draws.dtype == np.int32 and draws.shape == (num, length)
    nll = -markov.log_likelihood(draws)
    stderr = nll.std() / np.sqrt(num)
    assert abs(nll.mean() - length * markov.expected_nll_per_token(length)) < (
        4 * stderr)
    # Every one of the 243 sequences appears about as often as it should.
    codes = draws @ (3**np.arange(length - 1, -1, -1))
    freqs = np.bincount(codes, minlength=len(seqs)) / num
    assert np.all(np.abs(freqs - probs) < 5 * np.sqrt(probs / num) + 1e-3)


def test_markov_rows_are_deterministic_and_splits_disjoint():
  markov = MarkovSource(16, 2, concentration=0.3, seed=0)
  again = MarkovSource(16, 2, concentration=0.3, seed=0)
  np.testing.assert_array_equal(markov.transition, again.transition)
  row = markov.row(7, 64, "train")
  assert row.shape == (64,) and row.dtype == np.int32
  np.testing.assert_array_equal(row, again.row(7, 64, "train"))
  np.testing.assert_array_equal(row, markov.rows([3, 7], 64, "train")[1])
  assert not np.array_equal(row, markov.row(7, 64, "validation"))
  assert not np.array_equal(row, markov.row(8, 64, "train"))
  assert markov.sample(np.random.default_rng(0), 4, 1).shape == (4, 1)
  with pytest.raises(ValueError, match="split"):
    markov.row(0, 8, "test")


@pytest.mark.parametrize("kwargs, message", [
    (dict(vocab_size=1), "vocab_size"),
    (dict(order=0), "order"),
    (dict(concentration=0.0), "concentration"),
    (dict(vocab_size=2, order=23), "lower markov.vocab_size or markov.order"),
])
def test_markov_rejects_bad_arguments(kwargs, message):
  args = dict(vocab_size=4, order=2, concentration=0.3, seed=0) | kwargs
  with pytest.raises(ValueError, match=message):
    MarkovSource(**args)


def test_identity_tokenizer_round_trip():
  tokenizer = IdentityTokenizer(16)
  assert tokenizer.decode(np.array([3, 0, 15])) == "3 0 15"
  assert tokenizer.encode("3 0 15") == [3, 0, 15]
  assert tokenizer.eod_id is None


# ----------------------------------------------------------------------------
# Text sources.

_WORDS = ("alpha beta gamma delta epsilon zeta theta iota kappa lambda mu nu "
          "omicron sigma tau upsilon phi chi psi omega").split()


def _write_corpus(directory, num_files=3, docs_per_file=30, seed=0):
  """Small files of paragraphs, each paragraph unique (it names its index)."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  documents = []
  for f in range(num_files):
    paragraphs = []
    for d in range(docs_per_file):
      lines = [" ".join(rng.choice(_WORDS, size=rng.integers(5, 25)))
               for _ in range(rng.integers(1, 4))]
      lines[0] = f"document {f} {d}: " + lines[0]
      paragraphs.append("\n".join(lines))
    documents += paragraphs
    with open(os.path.join(directory, f"part{f}.txt"), "w") as fh:
      fh.write("\n\n".join(paragraphs) + "\n")
  return documents


def _text_config(tmp_path, **overrides):
  config = default_data_config()
  config.source = "text"
  config.text.paths = str(tmp_path / "corpus" / "*.txt")
  config.cache_dir = str(tmp_path / "cache")
  config.seq_len = 32
  config.heldout_fraction = 0.2
  config.tokenizer.vocab_size = 200
  for key, value in overrides.items():
    config[key] = value
  return config


def test_text_documents_counts_bad_input(tmp_path):
  corpus = tmp_path / "messy"
  corpus.mkdir()
  (corpus / "a.txt").write_bytes(
      b"good para\nsecond line\r\n\n\xff\xfe\n\n"
      b"more text \xc3\x28 here\n\n\n\n   \t\n\nend")
  (corpus / "b.txt").write_bytes(b"")
  stats = {}
  docs = list(sources.text_documents(f"{corpus}/a.txt,{corpus}/b.txt", stats))
  assert docs == ["good para\nsecond line", "more text ( here", "end"]
  assert stats["bad_bytes"] == 3  # \xff, \xfe and the orphan lead byte \xc3.
  assert stats["empty_documents"] == 2  # The bad-bytes paragraph, b.txt.
  assert stats["documents"] == 3 and stats["files"] == 2


def test_text_documents_splits_long_documents(tmp_path):
  path = tmp_path / "long.txt"
  long_paragraph = " ".join(["word"] * 100)  # 499 characters.
  path.write_text(long_paragraph + "\n\nshort\n")
  stats = {}
  docs = list(sources.text_documents(str(path), stats, max_doc_chars=50))
  assert all(len(d) <= 50 for d in docs)
  assert " ".join(docs[:-1]) == long_paragraph and docs[-1] == "short"
  assert stats["long_documents_split"] == 1

  # A huge line without any break is cut too, never read as one string.
  path.write_text("x" * 230)
  docs = list(sources.text_documents(str(path), {}, max_doc_chars=50))
  assert "".join(docs) == "x" * 230 and max(map(len, docs)) == 50
  # Cutting a line of multi-byte characters never creates bad bytes.
  path.write_text("\u00e9\u4e2d" * 150, encoding="utf-8")
  stats = {}
  docs = list(sources.text_documents(str(path), stats, max_doc_chars=50))
  assert "".join(docs) == "\u00e9\u4e2d" * 150 and stats["bad_bytes"] == 0


def test_prepare_corpus_is_cached(tmp_path):
  docs = [f"document {i}" for i in range(50)]
  meta = sources.prepare_corpus("toy", docs, str(tmp_path), 0.2, seed=0)
  assert meta["train_documents"] + meta["validation_documents"] == 50
  assert 0 < meta["validation_documents"] < 50
  train = sources.corpus_split(meta["corpus_dir"], "train")
  held = sources.corpus_split(meta["corpus_dir"], "validation")
  assert sorted(list(train) + list(held)) == sorted(docs)

  def must_not_be_read():
    raise AssertionError("the cached corpus was rebuilt")
    yield

  again = sources.prepare_corpus("toy", must_not_be_read(), str(tmp_path), 0.2,
                                 seed=0)
  assert again == meta
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


@pytest.mark.parametrize("seq_len, batch_size", [(30, 1), (32, 3)])
def test_text_pipeline_packs_documents(tmp_path, seq_len, batch_size):
  documents = _write_corpus(tmp_path / "corpus")
  data = build_data(_text_config(tmp_path, seq_len=seq_len),
                    workdir=str(tmp_path / "work"))
  assert os.path.exists(tmp_path / "work" / "tokenizer.model")
  tokenizer = data.tokenizer
  assert data.vocab_size == tokenizer.vocab_size <= 200
  assert data.stats["train_documents"] + data.stats[
      "validation_documents"] == len(documents)
  assert data.stats["source_stats"]["documents"] == len(documents)

  # One epoch: the rows, end to end, are the shuffled documents joined by eod.
  batches = list(data.train_iterator(batch_size, num_epochs=1))
  assert all(b.shape == (batch_size, seq_len) and b.dtype == np.int32
             for b in batches)
  stream = np.concatenate(batches).reshape(-1).tolist()
  train_docs = list(data.train_records)
  expected = {tuple(tokenizer.encode(d)) for d in train_docs}
  pieces, start = [], 0
  for i, token in enumerate(stream):
    if token == tokenizer.eod_id:
      pieces.append(tuple(stream[start:i]))
      start = i + 1
  assert len(set(pieces)) == len(pieces) and set(pieces) <= expected
  leftover = sorted(expected - set(pieces))
  tail = tuple(stream[start:])
  assert not tail or any(doc[:len(tail)] == tail for doc in leftover)
  total = sum(len(doc) + 1 for doc in expected)
  # Only full rows (the padded last one is dropped) in full batches.
  assert len(stream) == (total // seq_len) // batch_size * batch_size * seq_len

  assert "document" in tokenizer.decode(stream[:40])


def test_text_cache_is_reused_and_follows_the_files(tmp_path):
  _write_corpus(tmp_path / "corpus")
  config = _text_config(tmp_path)
  first = build_data(config, workdir=None)
  corpus_dir = first.stats["corpus_dir"]
  record_file = os.path.join(corpus_dir, "train.array_record")
  mtime = os.stat(record_file).st_mtime_ns
  second = build_data(config, workdir=None)
  assert second.stats == first.stats
  assert os.stat(record_file).st_mtime_ns == mtime
  assert second.tokenizer.path == first.tokenizer.path
  # A given tokenizer is loaded, not trained, and sets the vocabulary.
  config.tokenizer.model_path = first.tokenizer.path
  config.tokenizer.vocab_size = 999
  given = build_data(config, workdir=str(tmp_path / "work"))
  assert given.tokenizer.path == first.tokenizer.path
  assert given.vocab_size == first.vocab_size
  assert not os.path.exists(tmp_path / "work" / "tokenizer.model")
  config.tokenizer.model_path = ""

  with open(tmp_path / "corpus" / "part0.txt", "a") as f:
    f.write("\na new paragraph\n")
  third = build_data(config, workdir=None)
  assert third.stats["corpus_dir"] != corpus_dir
  assert third.stats["train_documents"] + third.stats[
      "validation_documents"] == 91


def test_text_source_with_bad_bytes(tmp_path):
  corpus = tmp_path / "corpus"
  _write_corpus(corpus)
  (corpus / "bad.txt").write_bytes(b"caf\xe9 latte\n\n\xff\xff\n\nok then\n")
  (corpus / "empty.txt").write_bytes(b"\n\n  \n")
  data = build_data(_text_config(tmp_path), workdir=None)
  source_stats = data.stats["source_stats"]
  assert source_stats["bad_bytes"] == 3
  assert source_stats["empty_documents"] == 2
  assert next(data.train_iterator(4)).shape == (4, 32)


# ----------------------------------------------------------------------------
# Determinism, sharding and checkpointing, for every kind of source.


def _markov_data(tmp_path):
  config = default_data_config()
  config.source = "markov"
  config.seq_len = 24
  return build_data(config, workdir=None)


def _text_data(tmp_path):
  _write_corpus(tmp_path / "corpus")
  return build_data(_text_config(tmp_path), workdir=None)


@pytest.mark.parametrize("make_data", [_markov_data, _text_data])
def test_iterator_is_deterministic_sharded_and_resumable(tmp_path, make_data):
  data = make_data(tmp_path)

  def take(iterator, n):
    return [next(iterator) for _ in range(n)]

  first = take(data.train_iterator(4, seed=3), 5)
  second = take(data.train_iterator(4, seed=3), 5)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
  other_seed = take(data.train_iterator(4, seed=4), 5)
  assert not all(np.array_equal(a, b) for a, b in zip(first, other_seed))

  # Two processes read disjoint rows.
  rows = [{tuple(r) for b in take(data.train_iterator(
      4, process_index=p, process_count=2, seed=3), 4) for r in b}
          for p in range(2)]
  assert len(rows[0]) == len(rows[1]) == 16 and not rows[0] & rows[1]

  # Checkpoint after 3 batches, through JSON, and resume in a new iterator.
  iterator = data.train_iterator(4, seed=3)
  take(iterator, 3)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = take(iterator, 2)
  resumed = data.train_iterator(4, seed=3)
  resumed.set_state(state)
  for a, b in zip(expected, take(resumed, 2)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(expected[0], first[3])

  # Held-out rows are fixed, and not training rows.
  held = data.eval_rows(3)
  assert held.shape == (3, data.seq_len) and held.dtype == np.int32
  np.testing.assert_array_equal(held, data.eval_rows(3))
  train_rows = {tuple(r) for b in first for r in b}
  assert not {tuple(r) for r in held} & train_rows


def test_eval_rows_refuses_a_too_small_heldout_split(tmp_path):
  data = _text_data(tmp_path)
  with pytest.raises(ValueError, match="heldout_fraction"):
    data.eval_rows(100_000)


def test_markov_data_follows_the_chain(tmp_path):
  data = _markov_data(tmp_path)
  assert data.vocab_size == 16 and isinstance(data.tokenizer,
                                              IdentityTokenizer)
  batch = next(data.train_iterator(8))
  assert batch.shape == (8, 24) and batch.dtype == np.int32
  assert np.isfinite(data.markov.log_likelihood(batch)).all()
  assert data.stats["expected_nll_per_token"] == pytest.approx(
      data.markov.expected_nll_per_token(24))


# ----------------------------------------------------------------------------
# TFDS, read without TensorFlow.


def test_tfds_source(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class CfmjaxTinyText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(0, 60),
              "validation": self._generate_examples(60, 80)}

    def _generate_examples(self, start, stop):
      rng = np.random.default_rng(start)
      for i in range(start, stop):
        words = " ".join(rng.choice(_WORDS, size=20))
        yield i, {"text": f"record {i}: {words}"}

  data_dir = str(tmp_path / "tfds")
  CfmjaxTinyText(data_dir=data_dir, file_format="array_record"
                ).download_and_prepare()

  config = default_data_config()
  config.source = "tfds"
  config.tfds.name = "cfmjax_tiny_text"
  config.tfds.data_dir = data_dir
  config.cache_dir = str(tmp_path / "cache")
  config.seq_len = 16
  config.tokenizer.vocab_size = 150
  data = build_data(config, workdir=str(tmp_path / "work"))
  assert data.stats == {"train_documents": 60, "validation_documents": 20}
  assert data.train_records[0].startswith("record ")
  batch = next(data.train_iterator(4))
  assert batch.shape == (4, 16) and batch.dtype == np.int32
  assert "record" in data.tokenizer.decode(data.eval_rows(2)[0])


# ----------------------------------------------------------------------------
# The embedded corpus.


def test_bible_documents():
  chapters = sources.bible_documents()
  assert len(chapters) == 1189
  assert chapters[0].startswith("In the beginning God created the heavens")
  assert chapters[-1].endswith("be with all the saints. Amen.")
  assert not any("{" in c or "}" in c for c in chapters)
  assert sum(map(len, chapters)) > 3_000_000
