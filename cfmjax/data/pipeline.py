"""From a data config to batches of fixed-length token rows.

    data = build_data(config.data, workdir)
    it = data.train_iterator(per_host_batch=32,
                             process_index=jax.process_index(),
                             process_count=jax.process_count(), seed=0)
    batch = next(it)                 # np.int32 [32, seq_len]
    state = it.get_state()           # JSON-serialisable; it.set_state(state)
    eval_batch = data.eval_rows(256) # the same held-out rows every call

Text sources (text files, the bible, TFDS) run through Grain:

    random-access documents -> shuffle -> repeat
      -> tokenize (+ end-of-document token) -> concatenate-then-split into
         rows of seq_len -> global batch -> this process's slice

Rows are plain token windows (no next-token shift): the flow models denoise the
whole row. The Markov source needs no files: row i is a pure function of i.

Every process walks the same stream of *global* batches and keeps its own
contiguous slice of each (process p of P: rows [p*B/P, (p+1)*B/P)). So the
global batch at step k is the same set of rows, in the same order, whatever
the number of processes, and the iterator state (how many global batches were
drawn) is identical on every process: a checkpoint written by 2 processes
resumes in 1 (or 4) with the data continuing exactly where it stopped. The
price, for text read directly, is that every process tokenizes the whole stream
and drops the rows of the others. A token store (`cfmjax prepare`, store.py;
data.source="prepared") removes it: global batch k is a keyed permutation of
row indices (permutation.py), and each process reads only its rows, by index,
as Markov rows are generated only for the slice.
"""

from collections.abc import Callable, Sequence
import dataclasses
import functools
import os
import shutil
import sys

from absl import logging
import grain
import ml_collections
import numpy as np

from cfmjax.data import permutation, sources, store as store_lib
from cfmjax.data.markov import MarkovSource
from cfmjax.data.tokenizer import IdentityTokenizer, SentencePieceTokenizer, train_sentencepiece

SOURCES = ("markov", "text", "tfds", "bible", "prepared")
_TOKENS = "tokens"
_SPLIT_SEED = 0


def default_data_config() -> ml_collections.ConfigDict:
  """Every data option, with its default (each one settable from the CLI)."""
  config = ml_collections.ConfigDict()
  config.source = "bible"  # One of SOURCES.
  config.seq_len = 128
  config.shuffle_seed = 0
  config.cache_dir = ""  # "" -> $CFMJAX_CACHE or ~/.cache/cfmjax.
  config.heldout_fraction = 0.02  # Of the documents, for text and bible.
  config.max_doc_chars = 1_000_000  # Longer text-file documents are split.

  config.markov = ml_collections.ConfigDict()
  config.markov.vocab_size = 16
  config.markov.order = 2
  config.markov.concentration = 0.3
  config.markov.seed = 0

  config.text = ml_collections.ConfigDict()
  config.text.paths = ""  # A path, a glob, or a comma-separated list.

  config.prepared = ml_collections.ConfigDict()
  config.prepared.path = ""  # A token store written by `cfmjax prepare` (data/store.py).
  # What `cfmjax prepare` tokenizes when data.source is "prepared": text | bible | tfds (with the
  # sections below), so one config both prepares its store and trains on it.
  config.prepared.from_source = ""
  # Several stores mixed by weight, "PATH:WEIGHT,PATH:WEIGHT" (instead of prepared.path): each global
  # batch is within ±1 row of the weights (MixtureIterator). Same tokenizer and seq_len throughout.
  config.prepared.mixture = ""

  config.tfds = ml_collections.ConfigDict()
  config.tfds.name = ""
  config.tfds.data_dir = ""
  config.tfds.train_split = "train"
  config.tfds.eval_split = "validation"
  config.tfds.text_key = "text"

  config.tokenizer = ml_collections.ConfigDict()
  config.tokenizer.vocab_size = 2048  # An upper bound for tiny corpora.
  config.tokenizer.model_type = "bpe"
  config.tokenizer.model_path = ""  # A trained .model to load instead.
  config.tokenizer.max_train_docs = 200_000
  return config


# Grain may pickle the transformations into worker processes, so they are
# small classes rather than closures.


class _Tokenize:
  """Document text -> {"tokens": int32 ids + [eod]}."""

  def __init__(self, tokenizer: SentencePieceTokenizer):
    self._tokenizer = tokenizer

  def __call__(self, text: str) -> dict[str, np.ndarray]:
    ids = self._tokenizer.encode(text)
    ids.append(self._tokenizer.eod_id)
    return {_TOKENS: np.asarray(ids, np.int32)}


def _is_full_row(packed: dict[str, np.ndarray]) -> bool:
  # The packer pads the very last row of a finite stream; segment id 0 marks
  # padding. A padded row would teach the model a run of token 0.
  return bool(packed[f"{_TOKENS}_segment_ids"].all())


def _tokens_of(packed: dict[str, np.ndarray]) -> np.ndarray:
  return packed[_TOKENS]


@dataclasses.dataclass(frozen=True)
class _BatchSlice:
  """Global batch index k -> this process's slice of it: stream positions [k*G + first, k*G + first +
  count), read by `read(positions)`. A batch is a pure function of k (and what `read` holds: the
  Markov source and seed, or the store and its permutation key), so the iterator state is k alone."""
  read: Callable
  global_batch: int
  first: int
  count: int

  def __call__(self, batch_index: int) -> np.ndarray:
    start = int(batch_index) * self.global_batch + self.first
    return self.read(np.arange(start, start + self.count, dtype=np.int64))


def _markov_rows(markov: MarkovSource, seq_len: int, stream: int, positions: np.ndarray) -> np.ndarray:
  return markov.rows(positions.tolist(), seq_len, "train", stream=stream)


def _store_rows(token_store, seed: int, positions: np.ndarray) -> np.ndarray:
  """The training rows at stream `positions` of a store: position p is row perm_e(p mod N) of epoch
  e = p // N, for a keyed permutation of the N rows that is never materialised (permutation.py)."""
  num_rows = token_store.num_rows("train")
  epochs, offsets = np.divmod(np.asarray(positions, np.int64), num_rows)
  rows = np.empty_like(offsets)
  for epoch in np.unique(epochs):
    sel = epochs == epoch
    rows[sel] = permutation.permute(offsets[sel], num_rows, permutation.epoch_key(seed, int(epoch)))
  return token_store.read("train", rows)


class MixtureIterator:
  """Global batches drawn from several token stores by weight (data.prepared.mixture).

  Each global batch of G rows takes floor(G·w_s) rows from store s, and the remaining rows go to the
  stores furthest behind their share so far: every batch is within ±1 row of the weights, and the
  totals stay within a row of them. The batch lists the stores' rows in order; this process reads
  only its slots [p·G/P, (p+1)·G/P). The state is the batch count and each store's position
  (rows taken), all global, so it resumes in O(1) under any process count with the same G.
  """

  def __init__(self, stores, weights, seed: int, per_host_batch: int, process_index: int, process_count: int):
    self._stores = stores
    self._weights = np.asarray(weights, np.float64) / np.sum(weights)
    self._seed = seed
    self._global_batch = per_host_batch * process_count
    self._first, self._count = process_index * per_host_batch, per_host_batch
    self._batch, self._taken = 0, np.zeros(len(stores), np.int64)

  def allocation(self) -> np.ndarray:
    """Rows of each store in the next global batch."""
    g, w = self._global_batch, self._weights
    counts = np.floor(g * w).astype(np.int64)
    behind = (self._batch + 1) * g * w - (self._taken + counts)
    order = np.lexsort((np.arange(len(w)), -behind))  # most behind first; ties by store order
    counts[order[:g - counts.sum()]] += 1
    return counts

  def __iter__(self):
    return self

  def __next__(self) -> np.ndarray:
    counts = self.allocation()
    ends = np.cumsum(counts)
    slots = np.arange(self._first, self._first + self._count)
    source = np.searchsorted(ends, slots, side="right")
    positions = self._taken[source] + slots - (ends - counts)[source]
    out = np.empty((self._count, self._stores[0].seq_len), np.int32)
    for s in np.unique(source):
      sel = source == s
      out[sel] = _store_rows(self._stores[s], self._seed * 65537 + int(s), positions[sel])
    self._taken += counts
    self._batch += 1
    return out

  def get_state(self) -> dict:
    return {"batch": self._batch, "taken": self._taken.tolist(), "stores": [s.path for s in self._stores]}

  def set_state(self, state: dict):
    if len(state["taken"]) != len(self._stores):
      raise ValueError(f"this data state is for a mixture of {len(state['taken'])} stores; this run mixes "
                       f"{len(self._stores)}: resume with the same data.prepared.mixture")
    self._batch, self._taken = int(state["batch"]), np.asarray(state["taken"], np.int64)


def mixture_token_counts(iterator_state, seq_len: int) -> dict:
  """{"data_tokens/<store name>": tokens drawn so far} of a mixture's iterator state ({} otherwise),
  for metrics.jsonl."""
  if not isinstance(iterator_state, dict) or "taken" not in iterator_state:
    return {}
  return {f"data_tokens/{os.path.basename(os.path.normpath(path))}": int(rows) * seq_len
          for path, rows in zip(iterator_state["stores"], iterator_state["taken"])}


class _ProcessSlice:
  """A global batch -> this process's contiguous rows of it."""

  def __init__(self, first: int, count: int):
    self._first = first
    self._count = count

  def __call__(self, batch: np.ndarray) -> np.ndarray:
    return batch[self._first:self._first + self._count]


@dataclasses.dataclass
class Data:
  """A dataset ready to be iterated: the vocabulary follows the data.

  Attributes:
    source_name: "markov", "text", "tfds" or "bible".
    seq_len: tokens per row.
    vocab_size: the model's vocabulary size: the Markov chain's, or the
      tokenizer's.
    tokenizer: turns rows back into text (and text into ids).
    markov: the chain, for exact likelihoods; None for text.
    stats: counts from preparation, for logging (documents, bad bytes, ...).
    train_records / eval_records: random-access document texts (text sources).
    store: the token store (source "prepared"; with a mixture, the first one, whose held-out rows
      are the eval rows).
    mixture: [(store, weight)] when data.prepared.mixture names several stores.
  """
  source_name: str
  seq_len: int
  vocab_size: int
  tokenizer: SentencePieceTokenizer | IdentityTokenizer
  markov: MarkovSource | None
  stats: dict
  train_records: Sequence[str] | None = dataclasses.field(
      default=None, repr=False)
  eval_records: Sequence[str] | None = dataclasses.field(
      default=None, repr=False)
  store: store_lib.TokenStore | None = dataclasses.field(default=None, repr=False)
  mixture: list | None = dataclasses.field(default=None, repr=False)  # [(TokenStore, weight)]

  def train_iterator(self, per_host_batch: int, process_index: int = 0,
                     process_count: int = 1, seed: int = 0,
                     num_epochs: int | None = None) -> grain.DatasetIterator:
    """Batches of training rows, np.int32 [per_host_batch, seq_len].

    Each process reads its own disjoint slice of every global batch of
    per_host_batch * process_count rows (see the module docstring). The
    stream of global batches is a deterministic function of (seed, global
    batch size) only; `get_state()` is JSON-serialisable, the same on every
    process, and `set_state()` resumes exactly, also with another process
    count as long as the global batch size is unchanged.

    Args:
      per_host_batch: rows per batch on this process.
      process_index: this process, in [0, process_count).
      process_count: how many processes share the data.
      seed: the shuffle seed (for Markov: which rows are drawn).
      num_epochs: passes over the documents; None repeats forever. Ignored
        for Markov, whose stream of fresh rows is endless.
    """
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} must lie in "
                       f"[0, process_count={process_count}).")
    if per_host_batch < 1:
      raise ValueError(f"per_host_batch must be >= 1, got {per_host_batch}.")
    if self.markov is not None:
      return self._markov_iterator(per_host_batch, process_index,
                                   process_count, seed)
    if self.mixture is not None:
      stores, weights = zip(*self.mixture)
      return MixtureIterator(list(stores), weights, seed, per_host_batch, process_index, process_count)
    if self.store is not None:
      return self._store_iterator(per_host_batch, process_index, process_count, seed)
    return self._text_iterator(per_host_batch, process_index, process_count,
                               seed, num_epochs)

  def _markov_iterator(self, per_host_batch, process_index, process_count,
                       seed):
    # An (effectively) endless range of global batch indices; global batch k
    # holds rows [k*G, (k+1)*G) and row i is drawn from its own seed, so the
    # data is a pure function of the step, whatever the process count.
    global_batch = per_host_batch * process_count
    batches = grain.MapDataset.range(0, sys.maxsize // global_batch)
    batches = batches.map(_BatchSlice(functools.partial(_markov_rows, self.markov, self.seq_len, seed), global_batch,
                                      first=process_index * per_host_batch, count=per_host_batch))
    return iter(batches.to_iter_dataset())

  def _store_iterator(self, per_host_batch, process_index, process_count, seed):
    # Like the Markov stream: each process reads only its rows of global batch k, by index.
    if not self.store.num_rows("train"):
      raise ValueError(f"the token store {self.store.path} has no training rows")
    global_batch = per_host_batch * process_count
    batches = grain.MapDataset.range(0, sys.maxsize // global_batch)
    batches = batches.map(_BatchSlice(functools.partial(_store_rows, self.store, seed), global_batch,
                                      first=process_index * per_host_batch, count=per_host_batch))
    return iter(batches.to_iter_dataset())

  def _text_iterator(self, per_host_batch, process_index, process_count, seed,
                     num_epochs):
    docs = grain.MapDataset.source(self.train_records)
    if not len(docs):
      raise ValueError("the training split has no documents.")
    docs = docs.shuffle(seed=seed).repeat(num_epochs)
    tokens = docs.map(_Tokenize(self.tokenizer)).to_iter_dataset()
    packed = grain.experimental.ConcatThenSplitIterDataset(
        tokens, length_struct={_TOKENS: self.seq_len})
    rows = packed.filter(_is_full_row).map(_tokens_of)
    batches = rows.batch(per_host_batch * process_count, drop_remainder=True)
    return iter(batches.map(_ProcessSlice(process_index * per_host_batch,
                                          per_host_batch)))

  def bound_rows(self, report_rows: int, selection_rows: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(report, selection, record fields): the rows a likelihood bound is reported on and the disjoint
    rows its endpoint is selected with. A token store reports on its `test` split and selects on
    `validation`; other sources split eval_rows(report + selection) into two index ranges."""
    if self.store is not None and self.store.num_rows("test") >= report_rows:
      return (self.store.read("test", np.arange(report_rows)), self.eval_rows(selection_rows),
              {"report_rows": ["test", 0, report_rows], "selection_rows": ["validation", 0, selection_rows],
               "rows_split": "token store: report on test rows, select on validation rows"})
    rows = self.eval_rows(report_rows + selection_rows)
    return (rows[:report_rows], rows[report_rows:],
            {"report_rows": [0, report_rows], "selection_rows": [report_rows, report_rows + selection_rows],
             "rows_split": "half-open index ranges into exp.data.eval_rows(report + selection rows)"})

  def eval_rows(self, num_rows: int) -> np.ndarray:
    """The first `num_rows` held-out rows, int32 [num_rows, seq_len].

    Deterministic: the held-out documents are read in order and packed the way
    training rows are (joined by the end-of-document token), so every call
    returns the same rows.
    """
    if self.markov is not None:
      return self.markov.rows(range(num_rows), self.seq_len, "validation")
    if self.store is not None:
      available = self.store.num_rows("validation")
      if num_rows > available:
        raise ValueError(f"the token store {self.store.path} has {available} validation rows; {num_rows} were "
                         f"asked for. Ask for fewer eval rows, or prepare with a larger data.heldout_fraction.")
      return self.store.read("validation", np.arange(num_rows))
    needed = num_rows * self.seq_len
    stream, num_tokens = [], 0
    for index in range(len(self.eval_records)):
      if num_tokens >= needed:
        break
      ids = self.tokenizer.encode(self.eval_records[index])
      ids.append(self.tokenizer.eod_id)
      stream.append(np.asarray(ids, np.int32))
      num_tokens += len(ids)
    if num_tokens < needed:
      raise ValueError(
          f"the held-out split has {num_tokens} tokens "
          f"({num_tokens // self.seq_len} rows of {self.seq_len}); "
          f"{num_rows} rows were asked for. Ask for fewer eval rows or raise "
          "data.heldout_fraction (or use a bigger eval split).")
    return np.concatenate(stream)[:needed].reshape(num_rows, self.seq_len)


def _cache_dir(config: ml_collections.ConfigDict) -> str:
  return os.path.expanduser(config.cache_dir or os.environ.get(
      "CFMJAX_CACHE", "~/.cache/cfmjax"))


def _tokenizer_for(config: ml_collections.ConfigDict,
                   train_records: Sequence[str],
                   default_path: str) -> SentencePieceTokenizer:
  """Loads the configured tokenizer, or trains (and caches) one."""
  tok_config = config.tokenizer
  if tok_config.model_path:
    return SentencePieceTokenizer(os.path.expanduser(tok_config.model_path))
  if os.path.exists(default_path):
    logging.info("Reusing the tokenizer %s.", default_path)
    return SentencePieceTokenizer(default_path)
  # Spread the training documents over the whole split: the start of a
  # corpus is rarely representative (a bible starts with Genesis).
  num_docs = min(len(train_records), tok_config.max_train_docs)
  picks = np.linspace(0, len(train_records), num_docs, endpoint=False)
  return train_sentencepiece(
      (train_records[int(i)] for i in picks), default_path,
      vocab_size=tok_config.vocab_size, model_type=tok_config.model_type)


def _text_corpus(config: ml_collections.ConfigDict):
  """(train records, held-out records, stats, directory for a cached tokenizer) of a text source."""
  cache_dir = _cache_dir(config)
  if config.source == "tfds":
    if not config.tfds.name:
      raise ValueError("data.source='tfds' needs data.tfds.name.")
    args = (config.tfds.data_dir, config.tfds.text_key)
    train = sources.tfds_source(config.tfds.name, config.tfds.train_split,
                                *args)
    evals = sources.tfds_source(config.tfds.name, config.tfds.eval_split,
                                *args)
    stats = {"train_documents": len(train), "validation_documents": len(evals)}
    return train, evals, stats, os.path.join(
        cache_dir, "tfds-" + config.tfds.name.replace("/", "_"))
  if config.source == "bible":
    name = sources.BIBLE_CORPUS_NAME
    source_stats = {}

    def documents():
      yield from sources.bible_documents()
  else:
    name = sources.text_corpus_name(config.text.paths, config.max_doc_chars)
    source_stats = {}

    def documents():
      yield from sources.text_documents(
          config.text.paths, source_stats, config.max_doc_chars)

  # The held-out split has a fixed seed: it must not move when a run changes
  # its shuffle seed, or eval numbers would stop being comparable.
  stats = sources.prepare_corpus(name, documents(), cache_dir,
                                 config.heldout_fraction, _SPLIT_SEED,
                                 source_stats)
  train = sources.corpus_split(stats["corpus_dir"], "train")
  evals = sources.corpus_split(stats["corpus_dir"], "validation")
  return train, evals, stats, stats["corpus_dir"]


def _cached_tokenizer_path(config: ml_collections.ConfigDict, tokenizer_dir: str) -> str:
  tok = config.tokenizer
  return os.path.join(tokenizer_dir, f"tokenizer-{tok.model_type}-{tok.vocab_size}-{tok.max_train_docs}.model")


def _describe_source(config: ml_collections.ConfigDict) -> str:
  if config.source == "tfds":
    return f"tfds:{config.tfds.name} ({config.tfds.train_split} / {config.tfds.eval_split})"
  if config.source == "text":
    return f"text:{config.text.paths}"
  return config.source


def prepare_store(data_config: ml_collections.ConfigDict, out_dir: str,
                  work: store_lib.Work = store_lib.Work()) -> dict | None:
  """`cfmjax prepare`: tokenizes the configured text source once into a token store (data/store.py).

  The tokenizer is data.tokenizer.model_path when given, else one trained on the training split (and
  cached, as `train` would). `work`: shards, workers, hosts and progress (`store.Work`).
  """
  config = data_config
  if config.source == "prepared":
    config = ml_collections.ConfigDict(config.to_dict())
    config.source = config.prepared.from_source
  if config.source not in ("text", "bible", "tfds"):
    raise ValueError(f"`cfmjax prepare` tokenizes a text source (text, bible, tfds); data.source="
                     f"{data_config.source!r} (data.prepared.from_source={data_config.prepared.from_source!r}) "
                     f"is not one: set --config.data.source or --config.data.prepared.from_source")
  train, evals, stats, tokenizer_dir = _text_corpus(config)
  tokenizer = _tokenizer_for(config, train, _cached_tokenizer_path(config, tokenizer_dir))
  source_stats = {k: v for k, v in stats.items() if k != "corpus_dir"}
  return store_lib.prepare(train, evals, tokenizer.path, out_dir, config.seq_len, source=_describe_source(config),
                           source_stats=source_stats, work=work)


def parse_mixture(text: str) -> list[tuple[str, float]]:
  """"PATH:WEIGHT,PATH:WEIGHT" -> [(path, weight)] (a path may itself hold ':', as gs://...)."""
  out = []
  for item in (i.strip() for i in text.split(",") if i.strip()):
    path, sep, weight = item.rpartition(":")
    try:
      value = float(weight) if sep else -1.0
    except ValueError:
      value = -1.0
    if not path or not value > 0:
      raise ValueError(f"data.prepared.mixture item {item!r} is not PATH:WEIGHT with a weight > 0 "
                       f"(e.g. --config.data.prepared.mixture=/data/web:0.7,/data/books:0.3)")
    out.append((os.path.expanduser(path), value))
  return out


def _prepared_data(config: ml_collections.ConfigDict, workdir: str | None) -> Data:
  mixture = parse_mixture(config.prepared.get("mixture", ""))
  if mixture and config.prepared.path:
    raise ValueError("set data.prepared.path (one store) or data.prepared.mixture (several), not both")
  if not (mixture or config.prepared.path):
    raise ValueError("data.source='prepared' needs --config.data.prepared.path=<a directory written by "
                     "`cfmjax prepare`> (or data.prepared.mixture=PATH:WEIGHT,...)")
  paths = [p for p, _ in mixture] or [os.path.expanduser(config.prepared.path)]
  data = _one_store(config, workdir, paths[0])
  if mixture:
    stores = [data.store] + [store_lib.TokenStore(p) for p in paths[1:]]
    for other in stores[1:]:
      if (other.seq_len, other.manifest["tokenizer"]["fingerprint"]) != (
          data.store.seq_len, data.store.manifest["tokenizer"]["fingerprint"]):
        raise store_lib.StoreError(f"the mixture's stores must share seq_len and tokenizer: {other.path} differs "
                                   f"from {data.store.path}")
    data.mixture = list(zip(stores, [w for _, w in mixture]))
    data.stats["mixture"] = {s.path: w for s, w in data.mixture}
  return data


def _one_store(config: ml_collections.ConfigDict, workdir: str | None, path: str) -> Data:
  token_store = store_lib.TokenStore(path)
  if token_store.seq_len != config.seq_len:
    raise ValueError(f"the token store {token_store.path} holds rows of {token_store.seq_len} tokens and this run "
                     f"has data.seq_len={config.seq_len}: set --config.data.seq_len={token_store.seq_len}, or "
                     f"prepare a store with that length")
  if token_store.tokenizer_path is None:  # a synthetic store (benchmarks, tests): ids without words
    vocab = int(token_store.manifest["tokenizer"]["vocab_size"])
    return Data("prepared", config.seq_len, vocab, IdentityTokenizer(vocab), None,
                {"train_rows": token_store.num_rows("train"), "store": token_store.path}, store=token_store)
  expected = token_store.manifest["tokenizer"]["fingerprint"]
  # A run whose tokenizer differs from the one the rows were made with would read other words.
  for label, path in (("data.tokenizer.model_path", os.path.expanduser(config.tokenizer.model_path)),
                      ("this workdir's tokenizer", os.path.join(workdir or "", "tokenizer.model"))):
    if path and os.path.isfile(path) and store_lib.fingerprint(path) != expected:
      raise store_lib.StoreError(
          f"{label} ({path}) is not the tokenizer the store {token_store.path} was prepared with; use the "
          f"store's own (drop data.tokenizer.model_path), a new workdir, or a store prepared with that tokenizer")
  if workdir is not None and not os.path.exists(os.path.join(workdir, "tokenizer.model")):
    os.makedirs(workdir, exist_ok=True)  # exports and samples decode with the workdir's tokenizer
    tmp = os.path.join(workdir, f"tokenizer.model.tmp{os.getpid()}")
    shutil.copyfile(token_store.tokenizer_path, tmp)
    os.replace(tmp, os.path.join(workdir, "tokenizer.model"))
  tokenizer = SentencePieceTokenizer(token_store.tokenizer_path)
  splits = token_store.manifest["splits"]
  stats = {f"{split}_rows": splits[split]["rows"] for split in splits}
  stats.update(train_tokens=splits["train"]["tokens"], store=token_store.path, source=token_store.manifest["source"])
  logging.info("Token store %s: %s rows of %d tokens, vocab %d.", token_store.path,
               ", ".join(f"{k} {v:,}" for k, v in stats.items() if k.endswith("_rows")), config.seq_len,
               tokenizer.vocab_size)
  return Data("prepared", config.seq_len, tokenizer.vocab_size, tokenizer, None, stats, store=token_store)


_SAID_PREPARE = False


def build_data(data_config: ml_collections.ConfigDict,
               workdir: str | None) -> Data:
  """Prepares the configured source (once; later calls reuse the cache).

  Args:
    data_config: see `default_data_config`.
    workdir: the run's directory; a trained tokenizer is kept there as
      tokenizer.model (in the cache directory when None).
  """
  global _SAID_PREPARE  # noqa: PLW0603 (said once per process)
  config = data_config
  if config.source not in SOURCES:
    raise ValueError(
        f"data.source must be one of {SOURCES}, got {config.source!r}.")
  if config.seq_len < 1:
    raise ValueError(f"data.seq_len must be >= 1, got {config.seq_len}.")

  if config.source == "markov":
    markov = MarkovSource(config.markov.vocab_size, config.markov.order,
                          config.markov.concentration, config.markov.seed)
    stats = {
        "entropy_rate": markov.entropy_rate(),
        "expected_nll_per_token": markov.expected_nll_per_token(
            config.seq_len),
    }
    logging.info("Markov source V=%d order=%d: %.4f nats/token at best.",
                 markov.vocab_size, markov.order,
                 stats["expected_nll_per_token"])
    return Data("markov", config.seq_len, markov.vocab_size,
                IdentityTokenizer(markov.vocab_size), markov, stats)
  if config.source == "prepared":
    return _prepared_data(config, workdir)

  train, evals, stats, tokenizer_dir = _text_corpus(config)
  if workdir is not None:
    tokenizer_path = os.path.join(workdir, "tokenizer.model")
  else:
    tokenizer_path = _cached_tokenizer_path(config, tokenizer_dir)
  tokenizer = _tokenizer_for(config, train, tokenizer_path)
  logging.info("Data %s: %d train / %d held-out documents, vocab %d.",
               config.source, len(train), len(evals), tokenizer.vocab_size)
  if not _SAID_PREPARE:
    _SAID_PREPARE = True
    logging.info("Every process tokenizes this whole stream and keeps its share. For a large corpus or "
                 "many processes, tokenize once with `cfmjax prepare --config=... --out=DIR` and train with "
                 "--config.data.source=prepared --config.data.prepared.path=DIR.")
  return Data(config.source, config.seq_len, tokenizer.vocab_size, tokenizer,
              None, stats, train_records=train, eval_records=evals)
