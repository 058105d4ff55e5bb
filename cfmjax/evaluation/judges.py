"""Judges: models that score generated samples for generative perplexity (SPEC §7).

    judge = make_judge("ar:/runs/ar_text_tiny", exp.data)   # or "exact", "gpt2:/models/gpt2-large"
    total_nll, num_tokens = judge_samples(judge, tokens, exp.data.tokenizer)
    gen_ppl = exp(total_nll / num_tokens)                    # pooled over all samples

The interface every judge implements (`Judge`):

  name                   the short name written into the records' "judge" field: "exact",
                         "ar:<last component of the workdir>", "gpt2:<last component of the directory>"
                         (see `short_name`).
  tokenizer_fingerprint  a string naming the judge's tokenizer exactly (`tokenizer_fingerprint`: the
                         sha256 of the tokenizer file less its training record, or "identity:<V>" for Markov ids). When it
                         equals the sampled model's, samples are passed as token ids; otherwise they
                         are decoded to text and the judge tokenises them itself.
  nll(texts=None, tokens=None) -> (total_nll_nats, num_scored_tokens)
                         exactly one argument is given: `texts` (list[str], one string per sample) or
                         `tokens` (int array [N, L] in the judge's own vocabulary). Returns the sum over
                         all samples and all scored tokens of −log p(token | its prefix) in nats, and
                         the number of tokens scored. Every token of a sample is scored, the first
                         one conditioned on the judge's start (the AR model's learned start vector,
                         GPT-2's <|endoftext|>), so that a sample of n tokens contributes n. A judge
                         with a bounded context scores at most that many tokens per sample (truncating
                         longer ones) and counts only what it scored.
"""

from __future__ import annotations

import abc
import hashlib
import os

import numpy as np

from cfmjax.data.tokenizer import IdentityTokenizer
from cfmjax.evaluation import gpt2
from cfmjax.objectives import ar
from cfmjax.run import loading


class Judge(abc.ABC):
  """A scorer of samples. See the module docstring for the contract."""

  name: str
  tokenizer_fingerprint: str

  @abc.abstractmethod
  def nll(self, texts: list[str] | None = None, tokens: np.ndarray | None = None) -> tuple[float, int]:
    """(Σ NLL in nats, number of scored tokens) of `texts` or of `tokens` [N, L] (exactly one)."""


def short_name(kind: str, path: str) -> str:
  """'ar' + '/runs/ar_text_tiny/' -> 'ar:ar_text_tiny': what a record's "judge" field holds."""
  return f"{kind}:{os.path.basename(os.path.normpath(path))}"


def tokenizer_fingerprint(tokenizer) -> str:
  """Names a tokenizer exactly: identity:<V> for Markov token ids, else sha256 of its model file.

  A SentencePiece model is hashed without its trainer_spec, which records how it was trained (the
  scratch path of its training text among others), not how it tokenizes: two workdirs that trained
  the same tokenizer on the same corpus then share ids, as they should.
  """
  path = getattr(tokenizer, "path", None)
  if path is None:
    return f"identity:{tokenizer.vocab_size}"
  with open(path, "rb") as f:
    content = f.read()
  try:
    from sentencepiece import sentencepiece_model_pb2  # noqa: PLC0415

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(content)
    proto.ClearField("trainer_spec")
    content = proto.SerializeToString(deterministic=True)
  except Exception:  # noqa: BLE001 (not a SentencePiece model, or no protobuf: hash the bytes)
    pass
  return "sha256:" + hashlib.sha256(content).hexdigest()


def _one_of(texts, tokens):
  if (texts is None) == (tokens is None):
    raise ValueError("pass exactly one of texts= or tokens= to a judge")


class ExactMarkovJudge(Judge):
  """The Markov source's own chain: the exact log-likelihood of each whole sample."""

  name = "exact"

  def __init__(self, markov):
    self.markov = markov
    self.tokenizer_fingerprint = f"identity:{markov.vocab_size}"

  def nll(self, texts=None, tokens=None):
    _one_of(texts, tokens)
    if texts is not None:
      decoder = IdentityTokenizer(self.markov.vocab_size)
      rows = [np.asarray(decoder.encode(t), np.int64)[None] for t in texts]
      return float(-sum(np.sum(self.markov.log_likelihood(r)) for r in rows)), int(sum(r.size for r in rows))
    tokens = np.asarray(tokens)
    return float(-np.sum(self.markov.log_likelihood(tokens))), int(tokens.size)


class ARJudge(Judge):
  """A cfmjax autoregressive checkpoint (`cfmjax train` with objective=ar), EMA parameters.

  Scores up to the model's trained length (data.seq_len) tokens per sample: re-tokenised texts
  longer than that are truncated, shorter ones padded (causal attention: padding changes nothing).
  """

  def __init__(self, workdir: str, batch_size: int = 64):
    self.exp, self.params, self.step = loading.load(workdir)
    if not self.exp.model_config.causal:
      raise ValueError(f"--judge=ar:{workdir} needs an autoregressive workdir (trained with objective=ar, "
                       f"e.g. experiments/ar/*.py); {workdir} holds a flow")
    self.name = short_name("ar", workdir)
    self.tokenizer = self.exp.data.tokenizer
    self.tokenizer_fingerprint = tokenizer_fingerprint(self.tokenizer)
    self.max_length = self.exp.config.data.seq_len
    self.batch_size = batch_size

  def nll(self, texts=None, tokens=None):
    _one_of(texts, tokens)
    if tokens is not None:
      rows = [np.asarray(r)[:self.max_length] for r in np.asarray(tokens)]
    else:
      rows = [np.asarray(self.tokenizer.encode(t), np.int32)[:self.max_length] for t in texts]
    if any(r.size and (r.min() < 0 or r.max() >= self.exp.vocab_size) for r in rows):
      raise ValueError(f"token ids outside the judge's vocabulary of {self.exp.vocab_size}")
    width = max(1, max(r.size for r in rows)) if rows else 1
    padded = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.float32)
    for i, r in enumerate(rows):
      padded[i, :r.size], mask[i, :r.size] = r, 1.0
    total = float(np.sum(ar.score_rows(self.exp, self.params, padded, mask, self.batch_size)))
    return total, int(mask.sum())


def default_judge(data) -> Judge | None:
  """exact for the Markov source; none for text (pass --judge=ar:... or gpt2:...)."""
  return ExactMarkovJudge(data.markov) if data.markov is not None else None


def make_judge(spec: str, data) -> Judge | None:
  """A judge from its command-line spec: '' (the data's default), none, exact, ar:<workdir>, gpt2:<dir>."""
  if spec in ("", None):
    return default_judge(data)
  if spec == "none":
    return None
  if spec == "exact":
    if data.markov is None:
      raise ValueError("--judge=exact needs the Markov source (data.source='markov'); for text use "
                       "--judge=ar:<AR workdir> or --judge=gpt2:<directory>")
    return ExactMarkovJudge(data.markov)
  kind, _, path = spec.partition(":")
  if kind == "ar" and path:
    return ARJudge(path)
  if kind == "gpt2" and path:
    return gpt2.GPT2Judge(path)
  raise ValueError(f"unknown judge {spec!r}; use exact, none, ar:<workdir> or gpt2:<directory>")


def judge_samples(judge: Judge, tokens: np.ndarray, tokenizer) -> tuple[float, int]:
  """Scores samples `tokens` [N, L] written in `tokenizer`'s ids: passed as ids when the judge shares
  the tokenizer, as decoded text otherwise. Returns (Σ NLL nats, number of scored tokens)."""
  if judge.tokenizer_fingerprint == tokenizer_fingerprint(tokenizer):
    return judge.nll(tokens=np.asarray(tokens))
  return judge.nll(texts=[tokenizer.decode(row.tolist()) for row in np.asarray(tokens)])
