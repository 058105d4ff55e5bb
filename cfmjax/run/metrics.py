"""Where results go: metrics.jsonl, TensorBoard events and a progress line on the terminal.

Only process 0 writes files or prints, so a multi-host job produces one log.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import numpy as np


def to_python(value):
  """Device arrays and numpy scalars → plain Python numbers for JSON."""
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class MetricsWriter:
  """Appends one JSON object per logged step to `metrics.jsonl` and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, filename: str = "metrics.jsonl"):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, filename)
    self._tb = None
    if self.enabled:
      try:
        from tensorboardX import SummaryWriter  # optional at import time; installed by setup.py
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        self._tb = None

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    record = {"step": int(step), **{k: to_python(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k, v, step)

  def close(self):
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
  """A one-line progress report: step, loss, steps/s, tokens/s, an optional note (MFU and its peak) and ETA.

  On a terminal it redraws one line; in a log file it prints a fresh line each time.
  """

  def __init__(self, total_steps: int, tokens_per_step: int, start_step: int = 0, stream=None):
    self.total = total_steps
    self.tokens_per_step = tokens_per_step
    self.stream = stream or sys.stdout
    self.enabled = jax.process_index() == 0
    self._last_time = time.time()
    self._last_step = start_step
    self.steps_per_sec = float("nan")

  def update(self, step: int, note: str | None = None, **values):
    now = time.time()
    if step > self._last_step:
      self.steps_per_sec = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_time, self._last_step = now, step
    if not self.enabled:
      return
    eta = (self.total - step) / self.steps_per_sec if self.steps_per_sec > 0 else float("nan")
    parts = [f"step {step}/{self.total}"]
    parts += [f"{k} {v:.4f}" for k, v in values.items()]
    parts += [f"{self.steps_per_sec:.2f} steps/s",
              f"{self.steps_per_sec * self.tokens_per_step:,.0f} tok/s"]
    parts += [note] if note else []
    parts += [f"ETA {format_duration(eta)}"]
    line = " | ".join(parts)
    if self.stream.isatty():
      self.stream.write("\r" + line.ljust(100))
      if step >= self.total:
        self.stream.write("\n")
    else:
      self.stream.write(line + "\n")
    self.stream.flush()
