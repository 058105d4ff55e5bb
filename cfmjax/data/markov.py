"""A synthetic order-k Markov source with an exact likelihood (SPEC §6).

Text models can only be judged by another model; a Markov chain can be judged
exactly: the log-probability of any generated sequence is a sum of log
transition probabilities, and the best achievable NLL per token is known in
closed form. That makes it the reference dataset for testing samplers.

Conventions:
  * A context is the last `order` tokens, read as a base-V number with the most
    recent token as the least significant digit. Appending token x to context
    c gives context (c * V + x) mod V**order.
  * Every sequence starts from the stationary distribution of the context
    chain, so every position of every row has the same marginal law. This is
    what makes `expected_nll_per_token` exact for any length.
"""

from collections.abc import Iterable, Sequence

from absl import logging
import numpy as np

# The biggest context table we agree to build. Beyond this the transition
# table (contexts x vocab float64, plus its cumulative copy) stops fitting
# comfortably in host memory.
MAX_CONTEXTS = 2**22
MAX_TABLE_ENTRIES = 2**25

_SPLIT_CODES = {"train": 0, "validation": 1}
# Mixed into every per-row seed so row streams never coincide with the stream
# that drew the transition table (np.random.default_rng(seed)).
_ROW_STREAM_TAG = 0x6D61726B  # "mark"


def _entropy(probs: np.ndarray) -> np.ndarray:
  """Shannon entropy in nats along the last axis, with 0 log 0 = 0."""
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = np.where(probs > 0, -probs * np.log(probs), 0.0)
  return terms.sum(axis=-1)


def _cumulative(probs: np.ndarray) -> np.ndarray:
  """Cumulative table for inverse-CDF sampling; the last column is exactly 1."""
  cdf = np.cumsum(probs, axis=-1)
  cdf[..., -1] = 1.0  # Rounding must never let a uniform fall off the end.
  return cdf


class MarkovSource:
  """Order-k Markov chain over V tokens with Dirichlet(concentration) rows.

  The transition table is drawn from np.random.default_rng(seed), so the same
  arguments always give the same chain.

  Attributes:
    vocab_size: V, the number of tokens.
    order: k, the number of previous tokens a transition looks at.
    transition: float64 [V**k, V]; row c is the next-token law after context c.
    initial: float64 [V**k], the stationary law of the context chain; the first
      k tokens of every sequence are drawn from it.
  """

  def __init__(self, vocab_size: int, order: int, concentration: float,
               seed: int):
    if vocab_size < 2:
      raise ValueError(f"markov vocab_size must be >= 2, got {vocab_size}.")
    if order < 1:
      raise ValueError(f"markov order must be >= 1, got {order}.")
    if not concentration > 0:
      raise ValueError(
          f"markov concentration must be > 0, got {concentration}.")
    num_contexts = vocab_size**order
    if num_contexts > MAX_CONTEXTS:
      raise ValueError(
          f"vocab_size**order = {vocab_size}**{order} = {num_contexts} "
          f"contexts exceeds {MAX_CONTEXTS}: lower markov.vocab_size or "
          "markov.order.")
    if num_contexts * vocab_size > MAX_TABLE_ENTRIES:
      raise ValueError(
          f"the transition table would hold vocab_size**(order+1) = "
          f"{num_contexts * vocab_size} entries (> {MAX_TABLE_ENTRIES}): lower "
          "markov.vocab_size or markov.order.")

    self.vocab_size = vocab_size
    self.order = order
    self.concentration = float(concentration)
    self.seed = seed
    self.num_contexts = num_contexts

    rng = np.random.default_rng(seed)
    self.transition = rng.dirichlet(
        np.full(vocab_size, self.concentration), size=num_contexts)
    self.initial = self._stationary_distribution()

    self._transition_cdf = _cumulative(self.transition)
    self._initial_cdf = _cumulative(self.initial)
    # Digit weights of a context: V**(k-1), ..., V, 1 (oldest token first).
    self._place_values = vocab_size**np.arange(order - 1, -1, -1)

  def _context_step(self, context_probs: np.ndarray) -> np.ndarray:
    """One step of the context chain: law of the next context."""
    # Context c = a * V**(k-1) + b moves to b * V + x with prob T[c, x]. So
    # the new law is the joint (c, x) mass summed over the dropped digit a.
    joint = context_probs[:, None] * self.transition
    joint = joint.reshape(self.vocab_size, self.num_contexts // self.vocab_size,
                          self.vocab_size)
    return joint.sum(axis=0).reshape(-1)

  def _stationary_distribution(self, tol: float = 1e-15,
                               max_iters: int = 10_000) -> np.ndarray:
    """Stationary law of the context chain, by power iteration."""
    # Keeping a little of the previous iterate leaves the fixed point alone
    # but damps the oscillation of a periodic chain (possible when tiny
    # concentrations underflow to exact zeros). Dirichlet rows mix fast, so
    # this converges in ~100 steps for sensible concentrations.
    probs = np.full(self.num_contexts, 1.0 / self.num_contexts)
    for _ in range(max_iters):
      new = 0.1 * probs + 0.9 * self._context_step(probs)
      new /= new.sum()
      change = np.abs(new - probs).sum()
      probs = new
      if change < tol:
        break
    else:
      logging.warning("Markov stationary law: power iteration stopped at an "
                      "L1 change of %.2e after %d steps.", change, max_iters)
    return probs

  def _contexts_to_tokens(self, contexts: np.ndarray) -> np.ndarray:
    """Digits of each context, oldest token first: [N] -> [N, order]."""
    return (contexts[:, None] // self._place_values) % self.vocab_size

  def _generate(self, uniforms: np.ndarray, length: int) -> np.ndarray:
    """Inverse-CDF sampling driven by uniforms [N, 1 + max(0, length-order)].

    Column 0 draws the starting context, each further column one transition.
    Vectorised over N; the loop runs over positions only.
    """
    num = uniforms.shape[0]
    out = np.empty((num, max(length, self.order)), np.int32)
    # side="right": zero-probability entries (flat CDF steps) are never picked.
    context = np.searchsorted(self._initial_cdf, uniforms[:, 0], side="right")
    context = np.minimum(context, self.num_contexts - 1)
    out[:, :self.order] = self._contexts_to_tokens(context)
    for t in range(self.order, length):
      cdf_rows = self._transition_cdf[context]  # [N, V]
      token = (cdf_rows <= uniforms[:, t - self.order + 1, None]).sum(axis=1)
      token = np.minimum(token, self.vocab_size - 1)
      out[:, t] = token
      context = (context * self.vocab_size + token) % self.num_contexts
    return out[:, :length]

  def _num_uniforms(self, length: int) -> int:
    return 1 + max(0, length - self.order)

  def sample(self, rng: np.random.Generator, num: int,
             length: int) -> np.ndarray:
    """Draws `num` independent stationary sequences: int32 [num, length]."""
    uniforms = rng.random((num, self._num_uniforms(length)))
    return self._generate(uniforms, length)

  def rows(self, indices: Iterable[int], length: int, split: str,
           stream: int = 0) -> np.ndarray:
    """Rows for many indices at once; row i equals `row(i, length, split)`.

    Each row has its own seed (source seed, split, stream, index), so a row
    never depends on which batch or process asked for it. `stream` lets the
    training pipeline offer different row sequences for different seeds.
    """
    if split not in _SPLIT_CODES:
      raise ValueError(
          f"split must be one of {sorted(_SPLIT_CODES)}, got {split!r}.")
    if stream < 0:
      raise ValueError(f"stream must be >= 0, got {stream}.")
    entropy_prefix = [_ROW_STREAM_TAG, self.seed, _SPLIT_CODES[split], stream]
    num_uniforms = self._num_uniforms(length)
    uniforms = np.stack([
        np.random.default_rng(entropy_prefix + [int(i)]).random(num_uniforms)
        for i in indices
    ]).reshape(-1, num_uniforms)
    return self._generate(uniforms, length)

  def row(self, index: int, length: int, split: str) -> np.ndarray:
    """A deterministic row, int32 [length]: a function of (seed, split, index).

    "train" and "validation" use different seeds, so the streams are disjoint.
    """
    return self.rows([index], length, split)[0]

  def log_likelihood(self, seqs: Sequence[Sequence[int]] | np.ndarray
                     ) -> np.ndarray:
    """Exact log-probability of each sequence: float64 [N].

    Args:
      seqs: int [N, L] token ids with L >= order.
    """
    seqs = np.asarray(seqs, dtype=np.int64)
    if seqs.ndim != 2 or seqs.shape[1] < self.order:
      raise ValueError(
          f"seqs must have shape [N, L] with L >= order={self.order}, got "
          f"{seqs.shape}.")
    if seqs.size and (seqs.min() < 0 or seqs.max() >= self.vocab_size):
      raise ValueError(f"token ids must lie in [0, {self.vocab_size}).")
    length = seqs.shape[1]
    # contexts[:, j] is the context made of tokens j .. j+order-1.
    num_windows = length - self.order + 1
    contexts = np.zeros((seqs.shape[0], num_windows), np.int64)
    for j in range(self.order):
      contexts = contexts * self.vocab_size + seqs[:, j:j + num_windows]
    with np.errstate(divide="ignore"):
      log_initial = np.log(self.initial[contexts[:, 0]])
      log_steps = np.log(
          self.transition[contexts[:, :-1], seqs[:, self.order:]])
    return log_initial + log_steps.sum(axis=1)

  def entropy_rate(self) -> float:
    """Entropy rate in nats/token: sum_c initial[c] * H(transition[c])."""
    return float(self.initial @ _entropy(self.transition))

  def expected_nll_per_token(self, length: int) -> float:
    """Exact H(X_1..X_L) / L for stationary rows of length L.

    This is the NLL per token a perfect model reaches on this data.
    """
    if length < 1:
      raise ValueError(f"length must be >= 1, got {length}.")
    if length < self.order:
      # Only a prefix of the starting context: marginalise the younger digits.
      prefix = self.initial.reshape(self.vocab_size**length, -1).sum(axis=1)
      return float(_entropy(prefix)) / length
    total = (float(_entropy(self.initial))
             + (length - self.order) * self.entropy_rate())
    return total / length
