"""Tokenizers: SentencePiece for text, identity for Markov token ids.

Both expose the same small surface the rest of cfmjax uses: `encode`,
`decode`, `vocab_size`, `eod_id` and `path`.
"""

from collections.abc import Iterable, Sequence
import os
import tempfile

from absl import logging
import sentencepiece as spm

# SentencePiece's trainer reads at most this many lines (sampled at random
# when there are more); more lines only slow training down.
MAX_TRAINING_SENTENCES = 2_000_000


def _lines(text: str) -> list[str]:
  return [line for line in text.splitlines() if line.strip()]


class SentencePieceTokenizer:
  """A trained SentencePiece model. Its EOS token marks end-of-document."""

  def __init__(self, path: str):
    self.path = path
    self._processor = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = self._processor.get_piece_size()
    self.eod_id = self._processor.eos_id()
    if self.eod_id < 0:
      raise ValueError(f"SentencePiece model {path} defines no eos token; "
                       "cfmjax needs it as the end-of-document token.")

  def encode(self, text: str) -> list[int]:
    # Encode line by line: SentencePiece is very slow on one huge string, and
    # its normaliser would turn the newlines into spaces anyway. Each line gets
    # its own word-boundary prefix, so decoding joins lines with a space.
    ids = []
    for line_ids in self._processor.encode(_lines(text)):
      ids.extend(line_ids)
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    # Control tokens (eod) decode to nothing.
    return self._processor.decode([int(i) for i in ids])

  def __repr__(self):
    return (f"SentencePieceTokenizer(path={self.path!r}, "
            f"vocab_size={self.vocab_size})")


def train_sentencepiece(texts: Iterable[str], model_path: str, vocab_size: int,
                        model_type: str = "bpe") -> SentencePieceTokenizer:
  """Trains a SentencePiece model on documents and saves it at `model_path`.

  `vocab_size` is an upper bound: on a corpus too small for it the model stops
  short instead of failing, so read the real size from the result.
  """
  model_dir = os.path.dirname(os.path.abspath(model_path))
  os.makedirs(model_dir, exist_ok=True)
  # Train into a scratch directory and move the model into place at the end,
  # so an interrupted run never leaves a half-written model to be reused.
  with tempfile.TemporaryDirectory(dir=model_dir, prefix=".spm-") as tmp:
    corpus = os.path.join(tmp, "corpus.txt")
    num_lines = 0
    with open(corpus, "w", encoding="utf-8") as f:
      for text in texts:
        for line in _lines(text):
          f.write(line.strip() + "\n")
          num_lines += 1
    if not num_lines:
      raise ValueError("cannot train a tokenizer: the training text is empty.")
    prefix = os.path.join(tmp, "model")
    spm.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        hard_vocab_limit=False,
        input_sentence_size=MAX_TRAINING_SENTENCES,
        shuffle_input_sentence=True,
        num_threads=2,
        # NFKC plus whitespace clean-up: decoded text stays readable.
        normalization_rule_name="nmt_nfkc",
        character_coverage=0.9995,
        pad_id=-1, unk_id=0, bos_id=1, eos_id=2,  # bos is defined but unused.
        minloglevel=2,
    )
    os.replace(prefix + ".model", model_path)
  tokenizer = SentencePieceTokenizer(model_path)
  logging.info("Trained a %s tokenizer (%d pieces) on %d lines: %s",
               model_type, tokenizer.vocab_size, num_lines, model_path)
  return tokenizer


class IdentityTokenizer:
  """Token ids are the text: "3 0 7" <-> [3, 0, 7]. For the Markov source."""

  def __init__(self, vocab_size: int):
    self.vocab_size = vocab_size
    self.eod_id = None  # Markov rows are not made of documents.
    self.path = None

  def encode(self, text: str) -> list[int]:
    ids = [int(token) for token in text.split()]
    if any(not 0 <= i < self.vocab_size for i in ids):
      raise ValueError(f"token ids must lie in [0, {self.vocab_size}).")
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    return " ".join(str(int(i)) for i in ids)

  def __repr__(self):
    return f"IdentityTokenizer(vocab_size={self.vocab_size})"
