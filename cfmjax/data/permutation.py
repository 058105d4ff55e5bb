"""A keyed pseudo-random permutation of [0, n) that is never materialised.

    rows = permute(np.arange(k, k + 64), n, epoch_key(seed, epoch))

A 4-round Feistel network on the smallest even number of bits 2h with 2^(2h) >= n is a bijection of
[0, 2^(2h)); cycle-walking (apply it again while the image is >= n) restricts it to a bijection of
[0, n). Each call costs O(len(indices)) whatever n is, so a shuffled epoch of 10^10 rows needs no
table of 10^10 indices: the data iterator's state stays one position (data/pipeline.py).
Since 2^(2h) < 4n, a walk takes fewer than 4 passes on average.
"""

from __future__ import annotations

import numpy as np

_ROUNDS = 4
_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijective avalanche of uint64 values (wrapping arithmetic)."""
  x = x ^ (x >> np.uint64(30))
  x = x * _M1
  x = x ^ (x >> np.uint64(27))
  x = x * _M2
  return x ^ (x >> np.uint64(31))


def epoch_key(seed: int, epoch: int) -> np.ndarray:
  """The round keys [_ROUNDS] uint64 for one (seed, epoch): a different shuffle per epoch."""
  base = np.array([(int(seed) * 0x100000001B3 + int(epoch)) % 2**64], np.uint64)
  with np.errstate(over="ignore"):
    return _mix(base + _GOLDEN * np.arange(1, _ROUNDS + 1, dtype=np.uint64))


def _feistel(x: np.ndarray, half_bits: int, keys: np.ndarray) -> np.ndarray:
  mask = np.uint64((1 << half_bits) - 1)
  left, right = x >> np.uint64(half_bits), x & mask
  for key in keys:
    left, right = right, left ^ (_mix(right ^ key) & mask)
  return (left << np.uint64(half_bits)) | right


def permute(indices, n: int, keys: np.ndarray) -> np.ndarray:
  """The images of `indices` (each in [0, n)) under the permutation of [0, n) keyed by `keys`."""
  if n < 1:
    raise ValueError(f"cannot permute an empty range (n={n})")
  x = np.asarray(indices, np.uint64).copy()
  if x.size and int(x.max()) >= n:
    raise ValueError(f"index {int(x.max())} is outside [0, {n})")
  half_bits = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
  with np.errstate(over="ignore"):
    todo = np.ones(x.shape, bool)
    while todo.any():
      x[todo] = _feistel(x[todo], half_bits, keys)
      todo = x >= np.uint64(n)
  return x.astype(np.int64)
