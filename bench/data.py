"""Token-store figures (issue 14): prepare throughput, read throughput, start-up and restore against size.

  .venv/bin/python bench/data.py [--small=1000000 --large=100000000] [--workdir=/tmp/cfmjax_bench_data]

1. `prepare` tokens/s on a generated text corpus (--corpus_mb of Bible words in random order, text_tiny's
   tokenizer settings, L = 128), with 1 and 2 workers, after a warm-up run (corpus conversion and
   tokenizer training are not timed).
2. The read path: rows/s and tokens/s of one process reading its slice of global batches through
   `Data.train_iterator` (permutation, offsets, CRC check), on a synthetic store of L = 1024 rows,
   alone (P = 1) and as one of 8 processes (P = 8: it reads 1/8 of each global batch).
3. Start-up and restore at --small and --large rows (synthetic stores at L = 8, written by
   `store.write_synthetic`): opening the store, building the iterator, restoring a position a
   million global batches in, and the first batch (64 random rows: cold disk reads). The ratio
   large / small of open + restore is the point: it should not grow with the row count.
Prints a Markdown table and writes bench/results/data.json. Stores are kept in --workdir for reruns.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cfmjax.data import pipeline, store  # noqa: E402
from cfmjax.data.tokenizer import IdentityTokenizer  # noqa: E402
from cfmjax.run import configs  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def text_corpus(workdir: str, megabytes: int) -> str:
  """A folder of generated text files (Bible words in random order, paragraph documents)."""
  root = os.path.join(workdir, f"corpus_{megabytes}mb")
  if not os.path.exists(os.path.join(root, "done")):
    os.makedirs(root, exist_ok=True)
    words = " ".join(pipeline.sources.bible_documents()[:200]).split()
    rng = np.random.default_rng(0)
    for f in range(4):
      with open(os.path.join(root, f"part{f}.txt"), "w") as out:
        size = 0
        while size < megabytes * 2**20 / 4:
          paragraph = " ".join(rng.choice(words, rng.integers(20, 200)))
          out.write(paragraph + "\n\n")
          size += len(paragraph) + 2
    open(os.path.join(root, "done"), "w").close()
  return os.path.join(root, "*.txt")


def prepare_throughput(workdir: str, paths: str, workers: int) -> dict:
  config = configs.from_file(os.path.join(ROOT, "experiments", "base_flow", "text_tiny.py"))
  data = config.data
  with data.unlocked():
    data.source, data.text.paths, data.seq_len = "text", paths, 128
    data.cache_dir = os.path.join(workdir, "cache")
  out = os.path.join(workdir, f"prepare_w{workers}")
  shutil.rmtree(out, ignore_errors=True)
  quiet = store.Work(docs_per_shard=512, progress=lambda _: None)
  pipeline.prepare_store(data, out, quiet)  # warm: corpus + tokenizer
  shutil.rmtree(out)
  start = time.perf_counter()
  manifest = pipeline.prepare_store(data, out, quiet._replace(num_workers=workers))
  seconds = time.perf_counter() - start
  tokens = sum(manifest["splits"][s]["tokens"] for s in store.SPLITS)
  return {"workers": workers, "tokens": tokens, "seconds": seconds, "tokens_per_sec": tokens / seconds}


def synthetic(workdir: str, name: str, rows: int, seq_len: int) -> str:
  path = os.path.join(workdir, name)
  if not os.path.exists(os.path.join(path, "manifest.json")):
    start = time.perf_counter()
    store.write_synthetic(path, rows, seq_len, vocab_size=50257, rows_per_shard=1 << 22)
    print(f"wrote {rows:,} rows of {seq_len} to {path} in {time.perf_counter() - start:.0f}s", flush=True)
  return path


def as_data(path: str) -> pipeline.Data:
  s = store.TokenStore(path)
  return pipeline.Data("prepared", s.seq_len, 50257, IdentityTokenizer(50257), None, {}, store=s)


def read_throughput(path: str, global_batch: int, processes: int, batches: int) -> dict:
  it = as_data(path).train_iterator(global_batch // processes, 0, processes, seed=0)
  next(it)  # first touch of the shards
  start = time.perf_counter()
  rows = sum(len(next(it)) for _ in range(batches))
  seconds = time.perf_counter() - start
  seq_len = store.TokenStore(path).seq_len
  return {"processes": processes, "global_batch": global_batch, "rows_per_sec": rows / seconds,
          "tokens_per_sec": rows * seq_len / seconds}


def startup_and_restore(path: str, position: int = 1_000_000, global_batch: int = 64) -> dict:
  start = time.perf_counter()
  data = as_data(path)
  it = data.train_iterator(global_batch, seed=0)
  opened = time.perf_counter() - start
  state = it.get_state()
  state = {**state, **{k: position for k, v in state.items() if isinstance(v, int)}}
  start = time.perf_counter()
  it.set_state(state)
  restored = time.perf_counter() - start
  start = time.perf_counter()
  batch = next(it)  # 64 random rows: cold pages of the file, so this is disk reads
  first = time.perf_counter() - start
  assert batch.shape == (global_batch, data.seq_len)
  return {"rows": data.store.num_rows("train"), "open_seconds": opened, "restore_seconds": restored,
          "first_batch_seconds": first}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--small", type=int, default=1_000_000)
  ap.add_argument("--large", type=int, default=100_000_000)
  ap.add_argument("--read_rows", type=int, default=200_000)
  ap.add_argument("--corpus_mb", type=int, default=16, help="size of the generated text corpus for prepare")
  ap.add_argument("--workdir", default="/tmp/cfmjax_bench_data")
  ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "data.json"))
  args = ap.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  results = {"cpu_count": os.cpu_count(), "load_average": os.getloadavg()[0]}
  corpus = text_corpus(args.workdir, args.corpus_mb)
  results["prepare"] = [prepare_throughput(args.workdir, corpus, w) for w in (1, 2)]
  read_path = synthetic(args.workdir, f"read_{args.read_rows}", args.read_rows, 1024)
  results["read"] = [read_throughput(read_path, 512, p, b) for p, b in ((1, 20), (8, 100))]
  results["startup"] = [startup_and_restore(synthetic(args.workdir, f"rows_{n}", n, 8)) for n in (args.small, args.large)]
  small, large = results["startup"]
  results["startup_ratio_large_over_small"] = (
      (large["open_seconds"] + large["restore_seconds"]) / (small["open_seconds"] + small["restore_seconds"]))
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)

  print(f"\n2 CPU cores shared; load average {results['load_average']:.2f} at the start\n")
  print(f"| prepare ({args.corpus_mb} MB of text, L = 128) | tokens | seconds | tokens/s |\n|---|---|---|---|")
  for r in results["prepare"]:
    print(f"| {r['workers']} worker(s) | {r['tokens']:,} | {r['seconds']:.1f} | {r['tokens_per_sec']:,.0f} |")
  print("\n| read (L = 1024, global batch 512) | rows/s per process | tokens/s per process |\n|---|---|---|")
  for r in results["read"]:
    print(f"| process 0 of {r['processes']} | {r['rows_per_sec']:,.0f} | {r['tokens_per_sec']:,.0f} |")
  print("\n| store rows (L = 8) | open + iterator (s) | restore 10^6 batches in (s) | first batch, cold (s) |\n"
        "|---|---|---|---|")
  for r in results["startup"]:
    print(f"| {r['rows']:,} | {r['open_seconds']:.4f} | {r['restore_seconds']:.4f} | {r['first_batch_seconds']:.4f} |")
  print(f"\nopen + restore, {large['rows']:,} rows / {small['rows']:,} rows: "
        f"{results['startup_ratio_large_over_small']:.2f}x")


if __name__ == "__main__":
  main()
