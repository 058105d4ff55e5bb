"""The packed token store: a corpus tokenized once into fixed-length rows, read by index.

    cfmjax prepare --config=experiments/base_flow/text_tiny.py --out=/data/bible_128 [--workers=2]
    cfmjax train   --config=... --config.data.source=prepared --config.data.prepared.path=/data/bible_128

Layout of a store directory:
  manifest.json           written last: seq_len, token dtype, tokenizer fingerprint, source, counts,
                          and per split the shards in order with their row counts
  tokenizer.model         the SentencePiece model every row was tokenized with
  <split>-<NNNNN>.rows    train | validation | test: rows of [crc32 | seq_len token ids], fixed size
  <split>-<NNNNN>.json    that shard's counts (documents, tokens, tokens dropped at its end)

Why fixed-size binary rows and not ArrayRecord (as the document corpus in sources.py uses): a packed row
has a fixed size, so its offset is arithmetic and opening a store reads nothing per row. ArrayRecord
keeps an index entry per record in memory (0.07 s and ~80 MB per 10^6 rows measured here, so minutes and
tens of GB at 10^10 rows), and its offloaded index made random reads 7000x slower. Each row carries a
CRC32 of its tokens, so damaged bytes raise an error naming the shard and row instead of becoming tokens.

Preparation is split into units of `docs_per_shard` documents, one shard each: documents are tokenized,
joined by the end-of-document token, and cut into rows of seq_len (the last partial row of a shard is
dropped and counted). A shard is a pure function of its documents and the tokenizer, so units can run
in any order, in worker processes, on several hosts (host h of H takes units h, h + H, ...), and a killed
run redoes only the shards it had not renamed into place: the result is byte-identical.
The held-out documents of the corpus (data.heldout_fraction) are split again, by a stable hash, into
`validation` (for choices such as the likelihood bound's endpoint) and `test` (for reported numbers).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
import zlib
from typing import Callable, NamedTuple

import numpy as np

from cfmjax.data import sources
from cfmjax.data.tokenizer import SentencePieceTokenizer

log = logging.getLogger(__name__)

FORMAT = "cfmjax-token-store"
VERSION = 1
SPLITS = ("train", "validation", "test")
_TEST_SEED = 1  # hash seed that divides the held-out documents into validation and test
_CRC_BYTES = 4


class StoreError(ValueError):
  """A store that cannot be read as it claims: missing, incomplete, damaged, or made for another run."""


def fingerprint(path: str) -> str:
  """sha256 of a tokenizer model file: what a store and a run must agree on."""
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def row_bytes(seq_len: int, dtype: np.dtype) -> int:
  return _CRC_BYTES + seq_len * np.dtype(dtype).itemsize


def encode_rows(rows: np.ndarray, dtype: np.dtype) -> bytes:
  """[n, seq_len] token ids -> the bytes of n stored rows (CRC32 of the tokens, then the tokens)."""
  tokens = np.ascontiguousarray(rows, dtype=dtype)
  crcs = np.array([zlib.crc32(r.tobytes()) for r in tokens], "<u4")
  out = np.empty((len(tokens), row_bytes(tokens.shape[1], dtype)), np.uint8)
  out[:, :_CRC_BYTES] = crcs.view(np.uint8).reshape(-1, _CRC_BYTES)
  out[:, _CRC_BYTES:] = tokens.view(np.uint8).reshape(len(tokens), -1)
  return out.tobytes()


# ----------------------------------------------------------------------------------------------
# Writing.


def _shard_name(split: str, index: int) -> str:
  return f"{split}-{index:05d}"


def _write_atomically(path: str, data: bytes):
  with open(path + ".tmp", "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + ".tmp", path)


_WORKER_TOKENIZER = None


def _init_worker(tokenizer_path: str):
  global _WORKER_TOKENIZER  # noqa: PLW0603 (one tokenizer per worker process, loaded once)
  _WORKER_TOKENIZER = SentencePieceTokenizer(tokenizer_path)


def _pack_unit(args) -> dict:
  """Tokenizes one unit's documents and writes its shard (the .json first, the .rows rename last)."""
  out_dir, split, index, texts, seq_len, dtype = args
  ids = []
  for text in texts:
    ids.extend(_WORKER_TOKENIZER.encode(text))
    ids.append(_WORKER_TOKENIZER.eod_id)
  num_rows = len(ids) // seq_len
  rows = np.asarray(ids[:num_rows * seq_len], np.int64).reshape(num_rows, seq_len)
  info = {"split": split, "index": index, "rows": num_rows, "documents": len(texts),
          "tokens": num_rows * seq_len, "dropped_tokens": len(ids) - num_rows * seq_len}
  name = os.path.join(out_dir, _shard_name(split, index))
  _write_atomically(name + ".json", json.dumps(info).encode())
  _write_atomically(name + ".rows", encode_rows(rows, dtype))
  return info


def _units(records_by_split: dict, docs_per_shard: int) -> list[tuple[str, int, range]]:
  units = []
  for split in SPLITS:
    indices = records_by_split[split]
    for start in range(0, max(len(indices), 1), docs_per_shard):
      units.append((split, start // docs_per_shard, indices[start:start + docs_per_shard]))
  return units


class Work(NamedTuple):
  """How `prepare`'s work is cut and reported: documents per shard, worker processes on this host,
  this host's share of the shards (host_index of host_count), and where progress lines go."""
  docs_per_shard: int = 4096
  num_workers: int = 1
  host_index: int = 0
  host_count: int = 1
  progress: Callable = print


def prepare(records, heldout_records, tokenizer_path: str, out_dir: str, seq_len: int, *, source: str,
            source_stats: dict | None = None, work: Work = Work()) -> dict | None:
  """Writes (or completes) a store from random-access documents; returns the manifest, or None while
  other hosts still have shards to write (the last host to finish writes it).

  Args:
    records / heldout_records: random-access document texts of the training / held-out split.
    tokenizer_path: the SentencePiece model to tokenize with; copied into the store.
    source: a description of where the documents came from (kept in the manifest).
  """
  docs_per_shard, num_workers, host_index, host_count, progress = work
  if not 0 <= host_index < host_count:
    raise ValueError(f"--host_index={host_index} must lie in [0, --host_count={host_count})")
  os.makedirs(out_dir, exist_ok=True)
  manifest_path = os.path.join(out_dir, "manifest.json")
  if os.path.exists(manifest_path):
    manifest = read_manifest(out_dir)
    if manifest["seq_len"] != seq_len or manifest["tokenizer"]["fingerprint"] != fingerprint(tokenizer_path):
      raise StoreError(f"{out_dir} already holds a store with seq_len {manifest['seq_len']} and another tokenizer "
                       f"or length than this run's; prepare into a new --out")
    progress(f"{out_dir} is complete ({manifest['splits']['train']['rows']:,} train rows): nothing to do")
    return manifest
  store_tokenizer = os.path.join(out_dir, "tokenizer.model")
  if not os.path.exists(store_tokenizer):
    shutil.copyfile(tokenizer_path, store_tokenizer + ".tmp")
    os.replace(store_tokenizer + ".tmp", store_tokenizer)
  elif fingerprint(store_tokenizer) != fingerprint(tokenizer_path):
    raise StoreError(f"{out_dir} was started with another tokenizer ({store_tokenizer}); prepare into a new "
                     f"--out, or pass that tokenizer with --config.data.tokenizer.model_path")
  vocab_size = SentencePieceTokenizer(store_tokenizer).vocab_size
  dtype = token_dtype(vocab_size)
  # Held-out documents split again by a stable hash: validation for choices, test for reports.
  test = [sources.is_heldout(i, _TEST_SEED, 0.5) for i in range(len(heldout_records))]
  by_split = {"train": range(len(records)),
              "validation": [i for i, t in enumerate(test) if not t], "test": [i for i, t in enumerate(test) if t]}
  units = _units(by_split, docs_per_shard)
  mine = [u for k, u in enumerate(units) if k % host_count == host_index]
  done = lambda u: os.path.exists(os.path.join(out_dir, _shard_name(u[0], u[1]) + ".rows"))  # noqa: E731
  pending = [u for u in mine if not done(u)]
  if len(pending) < len(mine):
    progress(f"resuming: {len(mine) - len(pending)} of this host's {len(mine)} shards are already written")
  total_docs = sum(len(u[2]) for u in pending)

  def jobs():
    for split, index, docs in pending:
      texts = records if split == "train" else heldout_records
      yield (out_dir, split, index, [texts[i] for i in docs], seq_len, dtype)

  start, docs_done = time.time(), 0
  if num_workers > 1:
    pool = multiprocessing.get_context("spawn").Pool(num_workers, _init_worker, (store_tokenizer,))
    results = pool.imap_unordered(_pack_unit, jobs())
  else:
    pool = None
    _init_worker(store_tokenizer)
    results = map(_pack_unit, jobs())
  try:
    for info in results:
      docs_done += info["documents"]
      elapsed = time.time() - start
      eta = elapsed / docs_done * (total_docs - docs_done) if docs_done else float("nan")
      progress(f"prepare: {docs_done:,}/{total_docs:,} documents, shard {info['split']}-{info['index']:05d} "
               f"({info['rows']:,} rows), {elapsed:.0f}s, ETA {eta:.0f}s")
  finally:
    if pool is not None:
      pool.close()
      pool.join()
  if not all(done(u) for u in units):
    missing = sum(not done(u) for u in units)
    progress(f"this host's shards are written; {missing} shards of other hosts are missing, so the manifest "
             f"is left to the last host to finish (rerunning `cfmjax prepare` on any host also writes it)")
    return None
  shards = {split: [] for split in SPLITS}
  counts = {split: {"rows": 0, "tokens": 0, "documents": 0, "dropped_tokens": 0} for split in SPLITS}
  for split, index, _ in units:
    with open(os.path.join(out_dir, _shard_name(split, index) + ".json")) as f:
      info = json.load(f)
    shards[split].append({"file": _shard_name(split, index) + ".rows", "rows": info["rows"]})
    for key in counts[split]:
      counts[split][key] += info[key]
  manifest = {"format": FORMAT, "version": VERSION, "seq_len": seq_len, "token_dtype": dtype.str,
              "tokenizer": {"file": "tokenizer.model", "fingerprint": fingerprint(store_tokenizer),
                            "vocab_size": vocab_size},
              "source": source, "source_stats": dict(source_stats or {}), "docs_per_shard": docs_per_shard,
              "splits": {split: dict(counts[split], shards=shards[split]) for split in SPLITS}}
  _write_atomically(manifest_path, json.dumps(manifest, indent=1).encode())
  progress(f"store {out_dir}: " + ", ".join(f"{s} {counts[s]['rows']:,} rows" for s in SPLITS)
           + f" of {seq_len} tokens, in {time.time() - start:.0f}s")
  return manifest


# ----------------------------------------------------------------------------------------------
# Reading.


def read_manifest(path: str) -> dict:
  manifest_path = os.path.join(path, "manifest.json")
  if not os.path.exists(manifest_path):
    hint = (" (it has shards but no manifest: `cfmjax prepare` did not finish; rerun it with the same --out)"
            if os.path.isdir(path) and any(n.endswith(".rows") for n in os.listdir(path)) else "")
    raise StoreError(f"{manifest_path} not found: {path} is not a finished token store{hint}")
  with open(manifest_path) as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    raise StoreError(f"{path}: format {manifest.get('format')!r} v{manifest.get('version')} is not "
                     f"{FORMAT!r} v{VERSION}")
  return manifest


class TokenStore:
  """Random access to a store's rows. Opening reads the manifest only; a shard is mapped (and its size
  checked) the first time one of its rows is read, so start-up does not grow with the row count."""

  def __init__(self, path: str):
    self.path = path
    self.manifest = read_manifest(path)
    self.seq_len = int(self.manifest["seq_len"])
    self.dtype = np.dtype(self.manifest["token_dtype"])
    self.row_bytes = row_bytes(self.seq_len, self.dtype)
    file = self.manifest["tokenizer"]["file"]
    self.tokenizer_path = os.path.join(path, file) if file else None  # None: a synthetic store
    self._ends = {s: np.cumsum([sh["rows"] for sh in v["shards"]], dtype=np.int64)
                  for s, v in self.manifest["splits"].items()}
    self._maps = {}

  def num_rows(self, split: str = "train") -> int:
    ends = self._ends[split]
    return int(ends[-1]) if len(ends) else 0

  def _shard(self, split: str, k: int) -> np.ndarray:
    if (split, k) not in self._maps:
      shard = self.manifest["splits"][split]["shards"][k]
      file = os.path.join(self.path, shard["file"])
      expected = shard["rows"] * self.row_bytes
      size = os.path.getsize(file) if os.path.exists(file) else None
      if size != expected:
        raise StoreError(f"damaged token store: {file} has {size} bytes where the manifest says "
                         f"{shard['rows']} rows = {expected} bytes; re-prepare that shard (delete it and rerun "
                         f"`cfmjax prepare` with the same --out) or the store")
      self._maps[split, k] = (np.memmap(file, np.uint8, "r", shape=(shard["rows"], self.row_bytes))
                              if shard["rows"] else np.zeros((0, self.row_bytes), np.uint8))
    return self._maps[split, k]

  def read(self, split: str, indices) -> np.ndarray:
    """Rows `indices` of `split` as int32 [len(indices), seq_len], CRC-checked."""
    indices = np.asarray(indices, np.int64)
    ends = self._ends[split]
    n = self.num_rows(split)
    if indices.size and (indices.min() < 0 or indices.max() >= n):
      raise IndexError(f"row {int(indices.max())} of split {split!r} is outside [0, {n})")
    shard_of = np.searchsorted(ends, indices, side="right")
    raw = np.empty((len(indices), self.row_bytes), np.uint8)
    for k in np.unique(shard_of):
      sel = shard_of == k
      first = ends[k - 1] if k else 0
      raw[sel] = self._shard(split, int(k))[indices[sel] - first]
    crcs = raw[:, :_CRC_BYTES].copy().view("<u4").ravel()
    body = np.ascontiguousarray(raw[:, _CRC_BYTES:])
    for i in range(len(raw)):
      if zlib.crc32(body[i].tobytes()) != crcs[i]:
        k = int(shard_of[i])
        file = os.path.join(self.path, self.manifest["splits"][split]["shards"][k]["file"])
        raise StoreError(f"damaged token store: row {int(indices[i] - (ends[k - 1] if k else 0))} of {file} fails "
                         f"its checksum; re-prepare that shard (delete it and rerun `cfmjax prepare`)")
    return body.view(self.dtype).reshape(len(raw), self.seq_len).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Synthetic stores (benchmarks and tests): rows without a tokenizer.


def write_synthetic(out_dir: str, num_rows: int, seq_len: int, vocab_size: int, rows_per_shard: int = 1 << 20,
                    row_fn=None, seed: int = 0, heldout_rows: int = 1) -> dict:
  """A store of `num_rows` train rows (and `heldout_rows` validation and test rows) with no tokenizer: rows are
  row_fn(indices) -> [n, seq_len] ids, or uniformly random ids. For read-path benchmarks at sizes that
  no tokenizer run here could produce, and for tests that need to know which row is which."""
  os.makedirs(out_dir, exist_ok=True)
  dtype = token_dtype(vocab_size)
  rng = np.random.default_rng(seed)
  row_fn = row_fn or (lambda idx: rng.integers(0, vocab_size, (len(idx), seq_len)))
  splits = {}
  # Row ids run on across the splits (train 0..N-1, then validation, then test), so a row_fn that
  # encodes its id tells every row of the store apart.
  offset = 0
  for split, n in (("train", num_rows), ("validation", heldout_rows), ("test", heldout_rows)):
    shards = []
    for k, start in enumerate(range(0, n, rows_per_shard)):
      file = _shard_name(split, k) + ".rows"
      with open(os.path.join(out_dir, file), "wb") as f:
        for chunk in range(start, min(start + rows_per_shard, n), 1 << 16):
          ids = np.arange(chunk, min(chunk + (1 << 16), start + rows_per_shard, n)) + offset
          f.write(encode_rows(row_fn(ids), dtype))
      shards.append({"file": file, "rows": min(rows_per_shard, n - start)})
    splits[split] = {"rows": n, "tokens": n * seq_len, "documents": 0, "dropped_tokens": 0, "shards": shards}
    offset += n
  manifest = {"format": FORMAT, "version": VERSION, "seq_len": seq_len, "token_dtype": dtype.str,
              "tokenizer": {"file": None, "fingerprint": None, "vocab_size": vocab_size},
              "source": "synthetic", "source_stats": {}, "docs_per_shard": None, "splits": splits}
  _write_atomically(os.path.join(out_dir, "manifest.json"), json.dumps(manifest, indent=1).encode())
  return manifest
